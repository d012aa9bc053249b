//! A local webhook receiver for delivery tests: an axum server on a loopback port that records
//! every request and answers as the test tells it (succeed, fail, time out, redirect, 429 with
//! Retry-After, 410, fail at random, or hold its answer until the test releases it), by path or
//! by ordering key.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use rand::Rng;
use tokio::sync::mpsc;

/// How the receiver answers.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// 200.
    Ok,
    /// This status.
    Status(u16),
    /// This status with `Retry-After: secs`.
    RetryAfter(u16, u64),
    /// Wait this long, then 200 (longer than the broker's timeout means a timeout).
    Sleep(Duration),
    /// 307 to `/hook/<path>` on the same server.
    Redirect(String),
    /// 500 with this probability (0..1), else 200.
    FailRandomly(f64),
    /// 200 once the test has called [`Receiver::release`] (at once if it already has): lets a
    /// test act while a push is known to be under way.
    Hold,
}

/// One request the receiver saw.
#[derive(Clone, Debug)]
pub struct Received {
    /// The path after `/hook/`.
    pub path: String,
    /// Headers, names lower-case.
    pub headers: HashMap<String, String>,
    /// The raw body.
    pub body: Vec<u8>,
    /// What the receiver answered.
    pub status: u16,
    /// The sender's address: one per TCP connection, so that tests can count connections.
    pub peer: std::net::SocketAddr,
}

impl Received {
    /// A header's value, or "".
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

struct Shared {
    default: Mutex<Behaviour>,
    script: Mutex<VecDeque<Behaviour>>,
    per_path: Mutex<HashMap<String, Behaviour>>,
    /// By the `postroom-key` header; before `per_path`.
    per_key: Mutex<HashMap<String, Behaviour>>,
    /// Opened by [`Receiver::release`]; held requests wait for it.
    gate: tokio::sync::watch::Sender<bool>,
    tx: mpsc::UnboundedSender<Received>,
}

/// The running receiver.
pub struct Receiver {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    shared: Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Received>,
}

impl Receiver {
    /// Starts a receiver on a free loopback port.
    pub async fn start() -> Receiver {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            default: Mutex::new(Behaviour::Ok),
            script: Mutex::new(VecDeque::new()),
            per_path: Mutex::new(HashMap::new()),
            per_key: Mutex::new(HashMap::new()),
            gate: tokio::sync::watch::Sender::new(false),
            tx,
        });
        let app = Router::new()
            .route("/hook/{*path}", post(handle))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let base = format!("http://{}", listener.local_addr().expect("local addr"));
        tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
            let _ = axum::serve(listener, app).await;
        });
        Receiver { base, shared, rx }
    }

    /// The URL of `/hook/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("{}/hook/{path}", self.base)
    }

    /// Answer every request like this (after any scripted answers).
    pub fn set(&self, b: Behaviour) {
        *self.shared.default.lock().unwrap() = b;
    }

    /// Answer requests to one path like this.
    pub fn set_for(&self, path: &str, b: Behaviour) {
        self.shared
            .per_path
            .lock()
            .unwrap()
            .insert(path.to_string(), b);
    }

    /// Answer requests for one ordering key (the `postroom-key` header) like this, whatever
    /// their path; scripted answers still come first.
    pub fn set_for_key(&self, key: &str, b: Behaviour) {
        self.shared
            .per_key
            .lock()
            .unwrap()
            .insert(key.to_string(), b);
    }

    /// Answer the next requests like these, in order.
    pub fn script(&self, answers: impl IntoIterator<Item = Behaviour>) {
        self.shared.script.lock().unwrap().extend(answers);
    }

    /// Lets every [`Behaviour::Hold`] request answer, now and from now on.
    pub fn release(&self) {
        self.shared.gate.send_replace(true);
    }

    /// The next request, waiting up to `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Received> {
        tokio::time::timeout(within, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Requests until `done` says enough, failing the test at `within`.
    pub async fn collect_until(
        &mut self,
        within: Duration,
        mut done: impl FnMut(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        while !done(&got) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(r) => got.push(r),
                None => panic!(
                    "receiver: condition not met within {within:?}; got {} requests",
                    got.len()
                ),
            }
        }
        got
    }

    /// Everything received so far without waiting.
    pub fn drain(&mut self) -> Vec<Received> {
        let mut got = Vec::new();
        while let Ok(r) = self.rx.try_recv() {
            got.push(r);
        }
        got
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let behaviour = {
        let scripted = shared.script.lock().unwrap().pop_front();
        let key = headers
            .get("postroom-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        scripted
            .or_else(|| shared.per_key.lock().unwrap().get(key).cloned())
            .or_else(|| shared.per_path.lock().unwrap().get(&path).cloned())
            .unwrap_or_else(|| shared.default.lock().unwrap().clone())
    };
    let status = match &behaviour {
        Behaviour::Ok | Behaviour::Sleep(_) | Behaviour::Hold => 200,
        Behaviour::Status(s) | Behaviour::RetryAfter(s, _) => *s,
        Behaviour::Redirect(_) => 307,
        Behaviour::FailRandomly(p) => {
            if rand::rng().random_bool(*p) {
                500
            } else {
                200
            }
        }
    };
    // Recorded on arrival: a sender that times out drops the connection, which cancels this
    // handler before it could record anything afterwards.
    let headers = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let _ = shared.tx.send(Received {
        path,
        headers,
        body: body.to_vec(),
        status,
        peer,
    });
    match behaviour {
        Behaviour::Sleep(d) => {
            tokio::time::sleep(d).await;
            StatusCode::OK.into_response()
        }
        Behaviour::Hold => {
            let mut gate = shared.gate.subscribe();
            let _ = gate.wait_for(|open| *open).await;
            StatusCode::OK.into_response()
        }
        Behaviour::RetryAfter(_, secs) => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
            (code, [("retry-after", secs.to_string())]).into_response()
        }
        Behaviour::Redirect(to) => (
            StatusCode::TEMPORARY_REDIRECT,
            [("location", format!("/hook/{to}"))],
        )
            .into_response(),
        _ => StatusCode::from_u16(status)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            .into_response(),
    }
}
