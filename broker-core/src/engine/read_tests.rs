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

/// Issue 15, defect 6 (the report's side): an ordered subscription's blocked keys come from its
/// index of key heads, so a blocked key with many events queued behind its head does not hide
/// another blocked key. Before, the report walked `scan_records_max` deliveries in log order
/// and saw only the first key's.
#[tokio::test]
async fn a_long_blocked_key_does_not_hide_another_from_the_blocked_keys_report() {
    let mut config = crate::config::Config::default();
    config.retention.interval_ms = 0;
    config.delivery.scan_records_max = 3;
    let clock = Arc::new(crate::clock::ManualClock::new(crate::clock::Timestamp(
        1_767_225_600_000,
    )));
    let broker =
        crate::broker::Broker::open_over_kv(Arc::new(MemKv::new()), config, clock).unwrap();
    let room = crate::testkit::TestRoom::create(&broker).await;
    let sub = room.pull_subscription(&broker, true).await;
    for key in ["a", "a", "a", "a", "a", "b"] {
        let mut e = room.event();
        e.ordering_key = Some(key.into());
        broker.publish(e).await.unwrap();
    }
    let heads = broker.pull(sub, 10, None, 0).await.unwrap();
    assert_eq!(heads.len(), 2, "one head per key");
    let ids: Vec<String> = heads.iter().map(|m| m.ack_id.clone()).collect();
    let nacked = broker.nack(sub, &ids, Some(60_000)).await.unwrap();
    assert!(nacked.iter().all(|r| r.is_ok()), "{nacked:?}");
    let blocked = broker.blocked_keys(sub, None).unwrap();
    let keys: Vec<&str> = blocked.iter().map(|b| b.key.as_str()).collect();
    assert_eq!(keys, vec!["a", "b"]);
    broker.close().await;
}
