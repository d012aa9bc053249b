//! Tests of the PostgreSQL backend against the tests' own server: TLS, notices between
//! nodes, a pool with no free connection, and what `migrate --check` reports.

use super::*;
use crate::storage::pg_cluster::{test_postgres, TestPostgres};
use crate::storage::pg_migrate::MIGRATIONS;

fn with_sslmode(mode: &str) -> PostgresConfig {
    let mut config = test_postgres().fresh();
    config.url.push_str(&format!(" sslmode={mode}"));
    config.ca_file = String::new();
    config
}

/// With `sslmode=require` the connection is TLS and the server's certificate is verified:
/// signed by the authority in `ca_file` it connects; against the system's roots, which do
/// not know that authority, it is refused; a `ca_file` that cannot be read is named.
#[test]
fn tls_to_the_database_verifies_the_server_certificate() {
    let ca = test_postgres()
        .ca_file()
        .expect("the tests' server has a certificate")
        .display()
        .to_string();
    let mut trusted = with_sslmode("require");
    trusted.ca_file = ca;
    let kv = PgKv::open(&trusted).expect("TLS with the server's authority");
    kv.commit(Batch {
        writes: vec![super::super::kv::Put {
            space: Space::Meta,
            key: b"k".to_vec(),
            value: Some(b"v".to_vec()),
        }],
        ..Batch::default()
    })
    .unwrap();
    assert_eq!(
        kv.snapshot().unwrap().get(Space::Meta, b"k").unwrap(),
        Some(b"v".to_vec())
    );

    let refused = PgKv::open(&with_sslmode("require"))
        .err()
        .expect("an unknown authority is refused");
    assert!(
        refused.to_string().to_lowercase().contains("certificate"),
        "{refused}"
    );

    let mut missing = with_sslmode("require");
    missing.ca_file = "/nonexistent/ca.pem".into();
    let refused = PgKv::open(&missing).err().expect("a missing ca_file");
    assert!(
        refused
            .to_string()
            .contains("storage.postgres.ca_file /nonexistent/ca.pem"),
        "{refused}"
    );
}

/// Every pooled connection busy for the whole wait: `storage_unavailable` (503 with
/// `Retry-After`), not a storage failure (500), and the next read after one is free works.
#[test]
fn no_free_connection_is_unavailable_not_a_failure() {
    let mut config = test_postgres().fresh();
    config.pool_size = 1;
    config.connect_timeout_ms = 200;
    let kv = PgKv::open(&config).unwrap();
    let held = kv.snapshot().unwrap();
    let refused = kv.snapshot().err().expect("no connection is free");
    assert_eq!(refused.code(), "storage_unavailable", "{refused}");
    drop(held);
    kv.snapshot().expect("a connection is free again");
}

