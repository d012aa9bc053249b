//! Tests of push leases on a store several brokers share (issue 16, item 3): two brokers over
//! one in-memory store that says it is shared, each pushing through a transport that records
//! which broker pushed which event and when. One node pushes a subscription at a time; when it
//! dies, the other takes it over once its lease ends; an outcome pushed under a lease that is
//! no longer current is never recorded, whether the takeover came before its transaction read
//! the lease or in the middle of it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::shared_tests::SharedKv;
use crate::broker::Broker;
use crate::clock::{ManualClock, Timestamp};
use crate::config::Config;
use crate::error::Error;
use crate::ownership::Claim;
use crate::storage::kv::{Batch, KvStore, Put, Space};
use crate::storage::txn::key_bytes;
use crate::storage::{Busy, DeliveryOp, MemKv, WriteOp, WriteOutput};
use crate::subscription::{DeliveryMode, NewSubscription, PushEndpoint};
use crate::testkit::TestRoom;
use crate::webhook::{PushRequest, PushResponse, Transport};
use crate::SubscriptionId;

/// (broker, event id, the shared clock's time) of every push, in the order they were sent.
type PushLog = Arc<Mutex<Vec<(&'static str, String, u64)>>>;

/// Answers every push with 200 at once and logs it.
struct Recorder {
    name: &'static str,
    log: PushLog,
    clock: Arc<ManualClock>,
}

impl Transport for Recorder {
    fn send(
        &self,
        request: PushRequest,
    ) -> Pin<Box<dyn Future<Output = PushResponse> + Send + '_>> {
        let id = webhook_id(&request);
        use crate::clock::Clock;
        let at = self.clock.now().as_ms();
        self.log.lock().unwrap().push((self.name, id, at));
        Box::pin(async {
            PushResponse {
                status: Some(200),
                retry_after_ms: None,
                error: None,
                latency_ms: 1,
            }
        })
    }
}

/// The event id a push carries (its `webhook-id`).
fn webhook_id(request: &PushRequest) -> String {
    request
        .headers
        .iter()
        .find(|(k, _)| k == "webhook-id")
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

const T0: u64 = 1_767_225_600_000;

/// Dispatchers tick once a minute here: what reaches a node promptly reaches it through the
/// other node's notice (`remote_wake.rs`) or its own commits, not through the tick.
fn config() -> Config {
    let mut config = Config::default();
    config.retention.interval_ms = 0;
    config.delivery.push_allow.loopback = true;
    config.delivery.scheduler_tick_ms = 60_000;
    config
}

/// A broker named `name` over `store`, pushing into `log`.
fn node(store: &MemKv, name: &'static str, clock: &Arc<ManualClock>, log: &PushLog) -> Broker {
    node_over(SharedKv::over(store), name, clock, log)
}

fn node_over(
    kv: Arc<SharedKv>,
    name: &'static str,
    clock: &Arc<ManualClock>,
    log: &PushLog,
) -> Broker {
    let transport = Arc::new(Recorder {
        name,
        log: log.clone(),
        clock: clock.clone(),
    });
    Broker::open_over_kv_with(kv, config(), clock.clone(), Some(transport)).expect("broker")
}

async fn push_subscription(broker: &Broker, room: &TestRoom) -> SubscriptionId {
    let mut new = NewSubscription::new(
        room.admin.clone(),
        DeliveryMode::Push(PushEndpoint {
            url: "http://127.0.0.1:9/hook".into(),
            headers: vec![],
            basic_auth: None,
        }),
    );
    new.ordered = Some(true);
    broker
        .create_subscription(&room.room, new)
        .await
        .expect("push subscription")
        .subscription
        .id
}

/// One shared store with a broker `a` on it, a Room and an ordered push subscription made on
/// `a`; the clock and push log every broker of the test shares.
struct Setup {
    store: MemKv,
    clock: Arc<ManualClock>,
    log: PushLog,
    a: Broker,
    room: TestRoom,
    sub: SubscriptionId,
}

impl Setup {
    async fn push() -> Setup {
        let store = MemKv::new_shared();
        let clock = Arc::new(ManualClock::new(Timestamp(T0)));
        let log = PushLog::default();
        let a = node(&store, "a", &clock, &log);
        let room = TestRoom::create(&a).await;
        let sub = push_subscription(&a, &room).await;
        Setup {
            store,
            clock,
            log,
            a,
            room,
            sub,
        }
    }
}

/// Waits (bounded, 20 s: well within the minute-long tick) until nothing is owed on the
/// shared store; the backlog is read from the store, so any broker's view serves. Wakes
/// nobody: the dispatchers must be woken by the commits themselves.
async fn drained(broker: &Broker) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while broker.backlog_total().expect("backlog") > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "deliveries still owed after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Before this, every broker sharing a store pushed every push subscription: a receiver got
/// most events twice, once from each node. Now one node holds the lease and the other pushes
/// nothing, even for the events published through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_at_a_time_pushes_a_subscription() {
    let Setup {
        store,
        clock,
        log,
        a,
        room,
        sub,
    } = Setup::push().await;
    let b = node(&store, "b", &clock, &log);
    let mut published = Vec::new();
    for i in 0..40 {
        let broker = if i % 2 == 0 { &a } else { &b };
        published.push(broker.publish_retrying(&room).await);
    }
    drained(&a).await;
    let pushes = log.lock().unwrap().clone();
    let pushers: std::collections::BTreeSet<&str> = pushes.iter().map(|p| p.0).collect();
    assert_eq!(pushers.len(), 1, "pushed by {pushers:?}");
    let mut ids: Vec<String> = pushes.iter().map(|p| p.1.clone()).collect();
    ids.sort();
    published.sort();
    assert_eq!(ids, published, "each event pushed exactly once");
    let lease = a
        .inner()
        .store
        .dispatch_lease(sub)
        .unwrap()
        .expect("a lease");
    let holder = if pushers.contains("a") { &a } else { &b };
    assert_eq!((lease.node, lease.epoch), (holder.inner().node, 1));
    a.close().await;
    b.close().await;
}

