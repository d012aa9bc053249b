//! The `postroom` client subcommands as a user runs them: each test starts a real server on a
//! free loopback port, runs the built binary against it and checks what it prints and how it
//! exits. These exist because the unit tests of the CLI modules cannot show that the commands,
//! the HTTP routes and the exit codes fit together.
#![forbid(unsafe_code)]

#[path = "../common/mod.rs"]
mod common;
use common::{local, wait, DEADLINE};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use broker_server::ServerConfig;
use serde_json::Value;

/// A server on a free port with its own data folder, stopped when dropped.
struct Server {
    runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), broker_server::StartError>>>,
    dir: tempfile::TempDir,
}

/// The administrator's secret of the servers with authentication on.
const ADMIN_SECRET: &str = "a-long-admin-secret-123";

/// The administrator's application, which the server creates on first start.
const ADMIN_APP: &str = "local/ADMIN/postroom/admin";

impl Server {
    fn start() -> Self {
        Self::start_with(local())
    }

    /// A server with authentication on, whose first administrator is client `admin` with
    /// [`ADMIN_SECRET`].
    fn start_secured() -> Self {
        let mut c = ServerConfig::default();
        c.auth.insecure_no_auth = false;
        c.auth.admin_client_id = Some("admin".into());
        c.auth.admin_client_secret = Some(ADMIN_SECRET.into());
        Self::start_with(c)
    }

    fn start_with(base: ServerConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ServerConfig {
            // Created by the server, private; the temporary folder itself is 0755.
            data_dir: dir.path().join("data"),
            ..base
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = runtime.spawn(broker_server::serve(listener, config, async move {
            let _ = stopped.await;
        }));
        Server {
            runtime,
            addr,
            stop: Some(stop),
            task: Some(task),
            dir,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The binary with `--server` pointing here and none of the user's own settings.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = bare_command();
        c.arg("--server").arg(self.url()).args(args);
        c
    }

    /// Runs the binary and returns its output.
    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs the binary, expecting success, and returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "postroom {args:?} failed with {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the binary with `--json`, expecting success, and parses its stdout.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    /// Runs the binary with `stdin` as its standard input.
    fn run_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }

    /// A file in the server's temporary folder with these contents.
    fn file(&self, name: &str, contents: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path.to_str().unwrap().to_string()
    }

    /// A Room `irc` with the event type `msg` whose key is `/user`.
    fn with_room(&self) {
        self.ok(&["rooms", "create", "irc"]);
        let schema = self.file(
            "msg.json",
            r#"{"type":"object","properties":{"n":{"type":"integer"},"user":{"type":"string"}},"required":["n","user"]}"#,
        );
        self.ok(&[
            "types",
            "put",
            "irc",
            "msg",
            "--schema",
            &schema,
            "--key-pointer",
            "/user",
        ]);
    }

    /// Publishes `payload` to `irc`/`msg` from standard input and returns the event id.
    fn publish(&self, payload: &str) -> String {
        let out = self.run_with_stdin(&["--json", "publish", "irc", "msg"], payload.as_bytes());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["id"].as_str().unwrap().to_string()
    }

    /// A new pull subscription on `irc`, with extra `subs create` options; returns its id.
    fn pull_subscription(&self, extra: &[&str]) -> String {
        let mut args = vec!["subs", "create", "irc", "--pull"];
        args.extend_from_slice(extra);
        let v = self.json(&args);
        v["subscription"]["id"].as_str().unwrap().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = self.runtime.block_on(task);
        }
    }
}