/// Notices between two handles on one schema (two nodes): a commit's notice reaches the
/// other handle, a refused commit's never does, and after the listening connection is cut
/// (as by a database restart) the listener reconnects and hands over a notice that wakes
/// everything, since notices may have been missed meanwhile. A handle on another schema
/// hears none of it.
#[test]
fn notices_reach_the_other_nodes_only_for_commits_and_a_reconnect_wakes_everything() {
    let config = test_postgres().fresh();
    let a = PgKv::open(&config).unwrap();
    let b = PgKv::open(&config).unwrap();
    let elsewhere = PgKv::open(&test_postgres().fresh()).unwrap();
    let mut heard = b.take_notices().expect("b listens");
    let mut other = elsewhere.take_notices().expect("listens");
    assert!(b.take_notices().is_none(), "taken once");
    let recv = |rx: &mut tokio::sync::mpsc::Receiver<String>, within_ms: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(within_ms);
        loop {
            match rx.try_recv() {
                Ok(n) => return Some(n),
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(_) => return None,
            }
        }
    };
    let put = |v: &[u8], notify: &str, expect: Option<Option<&[u8]>>| Batch {
        writes: vec![super::super::kv::Put {
            space: Space::Meta,
            key: b"n".to_vec(),
            value: Some(v.to_vec()),
        }],
        expect: expect
            .map(|e| super::super::kv::Expect {
                space: Space::Meta,
                key: b"n".to_vec(),
                value: e.map(<[u8]>::to_vec),
            })
            .into_iter()
            .collect(),
        notify: Some(notify.to_string()),
        ..Batch::default()
    };
    // The listener may still be connecting: commit until a notice is heard. The first one
    // it hands over is a wake-all (notices sent before it listened were missed).
    let mut first = None;
    let mut woke_all = false;
    'listening: for i in 0..200 {
        a.commit(put(b"1", &format!("hello {i}"), None)).unwrap();
        while let Some(n) = recv(&mut heard, 50) {
            if n.starts_with("hello ") {
                first = Some(n);
                break 'listening;
            }
            woke_all |= crate::remote_wake::decode(&n, 42).is_some_and(|w| w.all);
        }
    }
    assert!(first.is_some(), "a notice heard");
    assert!(woke_all, "a wake-all once listening");
    while recv(&mut heard, 200).is_some() {}
    let refused = a.commit(put(b"2", "refused", Some(Some(b"nope"))));
    assert_eq!(refused.unwrap_err().code(), "storage_conflict");
    a.commit(put(b"3", "committed", None)).unwrap();
    assert_eq!(
        recv(&mut heard, 5_000).as_deref(),
        Some("committed"),
        "only the commit's notice"
    );
    while let Some(n) = recv(&mut other, 300) {
        assert!(
            crate::remote_wake::decode(&n, 42).is_some_and(|w| w.all),
            "another schema's nodes hear only their own listener's wake-all: {n}"
        );
    }

    // Cut b's listening connection from the server side.
    let channel = b.shared.channel.clone();
    let shared = a.shared.clone();
    let cut = a
        .run(async move {
            let conn = shared.write.get().await.map_err(pool_error)?;
            let n = conn
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = $1",
                    &[&format!("postroom-listen {channel}")],
                )
                .await?;
            Ok(n)
        })
        .unwrap();
    assert!(cut >= 1, "a listening connection was cut");
    let everything = recv(&mut heard, 10_000).expect("a notice after reconnecting");
    let wake = crate::remote_wake::decode(&everything, 42).expect("a wake");
    assert!(wake.all, "{everything}");
    // And notices flow again.
    a.commit(put(b"4", "again", None)).unwrap();
    assert_eq!(recv(&mut heard, 5_000).as_deref(), Some("again"));
}