/// The node holding the lease dies (its broker is dropped without closing, so its lease stays
/// stored until it runs out): the other pushes nothing before the lease's end, then takes the
/// subscription over under the next epoch and pushes everything still owed, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_node_takes_over_when_the_lease_of_a_dead_node_runs_out() {
    let Setup {
        store,
        clock,
        log,
        a,
        room,
        sub,
    } = Setup::push().await;
    let first = a.publish_retrying(&room).await;
    drained(&a).await;
    let held = a
        .inner()
        .store
        .dispatch_lease(sub)
        .unwrap()
        .expect("a's lease");
    assert_eq!(held.node, a.inner().node);
    let b = node(&store, "b", &clock, &log);
    drop(a);
    let mut later = Vec::new();
    for _ in 0..5 {
        later.push(b.publish_retrying(&room).await);
    }
    // The lease ends, and the margin for clock skew after it (an eighth of the 8 s lease);
    // b's next look (the test wakes it: the clock is moved by hand) takes it.
    let free = crate::ownership::free_at(&held, 8_000);
    assert_eq!(free, held.until.plus_ms(1_000));
    clock.set(free);
    b.wake_deliveries();
    drained(&b).await;
    let pushes = log.lock().unwrap().clone();
    assert_eq!(pushes[0].1, first);
    let by_b: Vec<_> = pushes.iter().filter(|p| p.0 == "b").collect();
    assert_eq!(
        by_b.iter().map(|p| p.1.clone()).collect::<Vec<_>>(),
        later,
        "b pushes what is owed, in order"
    );
    for p in &by_b {
        assert!(
            p.2 >= free.as_ms(),
            "b pushed at {} before a's lease ended at {}",
            p.2,
            held.until.as_ms()
        );
    }
    let now = b
        .inner()
        .store
        .dispatch_lease(sub)
        .unwrap()
        .expect("b's lease");
    assert_eq!((now.node, now.epoch), (b.inner().node, held.epoch + 1));
    b.close().await;
}

/// A node closing hands its leases over at once: the other node takes the subscription at its
/// next look, without waiting for the lease to run out (the clock does not move here).
/// Whichever node claimed first is the one closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shutting_down_hands_its_subscriptions_over_at_once() {
    let Setup {
        store,
        clock,
        log,
        a,
        room,
        sub,
    } = Setup::push().await;
    let b = node(&store, "b", &clock, &log);
    a.publish_retrying(&room).await;
    drained(&a).await;
    let held = a.inner().store.dispatch_lease(sub).unwrap().expect("lease");
    let (closing, staying, name) = if held.node == a.inner().node {
        (a, b, "b")
    } else {
        assert_eq!(held.node, b.inner().node);
        (b, a, "a")
    };
    closing.close().await;
    // Released at close, or already taken by the other (the release's notice wakes it).
    let after = staying
        .inner()
        .store
        .dispatch_lease(sub)
        .unwrap()
        .expect("lease");
    assert!(
        (after.node, after.until) == (closing.inner().node, Timestamp(0))
            || (after.node, after.epoch) == (staying.inner().node, held.epoch + 1),
        "{after:?}"
    );
    let id = staying.publish_retrying(&room).await;
    drained(&staying).await;
    let last = log.lock().unwrap().last().cloned().expect("a push");
    assert_eq!((last.0, last.1), (name, id));
    let now = staying
        .inner()
        .store
        .dispatch_lease(sub)
        .unwrap()
        .expect("lease");
    assert_eq!(
        (now.node, now.epoch),
        (staying.inner().node, held.epoch + 1)
    );
    staying.close().await;
}

