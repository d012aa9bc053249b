//! Durability: what was acknowledged survives a clean reopen and a SIGKILL. Guards against an
//! acknowledgement given before the commit is on disk, and against sequences that break across
//! a restart.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use broker_core::{Broker, EventFilter, EventId, OrderingKey};
use postroom_tests::receiver::Receiver;
use postroom_tests::{moved, room, setup_room, test_config, ty};

#[tokio::test]
async fn everything_is_found_after_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/postroom.redb");
    let mut receipts = Vec::new();
    {
        let broker = Broker::open(&path, test_config()).await.unwrap();
        setup_room(&broker, "r").await;
        for i in 0..20 {
            let mut req = moved("r", &format!("p{}", i % 3), i);
            req.idempotency_key = Some(format!("idem-{i}"));
            receipts.push(broker.publish(req).await.unwrap());
        }
        broker.close().await;
        assert_eq!(
            broker
                .publish(moved("r", "p0", 99))
                .await
                .unwrap_err()
                .code(),
            "shutting_down"
        );
    }
    let broker = Broker::open(&path, test_config()).await.unwrap();
    let r = broker.room(&room("r")).unwrap();
    assert_eq!(r.events_stored, 20);
    assert_eq!(
        broker.event_type(&room("r"), &ty("moved")).unwrap().version,
        1
    );
    for rec in &receipts {
        let e = broker.event(rec.id).unwrap();
        assert_eq!((e.key.clone(), e.sequence), (rec.key.clone(), rec.sequence));
    }
    // Sequences continue where they stopped; idempotency keys are still remembered.
    let next = broker.publish(moved("r", "p0", 100)).await.unwrap();
    assert_eq!(next.sequence.0, 8);
    let mut again = moved("r", "p0", 0);
    again.idempotency_key = Some("idem-0".into());
    let replay = broker.publish(again).await.unwrap();
    assert!(replay.duplicate);
    assert_eq!(replay.id, receipts[0].id);
}

/// Runs a publisher child process, SIGKILLs it mid-load, reopens its database and checks that
/// every event it was told is durable is there, and that every key's sequence is gap-free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_event_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    const ACKS_BEFORE_KILL: usize = 3000;
    let mut acked: Vec<(EventId, String, u64)> = Vec::new();
    for round in 0..2 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash_publisher"))
            .args([path.to_str().unwrap(), "20", "64"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start crash_publisher");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut seen = 0;
        while seen < ACKS_BEFORE_KILL {
            assert!(Instant::now() < deadline, "child too slow: {seen} acks");
            let line = lines.next().expect("child ended early").unwrap();
            acked.push(parse_ack(&line));
            seen += 1;
        }
        child.kill().expect("SIGKILL the child");
        // Lines already written before the kill are acknowledgements too.
        for line in lines {
            let Ok(line) = line else { break };
            if line.starts_with("ack ") && line.split(' ').count() == 4 {
                acked.push(parse_ack(&line));
            }
        }
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "round {round}: the child must have been killed"
        );
    }

    let broker = Broker::open(&path, test_config()).await.unwrap();
    for (id, key, seq) in &acked {
        let e = broker
            .event(*id)
            .unwrap_or_else(|e| panic!("acknowledged event {id} lost: {e}"));
        assert_eq!((e.key.as_str(), e.sequence.0), (key.as_str(), *seq));
    }
    let mut max_acked: BTreeMap<String, u64> = BTreeMap::new();
    for (_, key, seq) in &acked {
        let m = max_acked.entry(key.clone()).or_default();
        *m = (*m).max(*seq);
    }
    assert_eq!(max_acked.len(), 20);
    for (key, max) in max_acked {
        let mut seqs = Vec::new();
        let mut filter = EventFilter {
            key: Some(OrderingKey::new(key.clone(), 64).unwrap()),
            limit: Some(1000),
            ..Default::default()
        };
        loop {
            let page = broker.events(&room("crash"), filter.clone()).await.unwrap();
            seqs.extend(page.items.iter().map(|e| e.sequence.0));
            match page.next_cursor {
                Some(c) => filter.cursor = Some(c),
                None => break,
            }
        }
        assert!(
            seqs.len() as u64 >= max,
            "key {key}: {} stored < {max} acknowledged",
            seqs.len()
        );
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "key {key} has a gap"
        );
    }
}