/// A listening connection whose server stops answering without closing it (the machine or
/// network gone: here its server process is stopped with SIGSTOP, so the kernel still answers
/// TCP keepalives) is given up after an unanswered ping and opened again, with a wake-all
/// notice, within seconds. Before the ping, nothing noticed: the node heard no other node's
/// notice until the connection was closed. On a server of the test's own (the test signals its
/// process).
#[test]
fn a_listening_connection_that_stops_answering_is_replaced() {
    let server = TestPostgres::start(false).expect("a server of the test's own");
    let config = server.fresh();
    let a = PgKv::open(&config).unwrap();
    let b = PgKv::open(&config).unwrap();
    let mut heard = b.take_notices().expect("b listens");
    let name = format!("postroom-listen {}", b.shared.channel);
    let listeners = || -> Vec<String> {
        server
            .query(&format!(
                "SELECT string_agg(pid::text, ' ') FROM pg_stat_activity WHERE application_name = '{name}'"
            ))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut stopped = listeners();
    while stopped.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "listeners: {stopped:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        stopped = listeners();
    }
    // b's listener has listened once (its first wake-all is heard) before it is stopped, so
    // that the wake-all awaited below can only come from a reconnection.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match heard.try_recv() {
            Ok(n) if crate::remote_wake::decode(&n, 42).is_some_and(|w| w.all) => break,
            Ok(_) => {}
            Err(_) => {
                assert!(std::time::Instant::now() < deadline, "b never listened");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
    while heard.try_recv().is_ok() {}
    let signal = |sig: &str| {
        for pid in &stopped {
            let ok = std::process::Command::new("kill")
                .args([sig, pid])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} {pid}");
        }
    };
    signal("-STOP");
    let started = std::time::Instant::now();
    let woke = loop {
        match heard.try_recv() {
            Ok(n) if crate::remote_wake::decode(&n, 42).is_some_and(|w| w.all) => break true,
            Ok(_) => {}
            Err(_) if started.elapsed() < std::time::Duration::from_secs(20) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(_) => break false,
        }
    };
    signal("-CONT");
    assert!(
        woke,
        "no reconnection within 20 s of the server going silent"
    );
    // The new connection hears the other node's commits.
    let put = Batch {
        writes: vec![super::super::kv::Put {
            space: Space::Meta,
            key: b"n".to_vec(),
            value: Some(b"1".to_vec()),
        }],
        notify: Some("after".into()),
        ..Batch::default()
    };
    a.commit(put).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match heard.try_recv() {
            Ok(n) if n == "after" => break,
            Ok(_) => {}
            Err(_) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no notice after reconnecting"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// What `migrate --check` reports: every step on a fresh schema, none once it is opened.
#[test]
fn pending_migrations_are_listed_until_applied() {
    let config = test_postgres().fresh();
    let pending = pending_migrations(&config).unwrap();
    assert_eq!(
        pending.iter().map(|m| m.version).collect::<Vec<_>>(),
        MIGRATIONS.iter().map(|m| m.0).collect::<Vec<_>>()
    );
    drop(PgKv::open(&config).unwrap());
    assert!(pending_migrations(&config).unwrap().is_empty());
}

/// A condition on a row the batch only reads (a guard: the push lease an outcome was pushed
/// under) is a fence on PostgreSQL too: another node's change to that row, committed while the
/// batch's commit runs, makes the commit fail rather than both succeeding. Another
/// transaction holds an uncommitted change to the guarded row; the batch's commit waits for
/// it (the row is read `FOR SHARE`), and fails once it commits. A plain read of the row let the
/// batch commit at once over the change (the reviewer's finding).
#[test]
fn a_guarded_row_changed_while_the_commit_runs_fails_the_commit() {
    use super::super::kv::{Expect, Put};
    let config = test_postgres().fresh();
    let a = PgKv::open(&config).unwrap();
    let b = PgKv::open(&config).unwrap();
    let lease = |v: &[u8]| Put {
        space: Space::DispatchLeases,
        key: b"sub".to_vec(),
        value: Some(v.to_vec()),
    };
    a.commit(Batch {
        writes: vec![lease(b"A1")],
        ..Batch::default()
    })
    .unwrap();
    // B takes the lease in a transaction it keeps open until told.
    let (taken_tx, taken_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let shared = b.shared.clone();
    let runtime = b.runtime.as_ref().unwrap().handle().clone();
    let takeover = runtime.spawn(async move {
        let conn = shared.write.get().await.unwrap();
        conn.batch_execute(&format!(
            "BEGIN; UPDATE postroom_kv SET value = 'B2'::bytea WHERE space = {} AND key = 'sub'::bytea",
            Space::DispatchLeases as i16
        ))
        .await
        .unwrap();
        taken_tx.send(()).unwrap();
        let _ = go_rx.await;
        conn.batch_execute("COMMIT").await.unwrap();
    });
    taken_rx.recv().unwrap();
    // A records an outcome under A1: it writes another row and only reads the lease.
    let outcome = std::thread::spawn(move || {
        let result = a.commit(Batch {
            writes: vec![Put {
                space: Space::Deliveries,
                key: b"d".to_vec(),
                value: None,
            }],
            expect: vec![Expect {
                space: Space::DispatchLeases,
                key: b"sub".to_vec(),
                value: Some(b"A1".to_vec()),
            }],
            ..Batch::default()
        });
        (a, result)
    });
    // Until A's commit waits on B's row lock (or has finished: the defect).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !outcome.is_finished()
        && test_postgres()
            .query("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            .parse::<i64>()
            .unwrap_or(0)
            == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the commit neither waited nor finished"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = go_tx.send(());
    runtime.block_on(takeover).unwrap();
    let (_a, result) = outcome.join().unwrap();
    assert_eq!(
        result.map_err(|e| e.code()),
        Err("storage_conflict"),
        "committed over another node's takeover"
    );
}