/// The outcome of a push made under a lease that another node has since taken is refused and
/// records nothing: the delivery stays owed, for the new owner to push. Checked twice: with
/// the takeover committed before the outcome's transaction reads the lease, and committed by
/// the other node between that read and the outcome's commit (the lease row is only read by
/// the outcome, so without the guard in its fence it would be recorded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_pushed_under_a_lost_lease_is_never_recorded() {
    let store = MemKv::new_shared();
    let clock = Arc::new(ManualClock::new(Timestamp(T0)));
    let log = PushLog::default();
    let a_kv = SharedKv::over(&store);
    let a = node_over(a_kv.clone(), "a", &clock, &log);
    let room = TestRoom::create(&a).await;
    // A pull subscription's queue stands in for a push queue here: no dispatcher races the
    // hand-made outcomes below.
    let sub = room.pull_subscription(&a, true).await;
    a.publish_retrying(&room).await;
    let claim = |node: u128| {
        WriteOp::Delivery(DeliveryOp::ClaimDispatch {
            id: sub,
            node,
            lease_ms: 8_000,
        })
    };
    let epoch = match a.write_op(claim(a.inner().node)).await.expect("claim") {
        WriteOutput::Dispatch(Claim::Granted(l)) => l.epoch,
        other => panic!("{other:?}"),
    };
    let (due, _) = a
        .inner()
        .store
        .due(sub, clock_now(&clock), &Busy::default(), 10)
        .expect("due");
    let due = due.into_iter().next().expect("one delivery due");
    let outcome = |epoch: u64| {
        WriteOp::Delivery(DeliveryOp::PushOutcome {
            id: sub,
            due: due.clone(),
            response: PushResponse {
                status: Some(200),
                retry_after_ms: None,
                error: None,
                latency_ms: 1,
            },
            lease: Some((a.inner().node, epoch)),
        })
    };

    // 1. Taken over in the middle: another node's commit lands after the outcome's snapshot.
    let other: u128 = 0xB;
    let taken = (other, epoch + 1, T0 + 8_000);
    let kv = store.clone();
    *a_kv.before_commit.lock().unwrap() = Some(Box::new(move || {
        kv.commit(Batch {
            writes: vec![Put {
                space: Space::DispatchLeases,
                key: key_bytes::<u128, _>(&sub.0.as_u128()),
                value: Some(crate::storage::txn::ValueArg::to_bytes(&taken)),
            }],
            expect: vec![],
            volatile: false,
            notify: None,
        })
        .expect("the other node's takeover");
    }));
    match a.write_op(outcome(epoch)).await {
        Err(Error::StorageConflict { .. }) => {}
        other => panic!("an outcome committed over a takeover: {other:?}"),
    }
    assert_eq!(a.backlog_total().unwrap(), 1, "nothing recorded");

    // 2. Taken over before: the outcome's own check refuses it.
    match a.write_op(outcome(epoch)).await {
        Err(Error::DispatchLeaseLost { .. }) => {}
        other => panic!("an outcome under a lost lease: {other:?}"),
    }
    assert_eq!(a.backlog_total().unwrap(), 1, "nothing recorded");
    // And a renewal by the old owner is told who holds it now.
    match a.write_op(claim(a.inner().node)).await.expect("claim") {
        WriteOutput::Dispatch(Claim::HeldBy(l)) => {
            assert_eq!((l.node, l.epoch), (other, epoch + 1))
        }
        other => panic!("{other:?}"),
    }
    // The current owner's outcome is recorded.
    let mine = WriteOp::Delivery(DeliveryOp::PushOutcome {
        id: sub,
        due: due.clone(),
        response: PushResponse {
            status: Some(200),
            retry_after_ms: None,
            error: None,
            latency_ms: 1,
        },
        lease: Some((other, epoch + 1)),
    });
    a.write_op(mine).await.expect("the owner's outcome");
    assert_eq!(a.backlog_total().unwrap(), 0);
    a.close().await;
}

