//! Tests of what the engine makes durable (issue 15, item 7): a commit of leases and pullers'
//! settles alone is volatile (a crash may undo it: its messages are then offered again),
//! everything else waits for the disk, a long run of volatile commits is broken by a durable
//! one, an idle writer makes them durable, and an ordered key's next delivery goes out only
//! once the settle before it is durable; and an ack id of a lease a crash undid does not
//! settle the lease granted after it.

use std::sync::{Arc, Mutex};

use super::VOLATILE_RUN_MAX;
use crate::broker::Broker;
use crate::clock::{ManualClock, Timestamp};
use crate::config::Config;
use crate::error::Result;
use crate::storage::kv::{Batch, KvStore, Snapshot};
use crate::storage::parse_ack_id;
use crate::storage::MemKv;
use crate::testkit::TestRoom;

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
    fn sync(&self) -> Result<()> {
        self.inner.sync()
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

/// A broker over `kv` with one approved Room, its event type and an unordered pull
/// subscription.
async fn broker_with_pull(kv: Arc<dyn KvStore>) -> (Broker, Fixture) {
    let broker = open(kv);
    let room = TestRoom::create(&broker).await;
    // Without ordering, so that every published event may be out at once.
    let sub = room.pull_subscription(&broker, false).await;
    (broker, Fixture { room, sub })
}

/// What [`broker_with_pull`] made.
struct Fixture {
    room: TestRoom,
    sub: crate::SubscriptionId,
}

impl Fixture {
    async fn publish(&self, broker: &Broker) {
        broker.publish(self.room.event()).await.unwrap();
    }
}

#[tokio::test]
async fn leases_alone_commit_without_waiting_for_the_disk_and_nothing_else_does() {
    let kv = Arc::new(Recording {
        inner: MemKv::new(),
        commits: Mutex::new(Vec::new()),
    });
    let (broker, f) = broker_with_pull(kv.clone()).await;
    let sub = f.sub;
    let total = VOLATILE_RUN_MAX as usize + 4;
    for _ in 0..total - 2 {
        f.publish(&broker).await;
    }
    assert!(
        kv.take().iter().all(|v| !v),
        "setting up and publishing wait for the disk"
    );

    let first = broker.pull(sub, 1, None, 0).await.unwrap();
    assert_eq!(
        kv.take(),
        vec![false],
        "the first lease of a boot stores its epoch, durably"
    );
    let second = broker.pull(sub, 1, None, 0).await.unwrap();
    assert_eq!(kv.take(), vec![true], "a lease is volatile");
    let acked = broker
        .ack(sub, &[first[0].ack_id.clone(), second[0].ack_id.clone()])
        .await
        .unwrap();
    assert!(acked.iter().all(|r| r.is_ok()));
    assert_eq!(
        kv.take(),
        vec![true],
        "a puller's acknowledgement is volatile"
    );
    // A publish makes it durable (and starts a new run).
    f.publish(&broker).await;
    assert_eq!(kv.take(), vec![false], "a publish is durable");

    // A long run of leases alone: one in every VOLATILE_RUN_MAX + 1 is made durable.
    for _ in 3..total {
        assert_eq!(broker.pull(sub, 1, None, 0).await.unwrap().len(), 1);
    }
    let run = kv.take();
    assert_eq!(run.len(), total - 3);
    let durable: Vec<usize> = (0..run.len()).filter(|&i| !run[i]).collect();
    assert_eq!(durable, vec![VOLATILE_RUN_MAX as usize], "{run:?}");
    // A pull that finds nothing writes nothing.
    assert!(broker.pull(sub, 1, None, 0).await.unwrap().is_empty());
    assert!(kv.take().is_empty());
    broker.close().await;
}

/// A backend that can crash: `durable` holds what a crash keeps (every durable commit, and the
/// volatile ones before it); reads see every commit until the crash, and after it nothing more
/// is written through this handle.
struct Crashable {
    live: MemKv,
    durable: MemKv,
    volatile: Mutex<Vec<Batch>>,
    crashed: std::sync::atomic::AtomicBool,
}

impl KvStore for Crashable {
    fn snapshot(&self) -> Result<Arc<dyn Snapshot>> {
        self.live.snapshot()
    }
    fn commit(&self, batch: Batch) -> Result<()> {
        if self.crashed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(crate::error::Error::Storage("crashed".into()));
        }
        self.live.commit(batch.clone())?;
        let mut volatile = self.volatile.lock().unwrap();
        if batch.volatile {
            if !batch.is_empty() {
                volatile.push(batch);
            }
        } else {
            for b in volatile.drain(..) {
                self.durable.commit(b)?;
            }
            self.durable.commit(batch)?;
        }
        Ok(())
    }
    fn sync(&self) -> Result<()> {
        self.commit(Batch::default())
    }
    fn kind(&self) -> &'static str {
        "crashable"
    }
    /// Like redb reopening its file after an I/O error: pending volatile commits are lost.
    fn recover(&self) -> Result<()> {
        self.volatile.lock().unwrap().clear();
        self.live.restore_from(&self.durable);
        Ok(())
    }
}

