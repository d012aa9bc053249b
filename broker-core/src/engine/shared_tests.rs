//! Tests of a store shared by several brokers (issue 15, item 2: positions and sequences that
//! do not assume one process numbering a dense local log). Two brokers over one in-memory
//! store that says it is shared: neither hands out a Room position or a key's sequence that
//! the other already did, whether they take turns or race.

use std::sync::{Arc, Mutex};

use crate::broker::Broker;
use crate::clock::{ManualClock, Timestamp};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::storage::kv::{Batch, KvStore, Snapshot, Space};
use crate::storage::MemKv;
use crate::testkit::TestRoom;

/// A work to run before the next commit through one handle.
pub(super) type Hook = Box<dyn FnOnce() + Send>;

/// One broker's handle on a store shared with others: every handle's `inner` is the same map.
pub(super) struct SharedKv {
    inner: MemKv,
    /// Run (once) at the start of this handle's next commit: another broker's write landing
    /// between this broker's snapshot and its commit.
    pub(super) before_commit: Mutex<Option<Hook>>,
    /// Commits through this handle still to pass before one is refused as a lost race (as
    /// if another broker had written a key it writes); `None`: none is.
    conflict_after: Mutex<Option<usize>>,
    /// Set: every commit through this handle fails, as when this node cannot reach the
    /// database.
    pub(super) unreachable: std::sync::atomic::AtomicBool,
}

impl SharedKv {
    pub(super) fn over(inner: &MemKv) -> Arc<SharedKv> {
        Arc::new(SharedKv {
            inner: inner.clone(),
            before_commit: Mutex::new(None),
            conflict_after: Mutex::new(None),
            unreachable: Default::default(),
        })
    }
}

impl KvStore for SharedKv {
    fn snapshot(&self) -> Result<Arc<dyn Snapshot>> {
        self.inner.snapshot()
    }
    fn commit(&self, batch: Batch) -> Result<()> {
        if self.unreachable.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Storage(
                "injected: the database cannot be reached".into(),
            ));
        }
        let hook = self.before_commit.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        {
            let mut after = self.conflict_after.lock().unwrap();
            match *after {
                Some(0) => {
                    *after = None;
                    return Err(Error::StorageConflict {
                        detail: "injected: another broker wrote first".into(),
                    });
                }
                Some(n) if !batch.is_empty() => *after = Some(n - 1),
                _ => {}
            }
        }
        self.inner.commit(batch)
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn shared(&self) -> bool {
        true
    }
    fn take_notices(&self) -> Option<tokio::sync::mpsc::Receiver<String>> {
        self.inner.take_notices()
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
    let sub = room.pull_subscription(&a, false).await;
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

/// Issue 16: a subscription's counts are not one row every node writes. Broker `b` publishes
/// to the subscription between broker `a`'s snapshot and its commit of an ack: before, both
/// wrote the subscription's backlog row, so `a`'s ack lost the race (`storage_conflict`; with
/// several nodes publishing, push outcomes and lease renewals kept losing, and pushes waited
/// seconds). Now each node writes its own share of the counts, the ack commits, and the counts
/// read back are the sum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_on_one_node_does_not_lose_a_race_to_a_publish_on_another() {
    let store = MemKv::new();
    let (a, a_kv, b, room, sub) = two_brokers(&store).await;
    a.publish(room.event()).await.unwrap();
    a.publish(room.event()).await.unwrap();
    let pulled = a.pull(sub, 1, None, 0).await.unwrap();
    assert_eq!(a.subscription(sub).unwrap().backlog, 2);
    let handle = tokio::runtime::Handle::current();
    let (b2, ev) = (b.clone(), room.event());
    let (tx, rx) = std::sync::mpsc::channel();
    *a_kv.before_commit.lock().unwrap() = Some(Box::new(move || {
        let _ = tx.send(handle.block_on(b2.publish(ev)));
    }));
    let acked = a.ack(sub, &[pulled[0].ack_id.clone()]).await;
    rx.recv().unwrap().expect("b's publish");
    let acked = acked.expect("the ack commits: it shares no row with b's publish");
    assert!(acked[0].is_ok(), "{acked:?}");
    for node in [&a, &b] {
        assert_eq!(
            node.subscription(sub).unwrap().backlog,
            2,
            "one acked, one published"
        );
    }
    assert_eq!(a.pull(sub, 10, None, 0).await.unwrap().len(), 2);
    a.close().await;
    b.close().await;
}

/// The shares of a node that left (it closed: no longer alive) are moved into the
/// subscription's row by the next retention sweep on another node, so that shares stay one
/// per live node although a node draws a new id each time it starts; the counts read the same
/// before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counts_share_of_a_node_that_left_is_folded_into_the_row() {
    use std::ops::Bound;
    let store = MemKv::new();
    let (a, _, b, room, sub) = two_brokers(&store).await;
    for _ in 0..3 {
        b.publish(room.event()).await.unwrap();
    }
    a.publish(room.event()).await.unwrap();
    let shares = || {
        store
            .snapshot()
            .unwrap()
            .range(
                Space::SubStatsShare,
                Bound::Unbounded,
                Bound::Unbounded,
                crate::storage::kv::Order::Ascending,
                100,
            )
            .unwrap()
            .len()
    };
    assert_eq!(shares(), 2, "one share per node");
    b.close().await;
    drop(b);
    a.sweep_retention().await.unwrap();
    assert_eq!(shares(), 1, "b's share folded into the row, a's kept");
    assert_eq!(a.subscription(sub).unwrap().backlog, 4);
    assert_eq!(a.pull(sub, 10, None, 0).await.unwrap().len(), 4);
    a.close().await;
}