/// Publishing as a client of a node does: a lost race with another node
/// (`storage_conflict`, a 503) is tried again.
trait PublishRetrying {
    async fn publish_retrying(&self, room: &TestRoom) -> String;
}

impl PublishRetrying for Broker {
    async fn publish_retrying(&self, room: &TestRoom) -> String {
        for _ in 0..100 {
            match self.publish(room.event()).await {
                Ok(r) => return r.id.to_string(),
                Err(Error::StorageConflict { .. }) => continue,
                Err(e) => panic!("publish: {e}"),
            }
        }
        panic!("publish lost 100 races in a row")
    }
}

fn clock_now(clock: &Arc<ManualClock>) -> Timestamp {
    use crate::clock::Clock;
    clock.now()
}

/// A long-poll on one node is answered when an event is published through another: the
/// publishing node's notice wakes it. Before notices it waited out its whole wait and answered
/// empty (a long-poll has no tick).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_on_one_node_is_woken_by_a_publish_on_another() {
    let store = MemKv::new_shared();
    let clock = Arc::new(ManualClock::new(Timestamp(T0)));
    let log = PushLog::default();
    let a = node(&store, "a", &clock, &log);
    let room = TestRoom::create(&a).await;
    let sub = room.pull_subscription(&a, true).await;
    let b = node(&store, "b", &clock, &log);
    let ops = b.writer_counters().ops;
    let poll = {
        let b = b.clone();
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let got = b.pull(sub, 1, None, 15_000).await.expect("pull");
            (got, started.elapsed())
        })
    };
    // The poll's first look (a lease that finds nothing) is applied: it now waits, registered
    // for a wake-up since before that look.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while b.writer_counters().ops == ops {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the poll never looked"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let id = a.publish_retrying(&room).await;
    let (got, took) = poll.await.expect("poll task");
    assert_eq!(got.len(), 1, "answered with the event, after {took:?}");
    assert_eq!(got[0].event.id.to_string(), id);
    assert!(took < Duration::from_secs(10), "woken after {took:?}");
    a.close().await;
    b.close().await;
}

/// (broker, event id, what happened: "sent" or "ended", when) of every push, in order.
type StampLog = Arc<Mutex<Vec<(&'static str, String, &'static str, tokio::time::Instant)>>>;

/// Logs each push as it is sent; when `hang`, never answers, and logs when the push is dropped
/// (its request given up).
struct Stamped {
    name: &'static str,
    hang: bool,
    log: StampLog,
}

/// Logs the end of a hanging push when it is dropped.
struct Ended(&'static str, String, StampLog);

impl Drop for Ended {
    fn drop(&mut self) {
        let at = tokio::time::Instant::now();
        self.2
            .lock()
            .unwrap()
            .push((self.0, std::mem::take(&mut self.1), "ended", at));
    }
}

impl Transport for Stamped {
    fn send(
        &self,
        request: PushRequest,
    ) -> Pin<Box<dyn Future<Output = PushResponse> + Send + '_>> {
        let id = webhook_id(&request);
        let at = tokio::time::Instant::now();
        self.log
            .lock()
            .unwrap()
            .push((self.name, id.clone(), "sent", at));
        let ended = self.hang.then(|| Ended(self.name, id, self.log.clone()));
        Box::pin(async move {
            if let Some(ended) = ended {
                std::future::pending::<()>().await;
                drop(ended);
            }
            PushResponse {
                status: Some(200),
                retry_after_ms: None,
                error: None,
                latency_ms: 1,
            }
        })
    }
}