impl Crashable {
    fn new() -> Arc<Crashable> {
        Arc::new(Crashable {
            live: MemKv::new(),
            durable: MemKv::new(),
            volatile: Mutex::new(Vec::new()),
            crashed: Default::default(),
        })
    }
}

/// Issue 15, item 7 (volatile leases): a crash may undo a lease, and the message's next lease
/// then has the same attempt number. Its ack id must still differ, so that the puller that
/// held the lost lease cannot settle the new one; and a lease kept across a clean restart is
/// still settled by the ack id it was granted with. Before leases carried the engine's boot
/// number, both leases were `0-1` and the old ack id acknowledged the new lease.
#[tokio::test]
async fn an_ack_id_from_before_a_crash_does_not_settle_the_lease_granted_after_it() {
    let kv = Crashable::new();
    let (broker, f) = broker_with_pull(kv.clone()).await;
    let before = volatile_lease(&broker, &f).await;
    // The crash: the lease was volatile and is lost.
    kv.crashed.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(broker);
    let durable: Arc<dyn KvStore> = Arc::new(kv.durable.clone());
    let broker = open(durable.clone());
    let after = lost_lease_offered_again(&broker, &f, &before).await;
    // A clean restart keeps the lease, and its ack id still settles it.
    broker.close().await;
    let broker = open(durable);
    let acked = broker.ack(f.sub, &[after[0].ack_id.clone()]).await.unwrap();
    assert!(acked[0].is_ok(), "{acked:?}");
    assert!(broker.pull(f.sub, 1, None, 0).await.unwrap().is_empty());
    broker.close().await;
}

/// A broker over `kv`, on a manual clock, without retention sweeps, whose writer makes volatile
/// commits durable only after an hour (so that what a crash undoes does not depend on timing).
fn open(kv: Arc<dyn KvStore>) -> Broker {
    open_syncing_within(kv, 3_600_000)
}

/// The same, with the writer's `volatile_sync_ms`.
fn open_syncing_within(kv: Arc<dyn KvStore>, volatile_sync_ms: u64) -> Broker {
    let mut config = Config::default();
    config.retention.interval_ms = 0;
    config.writer.volatile_sync_ms = volatile_sync_ms;
    let clock = Arc::new(ManualClock::new(Timestamp(1_767_225_600_000)));
    Broker::open_over_kv(kv, config, clock).unwrap()
}

/// The same when no process restarts: a commit fails, and the writer asks the backend to
/// recover (redb reopens its file, which loses pending volatile commits). Before the epoch was
/// raised on recovery too, the lease granted after it had the lost lease's ack id.
#[tokio::test]
async fn an_ack_id_from_before_a_reopen_after_a_failed_commit_does_not_settle_the_next_lease() {
    let kv = Crashable::new();
    let (broker, f) = broker_with_pull(kv.clone()).await;
    let before = volatile_lease(&broker, &f).await;
    // The ack's commit fails; the next write finds the writer failing and recovers first.
    broker.storage_faults().fail_next_commits(1);
    let failed = broker.ack(f.sub, &[before[0].ack_id.clone()]).await;
    assert!(
        matches!(failed, Err(crate::Error::StorageUnavailable { .. })),
        "{failed:?}"
    );
    let after = lost_lease_offered_again(&broker, &f, &before).await;
    let acked = broker.ack(f.sub, &[after[0].ack_id.clone()]).await.unwrap();
    assert!(acked[0].is_ok(), "{acked:?}");
    broker.close().await;
}