/// The binary with none of the user's `POSTROOM_*` client settings.
fn bare_command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_postroom"));
    for v in [
        "POSTROOM_SERVER",
        "POSTROOM_TOKEN",
        "POSTROOM_CLIENT_ID",
        "POSTROOM_CLIENT_SECRET",
        "POSTROOM_CACHE_DIR",
    ] {
        c.env_remove(v);
    }
    c
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn rooms_create_list_get_delete() {
    let s = Server::start();
    let out = s.ok(&["rooms", "create", "irc", "--description", "chat about chat"]);
    assert!(
        out.contains("irc") && out.contains("chat about chat"),
        "{out}"
    );

    let table = s.ok(&["rooms", "list"]);
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("NAME"), "{table}");
    let row = lines.next().unwrap();
    assert!(row.starts_with("irc ") && row.contains("active"), "{table}");

    let v = s.json(&["rooms", "list"]);
    assert_eq!(v["items"][0]["name"], "irc");
    assert_eq!(v["items"][0]["ordered"], true);
    // The global options may also come after the subcommand.
    let v: Value = serde_json::from_str(&s.ok(&["rooms", "get", "irc", "--json"])).unwrap();
    assert_eq!(v["description"], "chat about chat");
    assert!(s.ok(&["rooms", "get", "irc"]).contains("chat about chat"));

    s.ok(&["rooms", "create", "loose", "--unordered"]);
    assert_eq!(s.json(&["rooms", "get", "loose"])["ordered"], false);

    let again = s.run(&["rooms", "create", "irc"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).starts_with("error: ") && stderr(&again).contains("(room_exists, HTTP 409)"),
        "{}",
        stderr(&again)
    );

    assert!(s
        .ok(&["rooms", "delete", "loose"])
        .contains("deleted room loose"));
    let gone = s.run(&["rooms", "get", "loose"]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(
        stderr(&gone).contains("(room_not_found, HTTP 404)"),
        "{}",
        stderr(&gone)
    );
}