/// The write skew the shared counts above would open without per-key versions: on an ordered
/// subscription, broker `b` publishes the key's next event between broker `a`'s snapshot and
/// its commit of the ack of the key's head. `a`'s snapshot shows no next event, so its ack
/// removes the key's head; `b`'s publish, which saw a head, only queued behind it. Both
/// committed, the next event had no head and was never offered (it would wait for a restart).
/// Now both bump the key's version: `a`'s ack loses the race and, tried again, moves the head
/// to the next event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_s_next_event_published_on_another_node_while_its_head_is_acked_is_offered() {
    let store = MemKv::new();
    let (a, a_kv, b, room, _) = two_brokers(&store).await;
    let sub = room.pull_subscription(&a, true).await;
    let first = a.publish(keyed(&room)).await.unwrap();
    let pulled = a.pull(sub, 1, None, 0).await.unwrap();
    assert_eq!(pulled[0].event.id, first.id);
    let handle = tokio::runtime::Handle::current();
    let (b2, ev) = (b.clone(), keyed(&room));
    let (tx, rx) = std::sync::mpsc::channel();
    *a_kv.before_commit.lock().unwrap() = Some(Box::new(move || {
        let _ = tx.send(handle.block_on(b2.publish(ev)));
    }));
    let mut tries = 0;
    loop {
        tries += 1;
        match a.ack(sub, &[pulled[0].ack_id.clone()]).await {
            Ok(r) => {
                assert!(r[0].is_ok(), "{r:?}");
                break;
            }
            Err(Error::StorageConflict { .. }) if tries < 10 => continue,
            Err(e) => panic!("ack: {e}"),
        }
    }
    let next = rx.recv().unwrap().expect("b's publish");
    let offered = a.pull(sub, 10, None, 0).await.unwrap();
    assert_eq!(
        offered.iter().map(|m| m.event.id).collect::<Vec<_>>(),
        vec![next.id],
        "the key's next event is offered (backlog {})",
        a.subscription(sub).unwrap().backlog
    );
    a.close().await;
    b.close().await;
}

/// Opening writes the store's markers (on an empty store) and ends seeks a restart
/// interrupted; with a shared store that commit is fenced too. Another broker that opened and
/// made a Room between this one's snapshot and its commit wins the race: this opening's commit
/// is refused instead of writing the Room counter back to 1 (two Rooms would then have shared
/// an id, a log and counters), and the opening reads again and commits (nodes started together
/// all start; `pg_tests` races real ones).
#[tokio::test]
async fn opening_a_shared_store_is_fenced_like_any_other_commit() {
    let store = MemKv::new();
    let b_kv = SharedKv::over(&store);
    let a_store = store.clone();
    *b_kv.before_commit.lock().unwrap() = Some(Box::new(move || {
        // On a thread of its own: this runs inside `open` on the test's runtime thread.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let a = open(SharedKv::over(&a_store));
                TestRoom::create(&a).await;
                a.close().await;
            });
        })
        .join()
        .unwrap();
    }));
    let b = open(b_kv.clone());
    assert!(
        b_kv.before_commit.lock().unwrap().is_none(),
        "the other broker committed during this opening"
    );
    // The Room the other broker made is intact, and a Room made now has an id of its own:
    // events published to one are not counted in the other.
    let r = crate::RoomName::new("r").unwrap();
    assert_eq!(b.room(&r).unwrap().events_stored, 0);
    let s = crate::RoomName::new("s").unwrap();
    b.create_room(
        crate::NewRoom::new(s.clone(), crate::Principal::new("admin").unwrap()).approved(),
    )
    .await
    .unwrap();
    let room = TestRoom {
        room: r.clone(),
        ty: crate::EventTypeName::new("t").unwrap(),
        admin: crate::Principal::new("admin").unwrap(),
    };
    b.publish(room.event()).await.unwrap();
    assert_eq!(b.room(&r).unwrap().events_stored, 1);
    assert_eq!(
        b.room(&s).unwrap().events_stored,
        0,
        "the two Rooms share an id"
    );
    b.close().await;
}