/// A volatile lease: one event is published, leased and acknowledged first, so that the
/// boot's epoch is stored (by its first lease, durably); then a second is published and leased.
async fn volatile_lease(broker: &Broker, f: &Fixture) -> Vec<crate::PulledMessage> {
    f.publish(broker).await;
    let first = broker.pull(f.sub, 1, None, 0).await.unwrap();
    let acked = broker.ack(f.sub, &[first[0].ack_id.clone()]).await.unwrap();
    assert!(acked[0].is_ok());
    f.publish(broker).await;
    let leased = broker.pull(f.sub, 1, None, 0).await.unwrap();
    assert_eq!(leased.len(), 1);
    leased
}

/// After the lease `before` was lost: the message is offered again at once under the same
/// attempt number, with another ack id, and `before`'s ack id settles nothing.
async fn lost_lease_offered_again(
    broker: &Broker,
    f: &Fixture,
    before: &[crate::PulledMessage],
) -> Vec<crate::PulledMessage> {
    let after = broker.pull(f.sub, 1, None, 0).await.unwrap();
    assert_eq!(after.len(), 1, "the lost lease is offered again at once");
    assert_eq!(after[0].event.id, before[0].event.id);
    assert_eq!(
        after[0].attempt, before[0].attempt,
        "the same attempt number"
    );
    assert_ne!(after[0].ack_id, before[0].ack_id);
    let stale = broker
        .ack(f.sub, &[before[0].ack_id.clone()])
        .await
        .unwrap();
    assert!(
        matches!(stale[0], Err(crate::Error::LeaseNotHeld { .. })),
        "{stale:?}"
    );
    after
}

/// Opening a store writes nothing (a broker starts on a full disk), and the epoch is raised
/// for each boot all the same.
#[tokio::test]
async fn opening_writes_nothing_and_each_boot_leases_under_a_new_epoch() {
    let kv = Arc::new(Recording {
        inner: MemKv::new(),
        commits: Mutex::new(Vec::new()),
    });
    let (broker, f) = broker_with_pull(kv.clone()).await;
    f.publish(&broker).await;
    let first = broker.pull(f.sub, 1, None, 0).await.unwrap();
    broker.close().await;
    kv.take();
    let broker = open(kv.clone());
    assert!(kv.take().is_empty(), "opening wrote");
    f.publish(&broker).await;
    let second = broker.pull(f.sub, 2, None, 0).await.unwrap();
    let epoch = |id: &str| parse_ack_id(id).unwrap().epoch.unwrap();
    assert_eq!(second.len(), 1, "the first lease is still held");
    assert!(epoch(&second[0].ack_id) > epoch(&first[0].ack_id));
    broker.close().await;
}

/// What a crash keeps of `kv`: a broker over its durable copy.
fn after_crash(kv: &Crashable, broker: Broker) -> Broker {
    kv.crashed.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(broker);
    open(Arc::new(kv.durable.clone()))
}

/// A pull subscription of a new Room over `broker`, ordered or not.
async fn pull_subscription(broker: &Broker, ordered: bool) -> (TestRoom, crate::SubscriptionId) {
    let room = TestRoom::create(broker).await;
    let sub = room.pull_subscription(broker, ordered).await;
    (room, sub)
}

/// A puller's ack is volatile: a crash may undo it, and the message is then still owed (it is
/// offered again when its lease runs out: at least once), never lost.
#[tokio::test]
async fn a_crash_may_undo_an_ack_and_the_message_is_then_still_owed() {
    let kv = Crashable::new();
    let (broker, f) = broker_with_pull(kv.clone()).await;
    f.publish(&broker).await;
    let leased = broker.pull(f.sub, 1, None, 0).await.unwrap();
    let acked = broker
        .ack(f.sub, &[leased[0].ack_id.clone()])
        .await
        .unwrap();
    assert!(acked[0].is_ok());
    assert_eq!(broker.subscription(f.sub).unwrap().backlog, 0);
    let broker = after_crash(&kv, broker);
    assert_eq!(
        broker.subscription(f.sub).unwrap().backlog,
        1,
        "the undone ack left the message owed"
    );
    broker.close().await;
}

