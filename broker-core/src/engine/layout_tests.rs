//! Tests of the storage layout at open: a layout-2 store (no index of ready work, or one that a
//! layout-2 build left stale) is upgraded to layout 3 by building the index, so that nothing
//! queued is left unfindable.

use std::sync::Arc;

use super::ready::READY_INDEX_MARK;
use super::spaces::{KEY_HEAD, KEY_QUEUE, META, READY};
use crate::broker::Broker;
use crate::clock::{ManualClock, Timestamp};
use crate::config::Config;
use crate::storage::kv::{KvStore, LAYOUT_VERSION};
use crate::storage::txn::Txn;
use crate::storage::MemKv;
use crate::subscription::{DeliveryMode, NewSubscription};
use crate::testkit::TestRoom;

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(Timestamp(1_767_225_600_000)))
}

/// Issue 15 (review of the ready index): a layout-2 build writes deliveries without the index.
/// Its file, opened again by this build with the index's mark still set, used to keep the stale
/// index, so the deliveries the older build wrote were never handed out. Layout 3 rebuilds it.
#[tokio::test]
async fn a_layout_2_store_gets_its_index_rebuilt_at_open() {
    let kv = Arc::new(MemKv::new());
    let mut config = Config::default();
    config.retention.interval_ms = 0;
    let broker = Broker::open_over_kv(kv.clone(), config.clone(), clock()).unwrap();
    let r = TestRoom::create(&broker).await;
    let sub = broker
        .create_subscription(
            &r.room,
            NewSubscription::new(r.admin.clone(), DeliveryMode::Pull),
        )
        .await
        .unwrap()
        .subscription
        .id;
    broker.publish(r.event()).await.unwrap();
    broker.close().await;
    drop(broker);

    // As a layout-2 build leaves it: layout 2, the mark still set, the index without the
    // delivery it wrote.
    let txn = Txn::new(kv.snapshot().unwrap());
    {
        let meta = txn.open_table(META).unwrap();
        assert_eq!(meta.get("layout_version").unwrap(), Some(LAYOUT_VERSION));
        assert!(meta.get(READY_INDEX_MARK).unwrap().is_some());
        meta.insert("layout_version", 2).unwrap();
        let ready = txn.open_table(READY).unwrap();
        let keys: Vec<_> = ready.iter().unwrap().map(|r| r.unwrap().0).collect();
        assert!(!keys.is_empty(), "the delivery was indexed");
        for k in keys {
            ready.remove(k).unwrap();
        }
        let queue = txn.open_table(KEY_QUEUE).unwrap();
        let keys: Vec<_> = queue.iter().unwrap().map(|r| r.unwrap().0).collect();
        for k in keys {
            queue.remove(k).unwrap();
        }
        let heads = txn.open_table(KEY_HEAD).unwrap();
        let keys: Vec<_> = heads.iter().unwrap().map(|r| r.unwrap().0).collect();
        for k in keys {
            heads.remove(k).unwrap();
        }
    }
    kv.commit(txn.take_batch()).unwrap();

    let broker = Broker::open_over_kv(kv.clone(), config, clock()).unwrap();
    let got = broker.pull(sub, 10, None, 0).await.unwrap();
    assert_eq!(got.len(), 1, "the delivery is found again");
    let txn = Txn::reader(kv.snapshot().unwrap());
    let meta = txn.open_table(META).unwrap();
    assert_eq!(meta.get("layout_version").unwrap(), Some(LAYOUT_VERSION));
    assert_eq!(LAYOUT_VERSION, 3);
    broker.close().await;
}