/// Publishes with a push subscription active, SIGKILLs the publisher mid-load, restarts the
/// broker in this process and checks that every acknowledged event reaches the receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_event_is_pushed_after_a_sigkill() {
    let mut rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("push-crash.redb");
    let mut child = Command::new(env!("CARGO_BIN_EXE_crash_publisher"))
        .args([path.to_str().unwrap(), "50", "32", &rx.url("crash")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start crash_publisher");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.len() < 2000 {
        assert!(Instant::now() < deadline, "child too slow");
        acked.push(parse_ack(&lines.next().expect("child ended early").unwrap()).0);
    }
    // Wait until pushes are under way, so that the kill lands in the middle of deliveries.
    let before_kill = rx
        .collect_until(Duration::from_secs(60), |g| g.len() >= 200)
        .await;
    child.kill().expect("SIGKILL");
    for line in lines.map_while(|l| l.ok()) {
        if line.starts_with("ack ") && line.split(' ').count() == 4 {
            acked.push(parse_ack(&line).0);
        }
    }
    child.wait().unwrap();

    let broker = Broker::open(&path, test_config()).await.unwrap();
    let mut delivered: std::collections::HashSet<String> = before_kill
        .into_iter()
        .chain(rx.drain())
        .filter(|r| r.status == 200)
        .map(|r| r.header("webhook-id").to_string())
        .collect();
    let want: std::collections::HashSet<String> = acked.iter().map(|id| id.to_string()).collect();
    rx.collect_until(Duration::from_secs(120), |got| {
        for r in got.iter().filter(|r| r.status == 200) {
            delivered.insert(r.header("webhook-id").to_string());
        }
        want.is_subset(&delivered)
    })
    .await;
    let missing = want.difference(&delivered).count();
    assert_eq!(missing, 0);
    broker.close().await;
}

/// Two publisher processes share one PostgreSQL database (two nodes), publishing to the same
/// keys at once; both are SIGKILLed mid-load. Every event either was told is durable is
/// there with the sequence it was given, and each key's sequence is 1..n with no gap and no
/// repeat across the two processes (issue 16: a receipt only after the PostgreSQL commit;
/// gap-free per-key sequences across nodes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_postgres_keep_every_acknowledged_event_and_gap_free_sequences_after_sigkill()
{
    let pg = broker_core::test_postgres().fresh();
    {
        let broker = Broker::open_postgres(pg.clone(), test_config())
            .await
            .unwrap();
        setup_room(&broker, "crash").await;
        broker.close().await;
    }
    const ACKS_EACH: usize = 400;
    let target = format!("postgres:{}", pg.url);
    let mut children: Vec<_> = (0..2)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_crash_publisher"))
                .args([target.as_str(), "10", "16"])
                .env("POSTROOM_STORAGE__POSTGRES__CA_FILE", &pg.ca_file)
                .stdout(Stdio::piped())
                .spawn()
                .expect("start crash_publisher")
        })
        .collect();
    let readers: Vec<_> = children
        .iter_mut()
        .map(|c| BufReader::new(c.stdout.take().unwrap()).lines())
        .collect();
    let mut acked: Vec<(EventId, String, u64)> = Vec::new();
    let mut rest = Vec::new();
    for mut lines in readers {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut seen = 0;
        while seen < ACKS_EACH {
            assert!(Instant::now() < deadline, "child too slow: {seen} acks");
            let line = lines.next().expect("child ended early").unwrap();
            acked.push(parse_ack(&line));
            seen += 1;
        }
        rest.push(lines);
    }
    for child in &mut children {
        child.kill().expect("SIGKILL the child");
    }
    for lines in rest {
        for line in lines.map_while(|l| l.ok()) {
            if line.starts_with("ack ") && line.split(' ').count() == 4 {
                acked.push(parse_ack(&line));
            }
        }
    }
    for mut child in children {
        assert!(!child.wait().unwrap().success(), "the child was killed");
    }

    let broker = Broker::open_postgres(pg, test_config()).await.unwrap();
    let mut max_acked: BTreeMap<String, u64> = BTreeMap::new();
    let mut given = std::collections::HashSet::new();
    for (id, key, seq) in &acked {
        let e = broker
            .event(*id)
            .unwrap_or_else(|e| panic!("acknowledged event {id} lost: {e}"));
        assert_eq!((e.key.as_str(), e.sequence.0), (key.as_str(), *seq));
        assert!(given.insert((key.clone(), *seq)), "{key}/{seq} given twice");
        let m = max_acked.entry(key.clone()).or_default();
        *m = (*m).max(*seq);
    }
    assert_eq!(max_acked.len(), 10);
    for (key, max) in max_acked {
        let page = broker
            .events(
                &room("crash"),
                EventFilter {
                    key: Some(OrderingKey::new(key.clone(), 64).unwrap()),
                    limit: Some(1000),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let seqs: Vec<u64> = page.items.iter().map(|e| e.sequence.0).collect();
        assert!(
            seqs.len() as u64 >= max,
            "key {key}: fewer stored than acknowledged"
        );
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "key {key}: a gap or a repeat across the two nodes"
        );
    }
    broker.close().await;
}

fn parse_ack(line: &str) -> (EventId, String, u64) {
    let parts: Vec<&str> = line.split(' ').collect();
    assert_eq!(parts.len(), 4, "bad line {line:?}");
    assert_eq!(parts[0], "ack");
    (
        EventId::parse(parts[1]).unwrap(),
        parts[2].to_string(),
        parts[3].parse().unwrap(),
    )
}
