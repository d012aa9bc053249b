//! An in-memory backend: an ordered map behind a lock, with snapshots that share it until the
//! next commit. It is the reference the conformance suite holds the other backends to, and what
//! the deterministic simulation runs on: a "crash" there drops the engine and opens a new one
//! over the same committed map, which is what a process restart sees of a durable store.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use super::kv::{apply_to_map, Batch, Entry, KvStore, Order, Snapshot, Space};
use crate::error::Result;

type Map = BTreeMap<(Space, Vec<u8>), Vec<u8>>;

/// Notices a listener may have waiting; more are dropped (a wake-up lost is made up by the
/// dispatchers' tick).
const NOTICES_QUEUED_MAX: usize = 1024;

/// The in-memory backend. Cloning shares the same data (a second handle on one store).
#[derive(Clone, Default)]
pub(crate) struct MemKv {
    map: Arc<RwLock<Arc<Map>>>,
    /// Whether it says it is shared by several writers (see [`KvStore::shared`]), so that the
    /// simulation runs the engine's shared-store paths too.
    shared: bool,
    /// Where each handle that took notices hears the commits (`KvStore::take_notices`), for
    /// tests of several brokers over one shared store.
    listeners: Arc<std::sync::Mutex<Vec<tokio::sync::mpsc::Sender<String>>>>,
}

impl MemKv {
    /// An empty store.
    pub(crate) fn new() -> MemKv {
        MemKv::default()
    }

    /// An empty store that says it is shared by several writers (see [`KvStore::shared`]).
    #[cfg(test)]
    pub(crate) fn new_shared() -> MemKv {
        MemKv {
            shared: true,
            ..MemKv::default()
        }
    }

    /// Makes this store hold what `other` holds now (tests: a backend that loses its pending
    /// volatile commits goes back to its durable copy).
    #[cfg(test)]
    pub(crate) fn restore_from(&self, other: &MemKv) {
        let map = other.map.read().unwrap_or_else(|p| p.into_inner()).clone();
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = map;
    }
}

struct MemSnapshot(Arc<Map>);

impl Snapshot for MemSnapshot {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.0.get(&(space, key.to_vec())).cloned())
    }

    fn range(
        &self,
        space: Space,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let key = |b: Bound<&[u8]>, unbounded: Bound<(Space, Vec<u8>)>| match b {
            Bound::Included(k) => Bound::Included((space, k.to_vec())),
            Bound::Excluded(k) => Bound::Excluded((space, k.to_vec())),
            Bound::Unbounded => unbounded,
        };
        let lo = key(start, Bound::Included((space, Vec::new())));
        // Unbounded above means "to the end of this space".
        let space_end = Space::ALL
            .iter()
            .find(|s| **s > space)
            .map_or(Bound::Unbounded, |next| {
                Bound::Excluded((*next, Vec::new()))
            });
        let hi = key(end, space_end);
        if let (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) =
            (&lo, &hi)
        {
            if a > b {
                return Ok(Vec::new());
            }
            if a == b && !(matches!(lo, Bound::Included(_)) && matches!(hi, Bound::Included(_))) {
                return Ok(Vec::new());
            }
        }
        let it = self
            .0
            .range((lo, hi))
            .map(|((_, k), v)| (k.clone(), v.clone()));
        Ok(match order {
            Order::Ascending => it.take(limit).collect(),
            Order::Descending => it.rev().take(limit).collect(),
        })
    }
}

impl KvStore for MemKv {
    fn snapshot(&self) -> Result<Arc<dyn Snapshot>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(Arc::new(MemSnapshot(map)))
    }

    fn commit(&self, batch: Batch) -> Result<()> {
        let mut guard = self.map.write().unwrap_or_else(|p| p.into_inner());
        // Copy on write: snapshots still held keep the map they saw; without any, no copy.
        let mut map = std::mem::take(&mut *guard);
        let notify = batch.notify.clone();
        let applied = apply_to_map(Arc::make_mut(&mut map), batch);
        *guard = map;
        drop(guard);
        if let (Ok(()), Some(n)) = (&applied, notify) {
            if self.shared {
                let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
                for l in listeners.iter() {
                    let _ = l.try_send(n.clone());
                }
            }
        }
        applied
    }

    fn take_notices(&self) -> Option<tokio::sync::mpsc::Receiver<String>> {
        if !self.shared {
            return None;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(NOTICES_QUEUED_MAX);
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        Some(rx)
    }

    fn shared(&self) -> bool {
        self.shared
    }

    /// Nothing to do: a commit here is as durable as this store gets.
    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
