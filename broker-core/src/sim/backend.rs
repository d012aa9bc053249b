//! Where the simulated engine's records live. The simulation opens its store through
//! [`SimBackend`], so that the same seeds run against every backend: redb on a file and the
//! in-memory key-value store (whose committed map outlives the engine, as a file does). A "crash" is: drop every
//! handle, then `open` again, which must find exactly what was committed.

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::storage::{DeliveryDefaults, Engine, MemKv, PostgresConfig, Storage, StorageFaults};
use crate::subscription::RetryPolicy;

/// An opened engine: the storage interface and the switches that make its commits fail.
pub(super) struct Opened {
    pub store: Arc<dyn Storage>,
    pub faults: Arc<StorageFaults>,
}

/// Opens the store a simulation runs against.
pub(super) trait SimBackend {
    /// Opens the store: empty the first time, afterwards exactly what was committed before. The
    /// caller has dropped every handle of the previous opening (that is the crash).
    fn open(&mut self) -> Result<Opened>;
}

/// The broker-wide delivery defaults of every simulation. Subscriptions set their whole retry
/// policy themselves; the cap on a receiver's Retry-After is small enough for the generated
/// Retry-After values to exceed it.
pub(super) fn defaults() -> DeliveryDefaults {
    DeliveryDefaults {
        retry: RetryPolicy::default(),
        retry_after_ms_max: RETRY_AFTER_MS_MAX,
        in_flight_max: 2,
        queue_depth_max: 1000,
        dead_letter_retention_ms: u64::MAX / 4,
        subscriptions_per_room_max: 16,
        volatile_commits: true,
    }
}

/// The cap on a receiver's Retry-After in every simulation.
pub(super) const RETRY_AFTER_MS_MAX: u64 = 30_000;

/// redb on a file in a fresh temporary folder, in `/dev/shm` when there is one (tmpfs: a
/// durable commit's fsync costs nothing there), else in the system's temporary folder.
pub(super) struct RedbFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl RedbFile {
    pub(super) fn new() -> Result<Self> {
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("postroom-sim-")
                .tempdir_in(shm)
        } else {
            tempfile::Builder::new().prefix("postroom-sim-").tempdir()
        }
        .map_err(|e| Error::Storage(format!("simulation temp dir: {e}")))?;
        let path = dir.path().join("sim.redb");
        Ok(RedbFile { _dir: dir, path })
    }
}

impl SimBackend for RedbFile {
    fn open(&mut self) -> Result<Opened> {
        let store = Engine::open(&self.path, 4 << 20, defaults())?;
        let faults = store.faults();
        Ok(Opened {
            store: Arc::new(store),
            faults,
        })
    }
}

/// The in-memory key-value store: the engine is dropped and built again over the same committed
/// map, which is what a restart sees of a durable store. Much faster than a file, so most seeds
/// run on it.
#[derive(Default)]
pub(super) struct Memory {
    kv: MemKv,
}

impl Memory {
    /// The same store saying it is shared by several writers, so that the engine takes
    /// sequences from their rows and fences every batch (see `KvStore::shared`).
    pub(super) fn shared() -> Memory {
        Memory {
            kv: MemKv::new_shared(),
        }
    }
}

impl SimBackend for Memory {
    fn open(&mut self) -> Result<Opened> {
        let store = Engine::over(Arc::new(self.kv.clone()), defaults())?;
        let faults = store.faults();
        Ok(Opened {
            store: Arc::new(store),
            faults,
        })
    }
}

/// PostgreSQL: a schema of its own on the tests' server (`storage::pg_cluster`); a crash drops
/// the engine with its connections and opens the schema again.
pub(super) struct Postgres {
    config: PostgresConfig,
}

impl Postgres {
    pub(super) fn new() -> Postgres {
        Postgres {
            config: crate::storage::pg_cluster::test_postgres().fresh(),
        }
    }
}

impl SimBackend for Postgres {
    fn open(&mut self) -> Result<Opened> {
        let store = Engine::open_postgres(&self.config, defaults())?;
        let faults = store.faults();
        Ok(Opened {
            store: Arc::new(store),
            faults,
        })
    }
}
