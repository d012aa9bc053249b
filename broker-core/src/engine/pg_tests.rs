//! The broker on the PostgreSQL backend (issue 16), against the tests' own server
//! (`storage::pg_cluster`): what a user of one node sees, and what two brokers sharing one
//! database see when they race. The second is the point of the backend: several nodes over one
//! database hand out each Room position and each key's sequence once, with no gap, and a node
//! that lost a race is refused (`storage_conflict`, nothing written) rather than writing over
//! the winner.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::broker::Broker;
use crate::clock::{ManualClock, Timestamp};
use crate::config::Config;
use crate::error::Error;
use crate::storage::PostgresConfig;
use crate::testkit::TestRoom;

async fn open(pg: &PostgresConfig) -> Broker {
    let mut config = Config::default();
    config.retention.interval_ms = 0;
    let clock = Arc::new(ManualClock::new(Timestamp(1_767_225_600_000)));
    Broker::open_postgres_with_clock(pg.clone(), config, clock)
        .await
        .expect("open on postgres")
}

fn keyed(room: &TestRoom, key: &str) -> crate::PublishRequest {
    let mut e = room.event();
    e.ordering_key = Some(key.into());
    e
}

/// Pulls and acknowledges everything `sub` owes on `broker` (an ack that lost a race to
/// another node is sent again); the ids pulled, in order.
async fn drain(broker: &Broker, sub: crate::SubscriptionId) -> Vec<crate::EventId> {
    let mut ids = Vec::new();
    loop {
        let page = broker.pull(sub, 100, None, 0).await.unwrap();
        if page.is_empty() {
            return ids;
        }
        ids.extend(page.iter().map(|m| m.event.id));
        let acks: Vec<_> = page.iter().map(|m| m.ack_id.clone()).collect();
        loop {
            match broker.ack(sub, &acks).await {
                Ok(_) => break,
                Err(Error::StorageConflict { .. }) => continue,
                Err(e) => panic!("ack failed: {e}"),
            }
        }
    }
}

/// One node: a publish is stored, pulled and acknowledged, and after a restart (a new broker
/// over the same database) the event is still there and nothing is owed any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_on_postgres_keeps_what_it_acknowledged_across_a_restart() {
    let pg = crate::storage::pg_cluster::test_postgres().fresh();
    let a = open(&pg).await;
    let room = TestRoom::create(&a).await;
    let sub = room.pull_subscription(&a, true).await;
    let first = a.publish(keyed(&room, "k")).await.unwrap();
    let second = a.publish(keyed(&room, "k")).await.unwrap();
    assert_eq!((first.sequence.0, second.sequence.0), (1, 2));
    let pulled = a.pull(sub, 10, None, 0).await.unwrap();
    assert_eq!(
        pulled.len(),
        1,
        "ordered: only the key's head is handed out"
    );
    a.ack(sub, &[pulled[0].ack_id.clone()]).await.unwrap();
    a.close().await;

    let b = open(&pg).await;
    let stored = b.event(first.id).unwrap();
    assert_eq!(stored.sequence.0, 1);
    let pulled = b.pull(sub, 10, None, 0).await.unwrap();
    let ids: Vec<_> = pulled.iter().map(|m| m.event.id).collect();
    assert_eq!(
        ids,
        vec![second.id],
        "the acknowledged event is not owed again; the other still is"
    );
    let third = b.publish(keyed(&room, "k")).await.unwrap();
    assert_eq!(third.sequence.0, 3, "the key's sequence continues");
    b.close().await;
}

/// Two brokers over one database publish to the same key at the same time. Every publish that
/// was acknowledged has its own Room position and its own sequence, the sequences are 1..=n
/// with no gap, and a publish refused because the other broker committed first is refused
/// with `storage_conflict` (the caller tries again) and wrote nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_brokers_racing_on_one_database_number_a_key_without_gaps_or_repeats() {
    let pg = crate::storage::pg_cluster::test_postgres().fresh();
    let a = open(&pg).await;
    let room = TestRoom::create(&a).await;
    let sub = room.pull_subscription(&a, false).await;
    let b = open(&pg).await;
    const EACH: usize = 40;
    let mut tasks = Vec::new();
    for broker in [a.clone(), b.clone()] {
        for _ in 0..4 {
            let broker = broker.clone();
            let req = keyed(&room, "k");
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                let mut conflicts = 0u32;
                while got.len() < EACH / 4 {
                    match broker.publish(req.clone()).await {
                        Ok(r) => got.push((r.sequence.0, r.id)),
                        Err(Error::StorageConflict { .. }) => conflicts += 1,
                        Err(e) => panic!("publish failed: {e}"),
                    }
                }
                (got, conflicts)
            }));
        }
    }
    let mut seqs = BTreeSet::new();
    let mut ids = BTreeSet::new();
    let mut conflicts = 0;
    for t in tasks {
        let (got, c) = t.await.unwrap();
        conflicts += c;
        for (seq, id) in got {
            assert!(seqs.insert(seq), "sequence {seq} handed out twice");
            ids.insert(id);
        }
    }
    let n = 2 * EACH as u64;
    assert_eq!(
        seqs,
        (1..=n).collect::<BTreeSet<u64>>(),
        "sequences 1..={n}, no gap ({conflicts} publishes lost a race and were tried again)"
    );
    // Every acknowledged event is stored at a position of its own: the subscription owes each
    // once, and nothing else.
    let mut owed = BTreeSet::new();
    for id in drain(&a, sub).await {
        assert!(owed.insert(id), "{id} owed twice");
    }
    assert_eq!(
        owed, ids,
        "the subscription owes exactly the acknowledged events"
    );
    a.close().await;
    b.close().await;
}