#[test]
fn types_publish_from_file_and_stdin_and_schema_violations() {
    let s = Server::start();
    s.with_room();
    let table = s.ok(&["types", "list", "irc"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("msg ") && l.contains("/user")),
        "{table}"
    );
    assert_eq!(s.json(&["types", "get", "irc", "msg"])["version"], 1);

    let file = s.file("event.json", r#"{"n": 1, "user": "ann"}"#);
    let out = s.ok(&["publish", "irc", "msg", "--file", &file]);
    assert!(out.contains("key ann, sequence 1"), "{out}");
    let out = s.run_with_stdin(&["publish", "irc", "msg"], br#"{"n": 2, "user": "ann"}"#);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("key ann, sequence 2"));
    let out = s.run_with_stdin(
        &[
            "publish",
            "irc",
            "msg",
            "--file",
            "-",
            "--idempotency-key",
            "once",
        ],
        br#"{"n": 3, "user": "bob"}"#,
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // All three events are stored, in order, with their payloads.
    let out = s.ok(&["--json", "tail", "irc", "--from-start", "--count", "3"]);
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{out}");
    assert_eq!(events[0]["payload"]["n"], 1);
    assert_eq!(events[1]["payload"]["n"], 2);
    assert_eq!(events[2]["event"]["key"], "bob");
    assert_eq!(events[2]["event"]["idempotency_key"], "once");
    // The readable form names the type, key and sequence.
    let out = s.ok(&["tail", "irc", "--from-start", "--count", "1"]);
    assert!(
        out.contains("msg  key=ann  seq=1") && out.contains(r#"{"n":1,"user":"ann"}"#),
        "{out}"
    );

    let bad = s.run_with_stdin(
        &["publish", "irc", "msg"],
        br#"{"n": "one", "user": "ann"}"#,
    );
    assert_eq!(bad.status.code(), Some(1));
    let err = stderr(&bad);
    assert!(err.contains("(schema_violation, HTTP 422)"), "{err}");
    assert!(err.contains("at /n:") && err.contains("integer"), "{err}");
    assert!(bad.stdout.is_empty());

    let not_json = s.run_with_stdin(&["publish", "irc", "msg"], b"{nope");
    assert_eq!(not_json.status.code(), Some(1));
    assert!(
        stderr(&not_json).contains("HTTP 400"),
        "{}",
        stderr(&not_json)
    );

    let missing = s.run(&["publish", "irc", "msg", "--file", "/nonexistent/x.json"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("cannot read /nonexistent/x.json"));

    let bad_schema = s.file("bad.json", "{not json");
    let out = s.run(&["types", "put", "irc", "other", "--schema", &bad_schema]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is not JSON"), "{}", stderr(&out));
}

#[test]
fn pull_ack_then_nothing_is_left() {
    let s = Server::start();
    s.with_room();
    let sub = s.pull_subscription(&[]);
    let listed = s.ok(&["subs", "list", "irc"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&sub) && l.contains("pull")),
        "{listed}"
    );
    assert_eq!(s.json(&["subs", "get", &sub])["status"], "active");

    let id = s.publish(r#"{"n": 1, "user": "ann"}"#);
    let out = s.ok(&["pull", &sub, "--ack", "--wait-ms", "5000"]);
    assert!(
        out.contains(&id) && out.contains(r#"{"n":1,"user":"ann"}"#),
        "{out}"
    );
    assert!(out.contains("acknowledged 1"), "{out}");

    let after = s.json(&["pull", &sub]);
    assert_eq!(after["messages"].as_array().unwrap().len(), 0, "{after}");
    assert!(s.ok(&["pull", &sub]).contains("no messages"));
    assert_eq!(s.json(&["subs", "get", &sub])["backlog"], 0);

    // Acknowledging without a lease fails, and says which ack id failed.
    let out = s.run(&["ack", &sub, "0-1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("0-1"), "{}", stderr(&out));

    assert_eq!(s.json(&["subs", "pause", &sub])["status"], "paused");
    assert_eq!(s.json(&["subs", "resume", &sub])["status"], "active");
    s.ok(&["subs", "delete", &sub]);
    let out = s.run(&["subs", "get", &sub]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("HTTP 404"), "{}", stderr(&out));
}

/// Pulls one message from `sub`, waiting for it, and returns its ack id.
fn pull_one(s: &Server, sub: &str) -> String {
    let v = s.json(&["pull", sub, "--max", "1", "--wait-ms", "5000"]);
    let messages = v["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "{v}");
    messages[0]["ack_id"].as_str().unwrap().to_string()
}

#[test]
fn dead_letters_list_redrive_purge() {
    let s = Server::start();
    s.with_room();
    // One attempt only: a nack sends the event straight to the dead letters.
    let sub = s.pull_subscription(&["--attempts-max", "1"]);
    let id = s.publish(r#"{"n": 1, "user": "ann"}"#);
    let ack = pull_one(&s, &sub);
    assert!(s.ok(&["nack", &sub, &ack]).contains("nacked 1 of 1"));

    let table = s.ok(&["dead-letters", "list", &sub]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("attempts_exhausted")),
        "{table}"
    );

    let out = s.ok(&["dead-letters", "redrive", &sub, "--event", &id]);
    assert!(out.contains("redriven 1"), "{out}");
    assert_eq!(
        s.json(&["dead-letters", "list", &sub])["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // Redriven, it is delivered again; `term` dead-letters it once more.
    let ack = pull_one(&s, &sub);
    assert!(s.ok(&["term", &sub, &ack]).contains("dead-lettered 1 of 1"));
    let v = s.json(&["dead-letters", "list", &sub]);
    assert_eq!(v["items"][0]["event_id"], id.as_str());
    assert_eq!(v["items"][0]["reason"], "terminated");

    assert!(s.ok(&["dead-letters", "purge", &sub]).contains("purged 1"));
    assert_eq!(
        s.json(&["dead-letters", "list", &sub])["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // Redriving with none left is no error.
    assert!(s
        .ok(&["dead-letters", "redrive", &sub])
        .contains("redriven 0"));
}

#[test]
fn tail_follows_only_new_events_and_stops_after_count() {
    let s = Server::start();
    s.with_room();
    // Events before tail starts are not shown.
    for n in 0..3 {
        s.publish(&format!(r#"{{"n": {n}, "user": "old"}}"#));
    }
    let mut child = s
        .command(&[
            "--json",
            "tail",
            "irc",
            "--count",
            "2",
            "--interval-ms",
            "20",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines_rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    // Tail announces itself once it knows where the end is; events published after that must
    // be shown.
    let started = Instant::now();
    loop {
        let left = DEADLINE.saturating_sub(started.elapsed());
        match lines_rx.recv_timeout(left) {
            Ok(line) if line.contains("tailing room irc from the end") => break,
            Ok(_) => continue,
            Err(e) => {
                let _ = child.kill();
                panic!("tail did not start: {e}");
            }
        }
    }
    let first = s.publish(r#"{"n": 10, "user": "new"}"#);
    let second = s.publish(r#"{"n": 11, "user": "other"}"#);
    let status = wait(&mut child);
    assert!(status.success(), "{status:?}");
    let out = reader.join().unwrap();
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{out}");
    assert_eq!(events[0]["event"]["id"], first.as_str());
    assert_eq!(events[1]["event"]["id"], second.as_str());
    assert_eq!(events[1]["payload"]["n"], 11);
}

#[test]
fn tail_filters_by_key_and_pages_through_many_events() {
    let s = Server::start();
    s.with_room();
    // More than one page (100) of events, so that tail has to follow the listing's cursor.
    let payloads: String = (0..150)
        .map(|n| {
            format!(
                "{{\"n\": {n}, \"user\": \"{}\"}}",
                if n % 3 == 0 { "ann" } else { "bob" }
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    for p in payloads.lines() {
        s.publish(p);
    }
    let out = s.ok(&[
        "--json",
        "tail",
        "irc",
        "--from-start",
        "--key",
        "ann",
        "--count",
        "50",
    ]);
    let ns: Vec<i64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["payload"]["n"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(ns, (0..150).step_by(3).collect::<Vec<_>>());
    // Unfiltered, the first page is full and tail goes on from the cursor it was given.
    let out = s.ok(&["--json", "tail", "irc", "--from-start", "--count", "150"]);
    let ns: Vec<i64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["payload"]["n"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(ns, (0..150).collect::<Vec<_>>());
}

#[test]
fn an_unreachable_server_exits_3_naming_the_url() {
    // A port that was free a moment ago and has nobody listening now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out = bare_command()
        .args(["--server", &url, "rooms", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot reach the server at {url}")),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = bare_command()
        .args(["subs", "create", "irc"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = bare_command()
        .args(["--server", "not a url", "rooms", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("invalid --server URL"));
}

#[test]
fn the_server_and_token_come_from_the_environment() {
    let s = Server::start();
    s.ok(&["rooms", "create", "irc"]);
    let out = bare_command()
        .env("POSTROOM_SERVER", s.url())
        .args(["rooms", "list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("irc"));

    // The token is sent as a bearer token, from the flag or from POSTROOM_TOKEN. A one-shot
    // listener stands in for the server to see the request.
    for (flag, env) in [(Some("flag-token"), None), (None, Some("env-token"))] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                head.push(line.trim().to_string());
            }
            let body = r#"{"items":[],"next_cursor":null}"#;
            write!(
                &conn,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            head
        });
        let mut c = bare_command();
        c.args(["--server", &url, "rooms", "list"]);
        if let Some(t) = flag {
            c.args(["--token", t]);
        }
        if let Some(t) = env {
            c.env("POSTROOM_TOKEN", t);
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let head = seen.join().unwrap();
        let expected = format!("bearer {}", flag.or(env).unwrap());
        assert!(
            head.iter()
                .any(|h| h.to_ascii_lowercase() == format!("authorization: {expected}")),
            "{head:?}"
        );
    }
}

#[test]
fn tail_ends_quietly_when_its_reader_goes_away() {
    let s = Server::start();
    s.with_room();
    s.publish(r#"{"n": 1, "user": "ann"}"#);
    let mut child = s
        .command(&["tail", "irc", "--from-start", "--interval-ms", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains(r#"{"n":1,"user":"ann"}"#), "{first}");
    // Like `postroom tail | head -1`: the reader is gone before the next event is written.
    drop(stdout);
    s.publish(r#"{"n": 2, "user": "ann"}"#);
    let status = wait(&mut child);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

mod accounts;