/// Issue 16, item 2: a node that can no longer reach the store cannot renew its lease, and
/// another node takes the subscription over once the lease ends. A push the first node still
/// had under way must not reach the receiver after the new owner's pushes of that key: it is
/// cut short when the lease stops covering it (its end less the clock-skew margin), before the
/// other node may claim it. Before, the hanging push stayed open after the takeover, free to
/// land after the key's next events. On the system clock, with the shortest lease (1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_under_way_ends_before_another_node_takes_the_subscription_over() {
    let store = MemKv::new_shared();
    let clock: Arc<dyn crate::clock::Clock> = Arc::new(crate::clock::SystemClock);
    let log = StampLog::default();
    let mut cfg = config();
    cfg.delivery.dispatch_lease_ms = 1_000;
    let open = |kv: Arc<SharedKv>, name, hang| {
        let transport = Arc::new(Stamped {
            name,
            hang,
            log: log.clone(),
        });
        Broker::open_over_kv_with(kv, cfg.clone(), clock.clone(), Some(transport)).expect("broker")
    };
    let a_kv = SharedKv::over(&store);
    let a = open(a_kv.clone(), "a", true);
    let room = TestRoom::create(&a).await;
    push_subscription(&a, &room).await;
    let first = a.publish_retrying(&room).await;
    let sent = |who: &'static str, id: &str| {
        log.lock()
            .unwrap()
            .iter()
            .find(|e| e.0 == who && e.1 == id && e.2 == "sent")
            .map(|e| e.3)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sent("a", &first).is_none() {
        assert!(tokio::time::Instant::now() < deadline, "a never pushed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // From now on a cannot write: its lease is not renewed.
    a_kv.unreachable
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let b = open(SharedKv::over(&store), "b", false);
    let next = b.publish_retrying(&room).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sent("b", &next).is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b never pushed: {:?}",
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let log = log.lock().unwrap().clone();
    let b_first = sent_at(&log, "b", &first).expect("b pushes the first event again");
    let a_ended = log
        .iter()
        .find(|e| e.0 == "a" && e.1 == first && e.2 == "ended")
        .map(|e| e.3);
    assert!(
        a_ended.is_some_and(|at| at <= b_first),
        "a's push of the key's first event was still under way when b took over: {log:?}"
    );
    assert!(sent_at(&log, "b", &next) >= Some(b_first), "{log:?}");
    b.close().await;
    drop(a);
}

fn sent_at(
    log: &[(&'static str, String, &'static str, tokio::time::Instant)],
    who: &str,
    id: &str,
) -> Option<tokio::time::Instant> {
    log.iter()
        .find(|e| e.0 == who && e.1 == id && e.2 == "sent")
        .map(|e| e.3)
}

/// Push subscriptions are shared out among the live nodes: a node that joins later gets its
/// fair share (here two of four) from the node that claimed them all, which hands leases
/// over at their renewal while events are being published and pushed; the sharing then holds
/// (each node keeps two), and every event published is pushed. Before, the first node kept
/// every subscription until it died. On the system clock, 2 s leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_subscriptions_are_shared_out_among_the_nodes() {
    let store = MemKv::new_shared();
    let clock: Arc<dyn crate::clock::Clock> = Arc::new(crate::clock::SystemClock);
    let log = StampLog::default();
    let mut cfg = config();
    cfg.delivery.dispatch_lease_ms = 2_000;
    let open = |name| {
        let transport = Arc::new(Stamped {
            name,
            hang: false,
            log: log.clone(),
        });
        Broker::open_over_kv_with(
            SharedKv::over(&store),
            cfg.clone(),
            clock.clone(),
            Some(transport),
        )
        .expect("broker")
    };
    let a = open("a");
    let room = TestRoom::create(&a).await;
    let mut subs = Vec::new();
    for _ in 0..4 {
        subs.push(push_subscription(&a, &room).await);
    }
    let count = |node: u128| {
        subs.iter()
            .filter(|s| {
                a.inner()
                    .store
                    .dispatch_lease(**s)
                    .unwrap()
                    .is_some_and(|l| l.node == node && l.until.as_ms() > 0)
            })
            .count()
    };
    let an = a.inner().node;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while count(an) < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a never claimed every subscription"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = open("b");
    let bn = b.inner().node;
    let mut published = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while (count(an), count(bn)) != (2, 2) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b never got its share: a {} b {}",
            count(an),
            count(bn)
        );
        published.insert(a.publish_retrying(&room).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It holds: once both nodes have run two more rounds of sharing out (each round writes
    // the node's alive record with its time), each still has two.
    let said = |node: u128| {
        a.inner()
            .store
            .record(
                crate::storage::RecordKind::Setting,
                &format!("node/{}", uuid::Uuid::from_u128(node)),
            )
            .unwrap()
    };
    for node in [an, bn] {
        let mut rounds = 0;
        let mut last = said(node);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while rounds < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no sharing-out rounds"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = said(node);
            if now != last {
                rounds += 1;
                last = now;
            }
        }
    }
    assert_eq!((count(an), count(bn)), (2, 2), "the sharing did not hold");
    drained(&a).await;
    let sent: std::collections::BTreeSet<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.2 == "sent")
        .map(|e| e.1.clone())
        .collect();
    assert!(published.is_subset(&sent), "an event was never pushed");
    a.close().await;
    b.close().await;
}
