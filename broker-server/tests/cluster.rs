//! Several `postroom serve` nodes over one PostgreSQL database sharing the work and surviving
//! failures (issue 16, items 3 and 6): one node at a time pushes a subscription, so a receiver
//! gets each event once; when that node is SIGKILLed another takes the subscription over within
//! its lease and pushes what is still owed, each key in order; pulls and acks work on any node;
//! a configuration change through one node holds on the others; a database crash, a rolling restart of every node and a failover to a synchronous replica
//! lose nothing acknowledged and fail no publish of a client that retries. The database is the
//! tests' own server (`broker_core::test_postgres`, a schema per test) or, for the tests that
//! crash it, a server of the test's own.
#![forbid(unsafe_code)]

mod common;
use common::nodes::{call, setup, Node};

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};

/// How long a node's push lease lasts in these tests (the default is 8 s).
const LEASE_MS: u64 = 3_000;

/// One push as the receiver saw it: event id, key, sequence, when.
type Push = (String, String, u64, Instant);

/// A webhook receiver on a loopback port that answers 200 and keeps every push.
async fn receiver() -> (String, Arc<Mutex<Vec<Push>>>) {
    let seen: Arc<Mutex<Vec<Push>>> = Arc::default();
    let sink = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap| {
            let sink = sink.clone();
            async move {
                let h = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                };
                let seq = h("postroom-sequence").parse().unwrap_or(0);
                sink.lock().unwrap().push((
                    h("webhook-id"),
                    h("postroom-key"),
                    seq,
                    Instant::now(),
                ));
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

fn start_nodes(pg: &broker_core::PostgresConfig, n: usize) -> Vec<Node> {
    let lease = LEASE_MS.to_string();
    let env = [
        ("POSTROOM_BROKER__DELIVERY__PUSH_ALLOW__LOOPBACK", "true"),
        (
            "POSTROOM_BROKER__DELIVERY__DISPATCH_LEASE_MS",
            lease.as_str(),
        ),
    ];
    (0..n).map(|_| Node::start_env(pg, true, &env).0).collect()
}

/// Publishes one event for `key` through `node` as a client should: a 503 (a lost race with
/// another node) is tried again with the same Idempotency-Key. The event id.
async fn publish(node: &Node, key: &str, idem: &str) -> String {
    let client = reqwest::Client::new();
    for _ in 0..50 {
        let resp = client
            .post(format!("{}/v1/rooms/moves/events/MoveProposed", node.base))
            .header("idempotency-key", idem)
            .json(&json!({"move_id": key}))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        match status {
            200 | 201 => return body["id"].as_str().unwrap().to_string(),
            503 => tokio::time::sleep(Duration::from_millis(20)).await,
            _ => panic!("publish {key}: {status} {body}"),
        }
    }
    panic!("publish {key}: 503 fifty times");
}

/// Waits (bounded) until the receiver has seen every id in `want`.
async fn received_all(seen: &Arc<Mutex<Vec<Push>>>, want: &HashSet<String>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got: HashSet<String> = seen.lock().unwrap().iter().map(|p| p.0.clone()).collect();
        let missing = want.difference(&got).count();
        if missing == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{missing} events never pushed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Per key, the sequences in the order they first arrived: each must rise.
fn assert_key_order(pushes: &[Push]) {
    let mut firsts: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for (id, key, seq, _) in pushes {
        if seen.insert(id) {
            firsts.entry(key).or_default().push(*seq);
        }
    }
    for (key, seqs) in firsts {
        let mut sorted = seqs.clone();
        sorted.sort();
        assert_eq!(seqs, sorted, "key {key}: pushed out of order");
    }
}

/// Which of `nodes` logged that it pushes the subscription (took its lease).
fn pushers(nodes: &[Node]) -> Vec<usize> {
    (0..nodes.len())
        .filter(|&i| nodes[i].logged("this node now pushes the subscription"))
        .collect()
}

/// Three nodes, one ordered push subscription. Each event published (through any node) is
/// pushed once, by the one node holding the lease. That node is SIGKILLed; events published
/// through the other two reach the receiver once another node took the lease, within the lease
/// (3 s here) and a tick; each key in order throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_come_from_one_node_and_move_when_it_is_killed() {
    let pg = broker_core::test_postgres().fresh();
    let (url, seen) = receiver().await;
    let mut nodes = start_nodes(&pg, 3);
    setup(&nodes[0]).await;
    let (s, body) = call(
        Method::POST,
        format!("{}/v1/rooms/moves/subscriptions", nodes[0].base),
        Some(json!({"mode": "push", "push": {"url": url}, "ordered": true})),
    )
    .await;
    assert_eq!(s, 201, "{body}");

    let mut want = HashSet::new();
    for i in 0..30 {
        let node = &nodes[i % 3];
        want.insert(publish(node, &format!("M{}", i % 5), &format!("a-{i}")).await);
    }
    received_all(&seen, &want, Duration::from_secs(60)).await;
    let first = seen.lock().unwrap().clone();
    let mut ids: Vec<&String> = first.iter().map(|p| &p.0).collect();
    ids.sort();
    let pushed = ids.len();
    ids.dedup();
    assert_eq!(
        pushed,
        ids.len(),
        "an event was pushed twice with no node lost"
    );
    let owner = pushers(&nodes);
    assert_eq!(owner.len(), 1, "one node pushes: {owner:?}");
    let owner = owner[0];

    // SIGKILL the owner; publish through the others.
    let dead = nodes.remove(owner);
    let killed_at = Instant::now();
    drop(dead);
    let mut later = HashSet::new();
    for i in 0..20 {
        let node = &nodes[i % 2];
        later.insert(publish(node, &format!("M{}", i % 5), &format!("b-{i}")).await);
    }
    received_all(&seen, &later, Duration::from_secs(60)).await;
    let all = seen.lock().unwrap().clone();
    let resumed = all
        .iter()
        .filter(|p| later.contains(&p.0))
        .map(|p| p.3)
        .min()
        .unwrap();
    let gap = resumed.saturating_duration_since(killed_at);
    println!(
        "pushes resumed on another node {} ms after the SIGKILL (lease {LEASE_MS} ms)",
        gap.as_millis()
    );
    assert!(
        gap < Duration::from_millis(LEASE_MS + 3_000),
        "took {gap:?} to move"
    );
    let new_owner = pushers(&nodes);
    assert_eq!(
        new_owner.len(),
        1,
        "one surviving node took over: {new_owner:?}"
    );
    assert_key_order(&all);
    let mut after: Vec<&String> = all
        .iter()
        .filter(|p| later.contains(&p.0))
        .map(|p| &p.0)
        .collect();
    after.sort();
    let n = after.len();
    after.dedup();
    assert_eq!(
        n,
        after.len(),
        "an event published after the takeover was pushed twice"
    );
}

/// Pullers on two nodes share one pull subscription: between them they receive every event
/// published (through either node) and ack it on the node they pulled it from; no event is
/// handed to both while its lease runs, and nothing is left owed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pullers_on_two_nodes_share_one_subscription() {
    let pg = broker_core::test_postgres().fresh();
    let nodes = start_nodes(&pg, 2);
    setup(&nodes[0]).await;
    let (s, body) = call(
        Method::POST,
        format!("{}/v1/rooms/moves/subscriptions", nodes[1].base),
        Some(json!({"mode": "pull", "ordered": false})),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    let sub = body["subscription"]["id"].as_str().unwrap().to_string();
    let mut want = HashSet::new();
    for i in 0..40 {
        want.insert(publish(&nodes[i % 2], &format!("K{}", i % 7), &format!("p-{i}")).await);
    }
    let mut got: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut turn = 0;
    while got.iter().collect::<HashSet<_>>().len() < want.len() {
        assert!(
            Instant::now() < deadline,
            "pulled {} of {}",
            got.len(),
            want.len()
        );
        let node = &nodes[turn % 2];
        turn += 1;
        let (s, body) = call(
            Method::POST,
            format!("{}/v1/subscriptions/{sub}/pull", node.base),
            Some(json!({"max_messages": 7, "wait_ms": 200})),
        )
        .await;
        if s == 503 {
            continue;
        }
        assert_eq!(s, 200, "{body}");
        let messages = body["messages"].as_array().cloned().unwrap_or_default();
        let mut acks = Vec::new();
        for m in &messages {
            got.push(m["event"]["id"].as_str().unwrap().to_string());
            acks.push(m["ack_id"].clone());
        }
        if acks.is_empty() {
            continue;
        }
        loop {
            let (s, body) = call(
                Method::POST,
                format!("{}/v1/subscriptions/{sub}/ack", node.base),
                Some(json!({"ack_ids": acks})),
            )
            .await;
            if s == 503 {
                continue;
            }
            assert_eq!(s, 200, "{body}");
            break;
        }
    }
    let distinct: HashSet<String> = got.iter().cloned().collect();
    assert_eq!(distinct, want);
    assert_eq!(got.len(), want.len(), "an event was handed to two pullers");
    let (s, body) = call(
        Method::GET,
        format!("{}/v1/subscriptions/{sub}", nodes[0].base),
        None,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["backlog"], 0, "{body}");
}

/// `PATCH /v1/admin/config` through one node holds on the others: they adopt it within half a
/// push lease (1.5 s here) and `GET /v1/admin/config` on them shows it. Before, the change held
/// on the node that took it only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_change_through_one_node_holds_on_the_others() {
    let pg = broker_core::test_postgres().fresh();
    let nodes = start_nodes(&pg, 2);
    let (s, body) = call(
        Method::PATCH,
        format!("{}/v1/admin/config", nodes[1].base),
        Some(json!({"delivery": {"pull_messages_max": 5}, "limits": {"list_items_max": 77}})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, body) = call(
            Method::GET,
            format!("{}/v1/admin/config", nodes[0].base),
            None,
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let broker = &body["broker"];
        if broker["delivery"]["pull_messages_max"] == 5 && broker["limits"]["list_items_max"] == 77
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other node never adopted the change: {broker}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a retrying client saw while publishing.
#[derive(Default)]
struct Seen {
    /// (event id, key, sequence, index of the node that answered 201) of each acknowledgement.
    acked: Vec<(String, String, u64, usize)>,
    /// 503 answers, and those among them without a `Retry-After`.
    unavailable: u64,
    without_retry_after: u64,
    /// Connections refused or reset (a node restarting).
    unreachable: u64,
    /// Anything a retrying client cannot recover from: another status, a request that hung.
    failures: Vec<String>,
}

/// A client that publishes one event after another to `bases` (the nodes' addresses, which
/// the test may change), each with its own Idempotency-Key, retrying a 503 or an unreachable
/// node on the next node until it is acknowledged, as the README tells clients to. Runs until
/// `stop`.
fn spawn_publisher(
    bases: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut i = 0usize;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let key = format!("K{}", i % 5);
            let idem = format!("rolling-{i}");
            let mut attempt = 0usize;
            loop {
                let (n, base) = {
                    let b = bases.lock().unwrap();
                    let n = (i + attempt) % b.len();
                    (n, b[n].clone())
                };
                attempt += 1;
                let sent = Instant::now();
                let resp = client
                    .post(format!("{base}/v1/rooms/moves/events/MoveProposed"))
                    .header("idempotency-key", &idem)
                    .json(&json!({"move_id": key}))
                    .timeout(Duration::from_secs(20))
                    .send()
                    .await;
                let resp = match resp {
                    Ok(r) => r,
                    Err(e) if e.is_timeout() => {
                        seen.lock()
                            .unwrap()
                            .failures
                            .push(format!("hung {:?}: {e}", sent.elapsed()));
                        break;
                    }
                    Err(_) => {
                        seen.lock().unwrap().unreachable += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let status = resp.status().as_u16();
                let retry_after = resp.headers().contains_key("retry-after");
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                match status {
                    200 | 201 => {
                        let id = body["id"].as_str().unwrap_or_default().to_string();
                        let seq = body["sequence"].as_u64().unwrap_or(0);
                        seen.lock().unwrap().acked.push((id, key.clone(), seq, n));
                        break;
                    }
                    503 => {
                        {
                            let mut s = seen.lock().unwrap();
                            s.unavailable += 1;
                            s.without_retry_after += u64::from(!retry_after);
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => {
                        seen.lock()
                            .unwrap()
                            .failures
                            .push(format!("{status} {body}"));
                        break;
                    }
                }
            }
            i += 1;
        }
    })
}

/// A retrying publisher running against some nodes (see [`spawn_publisher`]).
struct Client {
    bases: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Starts publishing to `nodes`, and waits for its first `first` acknowledgements.
    async fn start(nodes: &[Node], first: usize) -> Client {
        let bases = Arc::new(Mutex::new(
            nodes.iter().map(|n| n.base.clone()).collect::<Vec<_>>(),
        ));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = spawn_publisher(bases.clone(), seen.clone(), stop.clone());
        until(
            &seen,
            Duration::from_secs(60),
            "the first acknowledgements",
            |s| s.acked.len() >= first,
        )
        .await;
        Client {
            bases,
            seen,
            stop,
            task,
        }
    }

    /// Acknowledgements so far.
    fn acked(&self) -> usize {
        self.seen.lock().unwrap().acked.len()
    }

    /// Stops publishing: what it saw, checked for failures and for 503s without
    /// `Retry-After`.
    async fn finish(self) -> Seen {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.unwrap();
        let seen = std::mem::take(&mut *self.seen.lock().unwrap());
        assert!(seen.failures.is_empty(), "{:?}", seen.failures);
        assert_eq!(seen.without_retry_after, 0, "a 503 without Retry-After");
        seen
    }
}

/// Waits (bounded) until `cond` holds of what the client saw.
async fn until(
    seen: &Arc<Mutex<Seen>>,
    within: Duration,
    what: &str,
    cond: impl Fn(&Seen) -> bool,
) {
    let deadline = Instant::now() + within;
    while !cond(&seen.lock().unwrap()) {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every acknowledged event is stored under the key and sequence it was given, and each key's
/// sequences are 1..n with no gap and no repeat.
async fn assert_all_kept(node: &Node, seen: &Seen) {
    let mut acked: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for (id, key, seq, _) in &seen.acked {
        acked
            .entry(key.clone())
            .or_default()
            .push((*seq, id.clone()));
    }
    for (key, mut mine) in acked {
        let (s, body) = call(
            Method::GET,
            format!("{}/v1/rooms/moves/events?key={key}&limit=1000", node.base),
            None,
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let stored: Vec<(u64, String)> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["event"]["sequence"].as_u64().unwrap(),
                    e["event"]["id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let seqs: Vec<u64> = stored.iter().map(|s| s.0).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "key {key}: a gap or a repeat"
        );
        mine.sort();
        mine.dedup();
        for m in &mine {
            assert!(stored.contains(m), "key {key}: acknowledged {m:?} lost");
        }
    }
}

/// PostgreSQL crashes (stopped at once, no checkpoint) under a retrying publisher on two
/// nodes, and comes back on the same port: while it is down the nodes answer 503 with
/// `Retry-After` (never a 500, never a request that hangs); both nodes serve again by
/// themselves once it is back; every acknowledged event is kept with its sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_crash_under_load_is_503_with_retry_after_and_loses_nothing() {
    let server = broker_core::TestPostgres::start(false).expect("a server of this test's own");
    let pg = server.fresh();
    let nodes = start_nodes(&pg, 2);
    setup(&nodes[0]).await;
    let client = Client::start(&nodes, 30).await;
    server.crash().expect("crash PostgreSQL");
    let down = Instant::now();
    until(
        &client.seen,
        Duration::from_secs(60),
        "503s while the database is down",
        |s| s.unavailable >= 5,
    )
    .await;
    let before = client.acked();
    server.start_again().expect("start PostgreSQL again");
    until(
        &client.seen,
        Duration::from_secs(90),
        "both nodes acknowledging again",
        both_nodes_since(before),
    )
    .await;
    println!(
        "database down and back; publishing resumed {} ms after the crash",
        down.elapsed().as_millis()
    );
    let seen = client.finish().await;
    assert_all_kept(&nodes[0], &seen).await;
}

/// Whether 30 acknowledgements came after the first `before`, from both nodes 0 and 1.
fn both_nodes_since(before: usize) -> impl Fn(&Seen) -> bool {
    move |s| {
        let after = &s.acked[before..];
        after.len() >= 30 && after.iter().any(|a| a.3 == 0) && after.iter().any(|a| a.3 == 1)
    }
}

/// All three nodes are restarted one after another (SIGTERM, wait for the exit, start a new
/// process) while a client publishes and retries a refused or unreachable node on the next:
/// the client sees no failed publish, and every acknowledged event is kept with its sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_fails_no_publish_of_a_retrying_client() {
    let pg = broker_core::test_postgres().fresh();
    let mut nodes = start_nodes(&pg, 3);
    setup(&nodes[0]).await;
    let client = Client::start(&nodes, 20).await;
    for (i, node) in nodes.iter_mut().enumerate() {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &node.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = common::wait(&mut node.child);
        assert!(exit.success(), "node {i} shut down cleanly: {exit:?}");
        let fresh = start_nodes(&pg, 1).pop().unwrap();
        client.bases.lock().unwrap()[i] = fresh.base.clone();
        *node = fresh;
        let before = client.acked();
        until(
            &client.seen,
            Duration::from_secs(60),
            "acknowledgements after a restart",
            |s| s.acked[before..].iter().any(|a| a.3 == i) && s.acked.len() >= before + 15,
        )
        .await;
    }
    let seen = client.finish().await;
    println!(
        "rolling restart: {} acknowledged, {} answers 503, {} tries on an unreachable node",
        seen.acked.len(),
        seen.unavailable,
        seen.unreachable
    );
    assert_all_kept(&nodes[0], &seen).await;
}

/// Database failover: a primary with a synchronous streaming replica (built with
/// `pg_basebackup`), two nodes given both hosts with `target_session_attrs=read-write`, and a
/// retrying publisher. The primary is killed and the replica promoted: the nodes find the new
/// primary by themselves, every event acknowledged before or after is there with its sequence,
/// and the time without service is measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_failover_to_a_synchronous_replica_loses_nothing_acknowledged() {
    let primary = broker_core::TestPostgres::start(false).expect("a primary of this test's own");
    let standby = primary.replica().expect("a streaming replica");
    primary.execute("ALTER SYSTEM SET synchronous_standby_names = '*'");
    primary.execute("SELECT pg_reload_conf()");
    let pg = primary.fresh_across(&standby);
    let nodes = start_nodes(&pg, 2);
    setup(&nodes[0]).await;
    let client = Client::start(&nodes, 30).await;
    // The replica is synchronous: every acknowledgement so far waited for it.
    primary.execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_stat_replication WHERE sync_state = 'sync') \
         THEN RAISE EXCEPTION 'no synchronous standby'; END IF; END $$",
    );
    let killed = Instant::now();
    primary.crash().expect("kill the primary");
    let before = client.acked();
    standby.promote().expect("promote the replica");
    until(
        &client.seen,
        Duration::from_secs(120),
        "acknowledgements from the new primary",
        |s| s.acked.len() > before,
    )
    .await;
    let without_service = killed.elapsed();
    until(
        &client.seen,
        Duration::from_secs(120),
        "both nodes on the new primary",
        both_nodes_since(before),
    )
    .await;
    println!(
        "failover: {} ms without an acknowledgement after the primary was killed",
        without_service.as_millis()
    );
    let seen = client.finish().await;
    assert_all_kept(&nodes[0], &seen).await;
}
