//! Tests of what the engine makes durable (issue 15, item 7): a commit of leases alone is
//! volatile (a crash may undo it: its messages are then offered again), everything else waits
//! for the disk, and a long run of volatile commits is broken by a durable one.

use std::sync::{Arc, Mutex};

use super::VOLATILE_RUN_MAX;
use crate::broker::Broker;
use crate::clock::{ManualClock, Timestamp};
use crate::config::Config;
use crate::error::Result;
use crate::storage::kv::{Batch, KvStore, Snapshot};
use crate::storage::MemKv;
use crate::subscription::{DeliveryMode, NewSubscription};
use crate::{EventTypeName, EventTypeSpec, NewRoom, Principal, PublishRequest, RoomName};

/// A backend that remembers, for each non-empty commit, whether it was volatile.
struct Recording {
    inner: MemKv,
    commits: Mutex<Vec<bool>>,
}

impl KvStore for Recording {
    fn snapshot(&self) -> Result<Arc<dyn Snapshot>> {
        self.inner.snapshot()
    }
    fn commit(&self, batch: Batch) -> Result<()> {
        if !batch.is_empty() {
            self.commits.lock().unwrap().push(batch.volatile);
        }
        self.inner.commit(batch)
    }
    fn kind(&self) -> &'static str {
        "recording"
    }
}

impl Recording {
    /// The volatility of the commits since the last call.
    fn take(&self) -> Vec<bool> {
        std::mem::take(&mut *self.commits.lock().unwrap())
    }
}

#[tokio::test]
async fn leases_alone_commit_without_waiting_for_the_disk_and_nothing_else_does() {
    let kv = Arc::new(Recording {
        inner: MemKv::new(),
        commits: Mutex::new(Vec::new()),
    });
    let mut config = Config::default();
    config.retention.interval_ms = 0;
    let clock = Arc::new(ManualClock::new(Timestamp(1_767_225_600_000)));
    let broker = Broker::open_over_kv(kv.clone(), config, clock).unwrap();
    let room = RoomName::new("r").unwrap();
    let admin = Principal::new("admin").unwrap();
    broker
        .create_room(NewRoom::new(room.clone(), admin.clone()).approved())
        .await
        .unwrap();
    let ty = EventTypeName::new("t").unwrap();
    broker
        .put_event_type(
            &room,
            EventTypeSpec {
                name: ty.clone(),
                description: String::new(),
                schema: serde_json::json!({"type": "object"}),
                key_pointer: None,
            },
        )
        .await
        .unwrap();
    // Without ordering, so that every published event may be out at once.
    let mut new = NewSubscription::new(admin.clone(), DeliveryMode::Pull);
    new.ordered = Some(false);
    let sub = broker
        .create_subscription(&room, new)
        .await
        .unwrap()
        .subscription
        .id;
    let total = VOLATILE_RUN_MAX as usize + 2;
    for _ in 0..total {
        broker
            .publish(PublishRequest::new(
                room.clone(),
                ty.clone(),
                admin.clone(),
                b"{}".to_vec(),
            ))
            .await
            .unwrap();
    }
    assert!(
        kv.take().iter().all(|v| !v),
        "setting up and publishing wait for the disk"
    );

    let first = broker.pull(sub, 1, None, 0).await.unwrap();
    assert_eq!(kv.take(), vec![true], "a lease is volatile");
    let acked = broker.ack(sub, &[first[0].ack_id.clone()]).await.unwrap();
    assert!(acked[0].is_ok());
    assert_eq!(kv.take(), vec![false], "an acknowledgement is durable");

    // A long run of leases alone: one in every VOLATILE_RUN_MAX + 1 is made durable.
    for _ in 1..total {
        assert_eq!(broker.pull(sub, 1, None, 0).await.unwrap().len(), 1);
    }
    let run = kv.take();
    assert_eq!(run.len(), total - 1);
    let durable: Vec<usize> = (0..run.len()).filter(|&i| !run[i]).collect();
    assert_eq!(durable, vec![VOLATILE_RUN_MAX as usize], "{run:?}");
    // A pull that finds nothing writes nothing.
    assert!(broker.pull(sub, 1, None, 0).await.unwrap().is_empty());
    assert!(kv.take().is_empty());
    broker.close().await;
}