/// Several brokers opening one fresh database at once (nodes started together) all open: the
/// schema is created once, under the migration lock, and a broker whose opening commit lost
/// the race to another's reads again and tries again instead of failing to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_opening_one_database_together_all_open() {
    let pg = crate::storage::pg_cluster::test_postgres().fresh();
    let opens: Vec<_> = (0..6)
        .map(|_| {
            let pg = pg.clone();
            tokio::spawn(async move {
                let config = Config::default();
                Broker::open_postgres(pg, config).await
            })
        })
        .collect();
    let mut brokers = Vec::new();
    for open in opens {
        brokers.push(open.await.unwrap().expect("every node opens"));
    }
    let room = TestRoom::create(&brokers[0]).await;
    for (i, b) in brokers.iter().enumerate() {
        let r = b.publish(keyed(&room, "k")).await.unwrap();
        assert_eq!(r.sequence.0, i as u64 + 1);
        b.close().await;
    }
}

/// A client deleted on one node can no longer authenticate on another, and a grant revoked on
/// one node stops counting on the other at once: with a shared store nothing about identities
/// is kept in memory, where another node's change would not reach it. Before, the second node
/// kept answering from what it had read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_node_holds_at_once_on_another() {
    let pg = crate::storage::pg_cluster::test_postgres().fresh();
    let a = open(&pg).await;
    let b = open(&pg).await;
    let room = TestRoom::create(&a).await;
    a.create_member("UK/GOV/HO", "Home Office").await.unwrap();
    let app = a
        .create_application("UK/GOV/HO", "irc", "IRC")
        .await
        .unwrap()
        .id;
    let (client, secret) = a
        .create_client(&app, Some("c1".into()), None)
        .await
        .unwrap();
    a.grant(&app, crate::Role::Publisher, Some(room.room.clone()), None)
        .await
        .unwrap();
    // Node b reads the client and the rights (and would keep them in a cache).
    b.authenticate_client("c1", &secret).await.unwrap();
    assert!(b.client("c1").is_ok());
    assert!(b.rights(&app).unwrap().can_publish(&room.room, &room.ty));

    a.revoke(&app, crate::Role::Publisher, Some(&room.room))
        .await
        .unwrap();
    assert!(
        !b.rights(&app).unwrap().can_publish(&room.room, &room.ty),
        "the grant revoked on node a still counts on node b"
    );
    a.delete_client(&client.client_id).await.unwrap();
    assert!(
        b.client("c1").is_err(),
        "node b still knows the deleted client"
    );
    assert!(b.authenticate_client("c1", &secret).await.is_err());
    a.close().await;
    b.close().await;
}

/// A read holds one pooled connection at a time. With a pool of one connection, listing Rooms,
/// reading an event type and searching the message log (with each event's deliveries) all
/// answer; before, each of them took a second snapshot while holding the first, and waited for
/// a connection that only it held until the pool's wait ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_never_waits_for_a_second_connection() {
    let mut pg = crate::storage::pg_cluster::test_postgres().fresh();
    pg.pool_size = 1;
    pg.connect_timeout_ms = 1_000;
    let a = open(&pg).await;
    let room = TestRoom::create(&a).await;
    room.pull_subscription(&a, false).await;
    a.publish(keyed(&room, "k")).await.unwrap();
    let rooms = a.rooms(None, None).expect("rooms listed");
    assert_eq!(rooms.items.len(), 1);
    a.event_type(&room.room, &room.ty).expect("event type read");
    let log = a
        .message_log(crate::MessageFilter {
            room: Some(room.room.clone()),
            ..Default::default()
        })
        .await
        .expect("message log searched");
    assert_eq!(log.items.len(), 1);
    assert_eq!(log.items[0].deliveries.len(), 1);
    a.close().await;
}

/// The same publish with one Idempotency-Key sent to two nodes at once (a client retrying on
/// another node, or a load balancer sending it twice): one event is stored, and every answer
/// that is not a lost race (`storage_conflict`, retried) is its receipt: the first, or a
/// duplicate naming the same id. Repeated over several keys so that the two really race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_is_honoured_whichever_node_gets_the_retry() {
    let pg = crate::storage::pg_cluster::test_postgres().fresh();
    let a = open(&pg).await;
    let room = TestRoom::create(&a).await;
    let sub = room.pull_subscription(&a, false).await;
    let b = open(&pg).await;
    const KEYS: usize = 20;
    for n in 0..KEYS {
        let mut req = keyed(&room, "k");
        req.idempotency_key = Some(format!("idem-{n}"));
        let mut tasks = Vec::new();
        for broker in [a.clone(), b.clone(), a.clone(), b.clone()] {
            let req = req.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    match broker.publish(req.clone()).await {
                        Err(Error::StorageConflict { .. }) => continue,
                        other => return other.expect("publish"),
                    }
                }
            }));
        }
        let mut receipts = Vec::new();
        for t in tasks {
            receipts.push(t.await.unwrap());
        }
        let first = receipts.iter().filter(|r| !r.duplicate).count();
        assert_eq!(first, 1, "key idem-{n}: exactly one publish stored it");
        assert!(
            receipts.iter().all(|r| r.id == receipts[0].id),
            "key idem-{n}: every answer names the one event"
        );
    }
    let owed = drain(&a, sub).await.len();
    assert_eq!(owed, KEYS, "one event stored per idempotency key");
    a.close().await;
    b.close().await;
}
