//! `postroom` on the PostgreSQL backend (issue 16), as an operator runs it: `postroom migrate
//! --check` and `postroom migrate` on a fresh database, a refused start without a URL, and two
//! `postroom serve` processes over one database answering for the same Rooms, with one key's
//! sequence continuing from one node to the other. The database is the tests' own server
//! (`broker_core::test_postgres`), each test in a schema of its own.
#![forbid(unsafe_code)]

mod common;
use common::nodes::{call, postroom, setup, Node};
use common::wait;

use std::process::{Command, Output, Stdio};

use serde_json::json;

/// A configuration with only this URL.
fn at(url: &str) -> broker_core::PostgresConfig {
    broker_core::PostgresConfig {
        url: url.into(),
        ..Default::default()
    }
}

fn run(c: &mut Command) -> Output {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait(&mut child);
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `migrate --check` lists what a fresh database lacks and exits 1; `migrate` applies it;
/// `--check` then finds nothing to do and exits 0. The password never appears in the output.
#[test]
fn migrate_check_lists_the_missing_steps_and_migrate_applies_them() {
    let pg = broker_core::test_postgres().fresh();
    let check = run(postroom(&pg).args(["migrate", "--check"]));
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    assert!(
        text(&check).contains("would apply") && text(&check).contains("1 the key-value table"),
        "{}",
        text(&check)
    );
    let apply = run(postroom(&pg).arg("migrate"));
    assert!(apply.status.success(), "{}", text(&apply));
    assert!(text(&apply).contains("applied"), "{}", text(&apply));
    let again = run(postroom(&pg).args(["migrate", "--check"]));
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(text(&again).contains("up to date"), "{}", text(&again));
}

/// `backend = "postgres"` without a URL stops the start with a message naming the setting,
/// before anything listens; an unreachable database stops it with the database's address.
#[test]
fn serve_on_postgres_without_a_reachable_database_is_refused_with_a_clear_message() {
    let out =
        run(postroom(&at("")).args(["serve", "--insecure-no-auth", "--listen", "127.0.0.1:0"]));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("storage.postgres.url is not set"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("listening"), "{}", text(&out));

    let out = run(postroom(&at(
        "host=127.0.0.1 port=1 user=nobody dbname=none connect_timeout=2",
    ))
    .args(["migrate", "--check"]));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("PostgreSQL database none on 127.0.0.1"),
        "{}",
        text(&out)
    );
}

/// Two nodes over one database: a Room and event type made on the first are used on the
/// second, a key's sequence continues from one node to the other, and each node reads the
/// events the other stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_database_serve_the_same_rooms() {
    let pg = broker_core::test_postgres().fresh();
    let a = Node::start(&pg);
    let b = Node::start(&pg);
    use reqwest::Method;
    setup(&a).await;
    let mut sequences = Vec::new();
    for node in [&b, &a, &b] {
        let (s, body) = call(
            Method::POST,
            format!("{}/v1/rooms/moves/events/MoveProposed", node.base),
            Some(json!({"move_id": "M1"})),
        )
        .await;
        assert_eq!(s, 201, "{body}");
        sequences.push(body["sequence"].as_u64().unwrap());
    }
    assert_eq!(sequences, vec![1, 2, 3], "one key, numbered across nodes");
    for node in [&a, &b] {
        let (s, body) = call(
            Method::GET,
            format!("{}/v1/rooms/moves/events?key=M1&limit=10", node.base),
            None,
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let seen: Vec<u64> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                e["event"]["sequence"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{e}"))
            })
            .collect();
        assert_eq!(seen, vec![1, 2, 3], "{}", node.base);
    }
}

/// Three nodes with authentication on start together on an empty database: all of them serve,
/// and exactly one created the first administrator (and showed its secret). A node whose
/// bootstrap lost a race to another's finds what the other made instead of failing to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_on_an_empty_database_bootstrap_one_administrator() {
    let pg = broker_core::test_postgres().fresh();
    let starts: Vec<_> = (0..3)
        .map(|_| {
            let pg = pg.clone();
            std::thread::spawn(move || Node::start_with(&pg, false))
        })
        .collect();
    let nodes: Vec<_> = starts.into_iter().map(|t| t.join().unwrap()).collect();
    for (node, _) in &nodes {
        let (s, _) = call(reqwest::Method::GET, format!("{}/healthz", node.base), None).await;
        assert_eq!(s, 200, "{} serves", node.base);
    }
    let mut created = 0;
    for (node, lines) in nodes {
        drop(node);
        // The node is gone, so its stdout has ended: this reads what it printed.
        created += lines
            .iter()
            .filter(|l| l.contains("created the administrator client"))
            .count();
    }
    assert_eq!(created, 1, "one administrator, created by one node");
}

/// `postroom migrate-data` moves an embedded broker's data folder into PostgreSQL: a node
/// started on the copy serves the same Room with the same events, and a second run into the
/// same schema is refused (exit 1) rather than mixing two brokers' data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_data_moves_an_embedded_broker_into_postgres() {
    let dir = tempfile::tempdir().unwrap();
    {
        let broker =
            broker_core::Broker::open(dir.path().join("postroom.redb"), Default::default())
                .await
                .unwrap();
        let room = broker_core::RoomName::new("moves").unwrap();
        let admin = broker_core::Principal::new("admin").unwrap();
        broker
            .create_room(broker_core::NewRoom::new(room.clone(), admin.clone()).approved())
            .await
            .unwrap();
        let ty = broker_core::EventTypeName::new("MoveProposed").unwrap();
        broker
            .put_event_type(
                &room,
                broker_core::EventTypeSpec {
                    name: ty.clone(),
                    description: String::new(),
                    schema: json!({"type": "object"}),
                    key_pointer: Some("/move_id".into()),
                },
            )
            .await
            .unwrap();
        for i in 0..12 {
            let mut e = broker_core::PublishRequest::new(
                room.clone(),
                ty.clone(),
                admin.clone(),
                Vec::new(),
            );
            e.payload = serde_json::to_vec(&json!({"move_id": format!("M{}", i % 3)})).unwrap();
            broker.publish(e).await.unwrap();
        }
        broker.close().await;
    }
    let pg = broker_core::test_postgres().fresh();
    let migrate = |pg: &broker_core::PostgresConfig| {
        let mut c = postroom(pg);
        c.arg("migrate-data")
            .arg("--from")
            .arg(dir.path())
            .args(["--to", pg.url.as_str()]);
        run(&mut c)
    };
    let out = migrate(&pg);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("copied and compared"), "{}", text(&out));
    assert!(text(&out).contains("events"), "{}", text(&out));
    let again = migrate(&pg);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(
        text(&again).contains("already holds Postroom data"),
        "{}",
        text(&again)
    );

    let node = Node::start(&pg);
    let (s, body) = call(
        reqwest::Method::GET,
        format!("{}/v1/rooms/moves/events?key=M1&limit=100", node.base),
        None,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let seqs: Vec<u64> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    let (s, body) = call(
        reqwest::Method::POST,
        format!("{}/v1/rooms/moves/events/MoveProposed", node.base),
        Some(json!({"move_id": "M1"})),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(
        body["sequence"], 5,
        "the key continues where the embedded broker left it"
    );
}