/// A seek is several writes; one of them losing a race with another broker is tried again
/// like an overloaded writer's refusal, so the seek completes and the subscription is let go.
/// Before, a conflict on the step that ends the seek left the subscription seeking (handing
/// out nothing) until a restart.
#[tokio::test]
async fn a_seek_step_that_loses_a_race_is_tried_again() {
    // Each write of the seek in turn, until one past its last.
    for step in 0.. {
        let store = MemKv::new();
        let (a, a_kv, b, room, sub) = two_brokers(&store).await;
        a.publish(room.event()).await.unwrap();
        let got = a.pull(sub, 1, None, 0).await.unwrap();
        assert!(a.ack(sub, &[got[0].ack_id.clone()]).await.unwrap()[0].is_ok());
        *a_kv.conflict_after.lock().unwrap() = Some(step);
        let queued = a.seek(sub, crate::SeekTarget::Oldest).await;
        assert_eq!(queued.ok(), Some(1), "conflict at write {step} of the seek");
        if a_kv.conflict_after.lock().unwrap().take().is_some() {
            assert!(step >= 3, "a seek is at least three writes");
            a.close().await;
            b.close().await;
            break;
        }
        let again = a.pull(sub, 1, None, 0).await.unwrap();
        assert_eq!(
            again.len(),
            1,
            "conflict at write {step}: the subscription was let go"
        );
        a.close().await;
        b.close().await;
    }
}

/// Two brokers that opened the same shared store lease under different epochs, so that an
/// ack id one of them issued can never name a lease of the other's boot. Before, each took
/// one more than the stored epoch at its open (the same number) and stored it blind.
#[tokio::test]
async fn brokers_sharing_a_store_lease_under_different_epochs() {
    let store = MemKv::new();
    let (a, _, b, room, sub) = two_brokers(&store).await;
    for _ in 0..2 {
        a.publish(room.event()).await.unwrap();
    }
    let from_a = a.pull(sub, 1, None, 0).await.unwrap();
    let from_b = b.pull(sub, 1, None, 0).await.unwrap();
    let epoch = |id: &str| crate::storage::parse_ack_id(id).unwrap().epoch.unwrap();
    assert_ne!(epoch(&from_a[0].ack_id), epoch(&from_b[0].ack_id));
    a.close().await;
    b.close().await;
}

/// A configuration change made at run time through one node holds on every node sharing the
/// store: another running node adopts it at its next discovery round (every half push lease:
/// 500 ms here), a node opened later starts with it, and a change made through the second node
/// keeps the first node's (each patch changes the values all nodes share). Before, a change
/// held on the node that took it only, so the same request behind a load balancer met
/// different limits depending on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_change_on_one_node_holds_on_every_node() {
    use crate::runtime::{ConfigPatch, DeliveryPatch, LimitsPatch};
    let store = MemKv::new_shared();
    let open = |kv: Arc<SharedKv>| {
        let mut config = Config::default();
        config.retention.interval_ms = 0;
        config.delivery.dispatch_lease_ms = 1_000;
        Broker::open_over_kv(kv, config, Arc::new(crate::clock::SystemClock)).unwrap()
    };
    let a = open(SharedKv::over(&store));
    let b = open(SharedKv::over(&store));
    let default_payload = Config::default().limits.payload_bytes_max;
    let limits = ConfigPatch {
        limits: Some(LimitsPatch {
            payload_bytes_max: Some(2048),
            ..Default::default()
        }),
        ..Default::default()
    };
    a.reconfigure(&limits).await.expect("patch on a");
    assert_eq!(a.config().limits.payload_bytes_max, 2048);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while b.config().limits.payload_bytes_max != 2048 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b still has payload_bytes_max {} (default {default_payload})",
            b.config().limits.payload_bytes_max
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // A change through b builds on a's: both hold, on both nodes and on a node opened now.
    let delivery = ConfigPatch {
        delivery: Some(DeliveryPatch {
            pull_messages_max: Some(7),
            ..Default::default()
        }),
        ..Default::default()
    };
    b.reconfigure(&delivery).await.expect("patch on b");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while a.config().delivery.pull_messages_max != 7 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a never adopted b's change"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let c = open(SharedKv::over(&store));
    for (name, node) in [("a", &a), ("b", &b), ("c", &c)] {
        let config = node.config();
        assert_eq!(
            (
                config.limits.payload_bytes_max,
                config.delivery.pull_messages_max
            ),
            (2048, 7),
            "node {name}"
        );
    }
    // A node whose own bounds the stored values do not fit keeps its values and refuses
    // changes, rather than storing its own values over the change it could not adopt.
    let mut narrow = Config::default();
    narrow.retention.interval_ms = 0;
    narrow.delivery.in_flight_max_max = 1;
    narrow.delivery.in_flight_max_default = 1;
    let d = Broker::open_over_kv(
        SharedKv::over(&store),
        narrow,
        Arc::new(crate::clock::SystemClock),
    )
    .unwrap();
    assert_eq!(d.config().limits.payload_bytes_max, default_payload);
    let e = d.reconfigure(&stale_patch()).await.unwrap_err();
    assert!(e.to_string().contains("cannot adopt"), "{e}");
    // Nothing new was stored: c, which had adopted the latest version, finds none.
    assert!(!c.adopt_runtime_config().await.expect("adopt"));
    assert_eq!(
        c.config().idempotency_window_ms,
        Config::default().idempotency_window_ms
    );
    for node in [a, b, c, d] {
        node.close().await;
    }
}

fn stale_patch() -> crate::runtime::ConfigPatch {
    crate::runtime::ConfigPatch {
        idempotency_window_ms: Some(1_000),
        ..Default::default()
    }
}
