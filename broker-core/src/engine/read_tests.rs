//! Tests of how the engine reads: a backend whose reads wait (on the network) never holds a
//! tokio worker while it waits.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Engine;
use crate::error::{Error, Result};
use crate::storage::kv::{Batch, KvStore, Snapshot};
use crate::storage::{DeliveryDefaults, MemKv, Storage};

/// A backend whose next snapshot waits until a gate opens (or 10 s pass, which fails it).
struct GatedKv {
    inner: MemKv,
    gate: Mutex<Option<mpsc::Receiver<()>>>,
}

impl KvStore for GatedKv {
    fn snapshot(&self) -> Result<Arc<dyn Snapshot>> {
        let gate = self.gate.lock().unwrap().take();
        if let Some(rx) = gate {
            rx.recv_timeout(Duration::from_secs(10))
                .map_err(|_| Error::Storage("the gate never opened".into()))?;
        }
        self.inner.snapshot()
    }
    fn commit(&self, batch: Batch) -> Result<()> {
        self.inner.commit(batch)
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn reads_block(&self) -> bool {
        true
    }
    fn kind(&self) -> &'static str {
        "gated"
    }
}

fn defaults() -> DeliveryDefaults {
    crate::broker::delivery_defaults(&crate::config::Config::default())
}

/// Issue 15, item 2: with one tokio worker, a read that waits for another task to run must not
/// hold that worker, or the other task never runs and the read never ends.
#[test]
fn a_waiting_read_does_not_hold_the_tokio_worker() {
    let kv = Arc::new(GatedKv {
        inner: MemKv::new(),
        gate: Mutex::new(None),
    });
    let engine: Arc<dyn Storage> = Arc::new(Engine::over(kv.clone(), defaults()).unwrap());
    let (open, gate) = mpsc::channel();
    *kv.gate.lock().unwrap() = Some(gate);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let rooms = rt.block_on(async move {
        let read = tokio::spawn(async move { engine.rooms(None, 10) });
        // Spawned after the read, so it needs the one worker the read is on.
        tokio::spawn(async move { open.send(()) });
        read.await.unwrap()
    });
    assert_eq!(
        rooms.unwrap().len(),
        0,
        "the read finished once the gate opened"
    );
}
