//! Tests of moving an embedded broker into PostgreSQL (issue 16, item 5): a broker with Rooms,
//! event types, keyed events, ordered and unordered pull subscriptions at different positions,
//! a leased message, a dead letter, an identity and audit entries is copied; the broker on the
//! copy answers every read like the original, hands out the same next sequence for a key
//! (whose sequence the original kept only in memory and its log), and offers the same next
//! message. A second copy into the same schema is refused.

use std::sync::Arc;

use crate::audit::{AuditFilter, NewAuditEntry};
use crate::broker::Broker;
use crate::clock::{ManualClock, Timestamp};
use crate::config::Config;
use crate::engine::copy::copy_embedded_to_postgres;
use crate::model::EventFilter;
use crate::storage::pg_cluster::test_postgres;
use crate::testkit::TestRoom;
use crate::PublishRequest;

fn keyed(room: &TestRoom, key: &str, n: usize) -> PublishRequest {
    let mut e = room.event();
    e.ordering_key = Some(key.into());
    e.payload = serde_json::to_vec(&serde_json::json!({ "n": n })).unwrap();
    e
}

/// Every answer a client could compare, as text.
async fn answers(b: &Broker, room: &TestRoom, subs: &[crate::SubscriptionId]) -> Vec<String> {
    let mut out = vec![
        format!("{:?}", b.rooms(None, Some(100)).unwrap()),
        format!("{:?}", b.room(&room.room).unwrap()),
        format!("{:?}", b.event_types(&room.room).unwrap()),
        format!(
            "{:?}",
            b.events(
                &room.room,
                EventFilter {
                    limit: Some(1000),
                    ..Default::default()
                }
            )
            .await
            .unwrap()
        ),
        format!("{:?}", b.subscriptions(&room.room).unwrap()),
        format!("{:?}", b.members().unwrap()),
        format!("{:?}", b.audit(AuditFilter::default()).unwrap()),
    ];
    for id in subs {
        out.push(format!("{:?}", b.subscription(*id).unwrap()));
        out.push(format!(
            "{:?}",
            b.dead_letters(*id, None, Some(100)).unwrap()
        ));
        out.push(format!("{:?}", b.attempts(*id, None, Some(100)).unwrap()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_copied_into_postgres_answers_like_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("postroom.redb");
    let clock = Arc::new(ManualClock::new(Timestamp(1_767_225_600_000)));
    let mut config = Config::default();
    config.retention.interval_ms = 0;
    let original = Broker::open_with_clock(&path, config.clone(), clock.clone())
        .await
        .unwrap();
    let room = TestRoom::create(&original).await;
    let ordered = room.pull_subscription(&original, true).await;
    let loose = room.pull_subscription(&original, false).await;
    for n in 0..30 {
        original
            .publish(keyed(&room, &format!("k{}", n % 4), n))
            .await
            .unwrap();
    }
    // Positions: some acked, one terminated (a dead letter), one left leased.
    let got = original.pull(loose, 5, None, 0).await.unwrap();
    assert_eq!(got.len(), 5);
    original
        .ack(loose, &[got[0].ack_id.clone(), got[1].ack_id.clone()])
        .await
        .unwrap();
    original
        .terminate(loose, &[got[2].ack_id.clone()])
        .await
        .unwrap();
    let leased = original.pull(ordered, 1, None, 0).await.unwrap();
    assert_eq!(leased.len(), 1);
    original
        .create_member("UK/GOV/MOJ", "A ministry")
        .await
        .unwrap();
    original
        .record_audit(NewAuditEntry {
            actor: room.admin.clone(),
            action: "POST /v1/rooms".into(),
            target: "/v1/rooms/r".into(),
            error: None,
            detail: None,
        })
        .await
        .unwrap();
    let subs = [ordered, loose];
    let before = answers(&original, &room, &subs).await;
    original.close().await;
    drop(original);

    let pg = test_postgres().fresh();
    let report = copy_embedded_to_postgres(&path, &pg).unwrap();
    assert!(
        report.spaces.iter().any(|s| s.0 == "events" && s.1 == 30),
        "{report:?}"
    );
    assert!(
        report.spaces.iter().any(|s| s.0 == "key_seq" && s.1 == 4),
        "sequences made complete: {report:?}"
    );
    let again = copy_embedded_to_postgres(&path, &pg).unwrap_err();
    assert!(
        again.to_string().contains("already holds Postroom data"),
        "{again}"
    );

    let copy = Broker::open_postgres_with_clock(pg, config.clone(), clock.clone())
        .await
        .unwrap();
    let original = Broker::open_with_clock(&path, config, clock.clone())
        .await
        .unwrap();
    assert_eq!(
        answers(&copy, &room, &subs).await,
        before,
        "the copy answers like the original"
    );
    assert_eq!(answers(&original, &room, &subs).await, before);
    // The next event of a key gets the same sequence on both; the next message is the same.
    for key in ["k0", "k3", "new"] {
        let a = original.publish(keyed(&room, key, 99)).await.unwrap();
        let b = copy.publish(keyed(&room, key, 99)).await.unwrap();
        assert_eq!(a.sequence, b.sequence, "key {key}");
    }
    let a = original.pull(loose, 3, None, 0).await.unwrap();
    let b = copy.pull(loose, 3, None, 0).await.unwrap();
    let ids = |m: &[crate::PulledMessage]| m.iter().map(|m| m.event.id).collect::<Vec<_>>();
    assert_eq!(ids(&a), ids(&b));
    original.close().await;
    copy.close().await;
}
