//! `postroom serve` processes on the PostgreSQL backend, as the multi-node tests start them:
//! each on an ephemeral loopback port over one database, with its standard output and its log
//! (standard error) captured for the test to read.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::DEADLINE;

/// The binary with none of the user's `POSTROOM_*` settings, on the PostgreSQL database `pg`
/// (its URL and the authority of its certificate: the tests' server is reached over TLS).
pub fn postroom(pg: &broker_core::PostgresConfig) -> Command {
    let url = pg.url.as_str();
    let mut c = Command::new(env!("CARGO_BIN_EXE_postroom"));
    for (k, _) in std::env::vars() {
        if k.starts_with("POSTROOM_") {
            c.env_remove(k);
        }
    }
    c.env("POSTROOM_STORAGE__BACKEND", "postgres");
    if !url.is_empty() {
        c.env("POSTROOM_STORAGE__POSTGRES__URL", url);
    }
    if !pg.ca_file.is_empty() {
        c.env("POSTROOM_STORAGE__POSTGRES__CA_FILE", &pg.ca_file);
    }
    c
}

/// A `postroom serve` child, the address it announced, and its log so far.
pub struct Node {
    pub child: Child,
    pub base: String,
    /// Every line the node has logged (standard error), as it comes.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// A node with authentication off.
    pub fn start(pg: &broker_core::PostgresConfig) -> Node {
        Node::start_with(pg, true).0
    }

    /// A node, with authentication off or on, and the receiver of its later stdout lines.
    pub fn start_with(
        pg: &broker_core::PostgresConfig,
        no_auth: bool,
    ) -> (Node, std::sync::mpsc::Receiver<String>) {
        Node::start_env(pg, no_auth, &[])
    }

    /// [`Node::start_with`] with these extra environment variables.
    pub fn start_env(
        pg: &broker_core::PostgresConfig,
        no_auth: bool,
        env: &[(&str, &str)],
    ) -> (Node, std::sync::mpsc::Receiver<String>) {
        let mut c = postroom(pg);
        c.arg("serve");
        if no_auth {
            c.arg("--insecure-no-auth");
        }
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let line = match rx.recv_timeout(DEADLINE) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                panic!("postroom did not announce itself: {e}");
            }
        };
        assert!(line.contains("PostgreSQL database"), "{line}");
        let addr = line
            .strip_prefix("postroom listening on http://")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected line: {line}"))
            .to_string();
        (
            Node {
                child,
                base: format!("http://{addr}"),
                log,
            },
            rx,
        )
    }

    /// Whether the node has logged a line containing `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(text))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request with a JSON body (or none): the status and the JSON answer (`null` if none).
pub async fn call(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut req = client.request(method, url).timeout(DEADLINE);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// A Room `moves` with the keyed event type `MoveProposed`, made through `node`.
pub async fn setup(node: &Node) {
    let (s, body) = call(
        reqwest::Method::POST,
        format!("{}/v1/rooms", node.base),
        Some(serde_json::json!({"name": "moves"})),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    let schema = serde_json::json!({"type": "object", "required": ["move_id"], "properties": {"move_id": {"type": "string"}}});
    let (s, body) = call(
        reqwest::Method::PUT,
        format!("{}/v1/rooms/moves/event-types/MoveProposed", node.base),
        Some(serde_json::json!({"schema": schema, "key_pointer": "/move_id"})),
    )
    .await;
    assert_eq!(s, 201, "{body}");
}
