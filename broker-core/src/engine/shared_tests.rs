//! Tests of a store shared by several brokers (issue 15, item 2: positions and sequences that
//! do not assume one process numbering a dense local log). Two brokers over one in-memory
//! store that says it is shared: neither hands out a Room position or a key's sequence that
//! the other already did, whether they take turns or race.

use std::sync::{Arc, Mutex};

use crate::broker::Broker;
use crate::clock::{ManualClock, Timestamp};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::storage::kv::{Batch, KvStore, Snapshot};
use crate::storage::MemKv;
use crate::subscription::{DeliveryMode, NewSubscription};
use crate::testkit::TestRoom;

/// A work to run before the next commit through one handle.
type Hook = Box<dyn FnOnce() + Send>;

/// One broker's handle on a store shared with others: every handle's `inner` is the same map.
struct SharedKv {
    inner: MemKv,
    /// Run (once) at the start of this handle's next commit: another broker's write landing
    /// between this broker's snapshot and its commit.
    before_commit: Mutex<Option<Hook>>,
}

impl SharedKv {
    fn over(inner: &MemKv) -> Arc<SharedKv> {
        Arc::new(SharedKv {
            inner: inner.clone(),
            before_commit: Mutex::new(None),
        })
    }
}

impl KvStore for SharedKv {
    fn snapshot(&self) -> Result<Arc<dyn Snapshot>> {
        self.inner.snapshot()
    }
    fn commit(&self, batch: Batch) -> Result<()> {
        let hook = self.before_commit.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        self.inner.commit(batch)
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn shared(&self) -> bool {
        true
    }
    fn kind(&self) -> &'static str {
        "shared"
    }
}

fn open(kv: Arc<SharedKv>) -> Broker {
    let mut config = Config::default();
    config.retention.interval_ms = 0;
    let clock = Arc::new(ManualClock::new(Timestamp(1_767_225_600_000)));
    Broker::open_over_kv(kv, config, clock).unwrap()
}

/// A Room with an unordered pull subscription on broker `a` (which counts, by what it can
/// pull, the events stored at distinct positions), and a second broker `b` over the same store.
async fn two_brokers(
    store: &MemKv,
) -> (
    Broker,
    Arc<SharedKv>,
    Broker,
    TestRoom,
    crate::SubscriptionId,
) {
    let a_kv = SharedKv::over(store);
    let a = open(a_kv.clone());
    let room = TestRoom::create(&a).await;
    let mut new = NewSubscription::new(room.admin.clone(), DeliveryMode::Pull);
    new.ordered = Some(false);
    let sub = a
        .create_subscription(&room.room, new)
        .await
        .unwrap()
        .subscription
        .id;
    let b = open(SharedKv::over(store));
    (a, a_kv, b, room, sub)
}

fn keyed(room: &TestRoom) -> crate::PublishRequest {
    let mut e = room.event();
    e.ordering_key = Some("k".into());
    e
}

/// Brokers taking turns: each key's sequence continues where the other broker left it, and
/// every event has a position of its own. Before a shared store's sequences came from their
/// rows, the second broker numbered the key from what it had in memory (nothing): 1 again.
#[tokio::test]
async fn brokers_taking_turns_continue_each_other_s_sequences() {
    let store = MemKv::new();
    let (a, _, b, room, sub) = two_brokers(&store).await;
    let mut seqs = Vec::new();
    for round in 0..3 {
        for broker in [&a, &b] {
            let r = broker.publish(keyed(&room)).await.unwrap();
            seqs.push(r.sequence.0);
        }
        assert_eq!(seqs.len(), 2 * (round + 1));
    }
    assert_eq!(seqs, (1..=6).collect::<Vec<u64>>());
    let pulled = a.pull(sub, 100, None, 0).await.unwrap();
    assert_eq!(pulled.len(), 6, "each event has a position of its own");
    a.close().await;
    b.close().await;
}

/// A race: broker `b` publishes between broker `a`'s snapshot and its commit. `a`'s batch read
/// the Room's next position and the key's sequence before `b` took them, so its commit is
/// refused (`storage_conflict`, nothing written) instead of storing a second event at `b`'s
/// position with `b`'s sequence; tried again, it gets the next ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_lost_a_race_writes_nothing_and_numbers_correctly_when_it_tries_again() {
    let store = MemKv::new();
    let (a, a_kv, b, room, sub) = two_brokers(&store).await;
    let handle = tokio::runtime::Handle::current();
    let (b2, ev) = (b.clone(), keyed(&room));
    let (tx, rx) = std::sync::mpsc::channel();
    *a_kv.before_commit.lock().unwrap() = Some(Box::new(move || {
        // On `a`'s writer thread, which is no tokio worker: `b`'s writer is another thread.
        let _ = tx.send(handle.block_on(b2.publish(ev)));
    }));
    let lost = a.publish(keyed(&room)).await;
    assert!(
        matches!(lost, Err(Error::StorageConflict { .. })),
        "{lost:?}"
    );
    let first = rx.recv().unwrap().unwrap();
    assert_eq!(first.sequence.0, 1);
    let again = a.publish(keyed(&room)).await.unwrap();
    assert_eq!(again.sequence.0, 2);
    let pulled = a.pull(sub, 100, None, 0).await.unwrap();
    let ids: Vec<_> = pulled.iter().map(|m| m.event.id).collect();
    assert_eq!(ids, vec![first.id, again.id], "two events at two positions");
    a.close().await;
    b.close().await;
}