/// Per-key order holds across a crash that undoes a volatile ack: the lease of the key's next
/// event is committed durably, taking the ack with it, so a crash cannot bring back the first
/// event after the second went out. Without that rule the lease was volatile too: after the
/// crash the first event was owed again and the second's lease was gone.
#[tokio::test]
async fn an_ordered_key_s_next_event_goes_out_only_once_the_ack_before_it_is_durable() {
    let kv = Crashable::new();
    let broker = open(kv.clone());
    let (room, sub) = pull_subscription(&broker, true).await;
    for _ in 0..2 {
        let mut e = room.event();
        e.ordering_key = Some("k".into());
        broker.publish(e).await.unwrap();
    }
    let first = broker.pull(sub, 2, None, 0).await.unwrap();
    assert_eq!(first.len(), 1, "one event of the key at a time");
    let acked = broker.ack(sub, &[first[0].ack_id.clone()]).await.unwrap();
    assert!(acked[0].is_ok());
    assert_eq!(kv.volatile.lock().unwrap().len(), 1, "the ack is volatile");
    let second = broker.pull(sub, 2, None, 0).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_ne!(second[0].event.id, first[0].event.id);
    let broker = after_crash(&kv, broker);
    assert_eq!(
        broker.subscription(sub).unwrap().backlog,
        1,
        "only the second event is still owed"
    );
    let acked = broker.ack(sub, &[second[0].ack_id.clone()]).await.unwrap();
    assert!(acked[0].is_ok(), "the second lease survived: {acked:?}");
    broker.close().await;
}

/// A broker over `kv` syncing within `volatile_sync_ms`, with an unordered pull subscription
/// that has two events leased (durably: the boot's first lease stores its epoch) and the first
/// of them acknowledged.
async fn two_leased_one_acked(
    kv: &Arc<Crashable>,
    volatile_sync_ms: u64,
) -> (Broker, crate::SubscriptionId) {
    let broker = open_syncing_within(kv.clone(), volatile_sync_ms);
    let (room, sub) = pull_subscription(&broker, false).await;
    for _ in 0..2 {
        broker.publish(room.event()).await.unwrap();
    }
    let leased = broker.pull(sub, 2, None, 0).await.unwrap();
    let acked = broker.ack(sub, &[leased[0].ack_id.clone()]).await.unwrap();
    assert!(acked[0].is_ok());
    (broker, sub)
}

/// The writer makes a volatile commit durable within `volatile_sync_ms` by itself, however busy
/// it is with jobs that write nothing (pulls that find nothing: before, each of them put the
/// sync off again, forever), so that what a crash can undo is bounded in time; with
/// `volatile_sync_ms` zero an ack is durable before its reply.
#[tokio::test]
async fn the_writer_makes_volatile_commits_durable_within_volatile_sync_ms() {
    for volatile_sync_ms in [20, 0] {
        let kv = Crashable::new();
        let (broker, sub) = two_leased_one_acked(&kv, volatile_sync_ms).await;
        if volatile_sync_ms == 0 {
            assert!(
                kv.volatile.lock().unwrap().is_empty(),
                "with volatile_sync_ms 0 the ack was durable before its reply"
            );
        } else {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !kv.volatile.lock().unwrap().is_empty() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the busy writer never made the ack durable"
                );
                assert!(broker.pull(sub, 1, None, 0).await.unwrap().is_empty());
            }
        }
        let broker = after_crash(&kv, broker);
        assert_eq!(
            broker.subscription(sub).unwrap().backlog,
            1,
            "volatile_sync_ms {volatile_sync_ms}: the ack survived"
        );
        broker.close().await;
    }
}

/// A sync that fails (the disk is full) marks the broker not ready like a failed commit, and
/// the next one that succeeds, after the backend recovered, marks it ready again (before, only
/// a later write did). The recovery (redb reopens its file) drops what was volatile: the
/// answered ack is undone and its message is owed again (at least once).
#[tokio::test]
async fn a_failed_sync_marks_the_broker_unready_until_a_sync_succeeds() {
    let kv = Crashable::new();
    let (broker, sub) = two_leased_one_acked(&kv, 20).await;
    // The next write to storage is the writer's sync of the ack, due 20 ms from it.
    broker.storage_faults().fail_next_commits(1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let wait = |want_ready: bool| {
        let broker = broker.clone();
        async move {
            while broker.unready_reasons().is_empty() != want_ready {
                assert!(
                    std::time::Instant::now() < deadline,
                    "never {}: {:?}",
                    if want_ready { "ready" } else { "unready" },
                    broker.unready_reasons()
                );
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        }
    };
    wait(false).await;
    assert_eq!(
        broker.storage_faults().commits_failed(),
        1,
        "the sync failed"
    );
    wait(true).await;
    assert_eq!(
        broker.subscription(sub).unwrap().backlog,
        2,
        "the recovery undid the answered ack"
    );
    broker.close().await;
}
