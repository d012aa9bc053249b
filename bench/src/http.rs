//! The HTTP parts: the ceiling (publish against a no-op handler on the same server) and the
//! GovStack floor (1,000 concurrent clients on the GovStack publish route).
//!
//! The server runs in this process: `broker_server::router` (every layer `postroom serve` has:
//! request ids, tracing, metrics, limits, authentication in its no-auth mode, idempotency) on a
//! loopback listener, plus one extra route, `POST /noop`, merged outside those layers. The no-op
//! reads the body and checks it is JSON, then answers 200: what a bare axum handler can do on
//! this machine, so publish/no-op is the share of the ceiling the broker keeps. The load
//! generator is the same for both: one hyper HTTP/1.1 connection per client, each client sending
//! its next request when the previous one is answered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderName, HeaderValue, Request, StatusCode};
use axum::routing::post;
use axum::Router;
use broker_server::ServerConfig;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::common::{self, Error, Fixture, Latency, Load, Section, Settings};

/// The publish route of the native API for the benchmark Room.
const PUBLISH_PATH: &str = "/v1/rooms/bench/events/reading";
/// The GovStack application whose Room is `bench`.
const GOV_CLIENT: &str = "BENCH/GOV/M1/bench";
const GOV_PUBLISH_PATH: &str = "/r1/BENCH/GOV/M1/bench/pub/v1/reading";
const KEYS: u64 = 1000;

/// A server of this process on a loopback port.
pub struct Server {
    pub addr: SocketAddr,
    pub fixture: Fixture,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<()>,
}

impl Server {
    /// A server with authentication off (every caller is the local administrator).
    pub async fn start(settings: &Settings, name: &str) -> Result<Server, Error> {
        Server::start_with(settings, name, false).await
    }

    /// A server that checks bearer tokens when `authenticated`, as `postroom serve` does.
    pub async fn start_with(
        settings: &Settings,
        name: &str,
        authenticated: bool,
    ) -> Result<Server, Error> {
        let mut config = ServerConfig::default();
        config.auth.insecure_no_auth = !authenticated;
        config.data_dir = format!("{}/{name}", settings.dir).into();
        let _ = std::fs::remove_dir_all(&config.data_dir);
        std::fs::create_dir_all(&config.data_dir)?;
        config.broker = common::config();
        // Room for the 1,000-connection cases plus a margin: the default bound (1,024) would shed.
        config.http.concurrent_requests_max = 4096;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        config.validate(addr)?;
        let broker =
            broker_core::Broker::open(config.database_path(), config.broker.clone()).await?;
        let fixture = Fixture::new(broker.clone()).await?;
        let app = broker_server::router(broker, &config)?
            .merge(Router::new().route("/noop", post(noop)))
            .merge(
                Router::new()
                    .route("/publish-bare", post(bare_publish))
                    .with_state(fixture.clone()),
            );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // As `broker_server::serve` does. `BENCH_NODELAY=0` turns it off to show what Nagle's
        // algorithm cost before it was set there (the profile step in BENCHMARKS.md).
        let nodelay = std::env::var("BENCH_NODELAY").map_or(true, |v| v != "0");
        let listener = axum::serve::ListenerExt::tap_io(listener, move |tcp| {
            if nodelay {
                let _ = tcp.set_nodelay(true);
            }
        });
        let served = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Server {
            addr,
            fixture,
            stop,
            served,
        })
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.served.await;
        self.fixture.broker.close().await;
    }
}

/// A publisher's access token on an authenticated server: registers a member, an application
/// with the publisher right on the benchmark Room and an API client, then asks the server's
/// `POST /oauth/token` for a token as a client would (RFC 6749 client credentials).
async fn bearer_token(server: &Server) -> Result<String, Error> {
    let broker = &server.fixture.broker;
    let (client_id, secret) = ("bench-publisher", "bench-publisher-secret-0123456789");
    broker
        .create_member("BENCH/GOV/M2", "benchmark publisher")
        .await?;
    let app = broker
        .create_application("BENCH/GOV/M2", "publisher", "benchmark publisher")
        .await?
        .id;
    broker
        .create_client(&app, Some(client_id.into()), Some(secret.into()))
        .await?;
    broker
        .grant(
            &app,
            broker_core::Role::Publisher,
            Some(server.fixture.room.clone()),
            None,
        )
        .await?;
    let stream = tokio::net::TcpStream::connect(server.addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("token handshake: {e}"))?;
    tokio::spawn(conn);
    let form =
        format!("grant_type=client_credentials&client_id={client_id}&client_secret={secret}");
    let req = Request::post("/oauth/token")
        .header(header::HOST, "bench")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(form)))
        .map_err(|e| e.to_string())?;
    let answer = send
        .send_request(req)
        .await
        .map_err(|e| format!("token request: {e}"))?;
    let status = answer.status();
    let body = answer
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let token = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["access_token"].as_str().map(String::from));
    match token {
        Some(t) if status.is_success() => Ok(t),
        _ => Err(format!(
            "no token from /oauth/token ({status}): {}",
            String::from_utf8_lossy(&body)
        )
        .into()),
    }
}

/// The no-op: reads the body and checks that it is JSON, answers 200 with an empty body.
async fn noop(body: Bytes) -> StatusCode {
    match serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
        Ok(_) => StatusCode::OK,
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

/// The broker's publish behind a bare handler, outside the server's layers: with the no-op
/// and the real route it splits the gap into what the layers cost and what storage costs.
async fn bare_publish(
    axum::extract::State(f): axum::extract::State<Fixture>,
    body: Bytes,
) -> (StatusCode, String) {
    let req =
        broker_core::PublishRequest::new(f.room.clone(), f.ty.clone(), f.me.clone(), body.to_vec());
    match f.broker.publish(req).await {
        Ok(r) => (
            StatusCode::CREATED,
            json!({"id": r.id, "sequence": r.sequence}).to_string(),
        ),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// What one load case sends.
#[derive(Clone)]
pub struct Target {
    pub path: &'static str,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Request bodies, used in turn.
    pub bodies: Arc<Vec<Bytes>>,
}

/// `connections` clients, one HTTP/1.1 connection each, sending to `target` in a closed loop
/// for `length`. All connections are open before the clock starts.
pub async fn load(
    addr: SocketAddr,
    target: &Target,
    connections: usize,
    length: Duration,
) -> Result<Load, Error> {
    load_paced(addr, target, connections, length, None).await
}

/// As [`load`], but with `every` each client sends one request per `every` (clients spread
/// evenly over the interval), so the offered rate is `connections / every` whatever the
/// server's speed. Latency then counts from when a request was due, not when it left, so that
/// a slow answer that delays the next request is not hidden (coordinated omission).
pub async fn load_paced(
    addr: SocketAddr,
    target: &Target,
    connections: usize,
    length: Duration,
    every: Option<Duration>,
) -> Result<Load, Error> {
    let ready = Arc::new(tokio::sync::Barrier::new(connections + 1));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (target, ready) = (target.clone(), ready.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await;
            let conn = match stream {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    hyper::client::conn::http1::handshake(TokioIo::new(s)).await
                }
                Err(e) => {
                    ready.wait().await;
                    return Err(format!("connect: {e}"));
                }
            };
            let (mut send, conn) = match conn {
                Ok(x) => x,
                Err(e) => {
                    ready.wait().await;
                    return Err(format!("handshake: {e}"));
                }
            };
            tokio::spawn(conn);
            ready.wait().await;
            let started = Instant::now();
            let deadline = started + length;
            let (mut lat, mut errors, mut first_error) = (Vec::new(), 0u64, None::<String>);
            let mut i = c;
            let mut sent = 0u32;
            while Instant::now() < deadline {
                let due =
                    every.map(|e| started + e * sent + e.mul_f64(c as f64 / connections as f64));
                if let Some(due) = due {
                    if due >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(due.into()).await;
                }
                sent += 1;
                let body = target.bodies[i % target.bodies.len()].clone();
                i += 7919;
                let mut req = Request::post(target.path)
                    .header(header::HOST, "bench")
                    .header(header::CONTENT_TYPE, "application/json");
                for (k, v) in &target.headers {
                    req = req.header(k, v);
                }
                let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
                let t0 = due.unwrap_or_else(Instant::now);
                let answer = match send.send_request(req).await {
                    Ok(a) => a,
                    Err(e) => return Err(format!("request: {e}")),
                };
                let status = answer.status();
                let body = answer
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                if status.is_success() {
                    lat.push(t0.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                    if first_error.is_none() {
                        first_error = Some(format!(
                            "{status}: {}",
                            String::from_utf8_lossy(&body.to_bytes())
                        ));
                    }
                }
            }
            Ok((lat, errors, first_error))
        }));
    }
    ready.wait().await;
    let start = Instant::now();
    let (mut all, mut errors) = (Vec::new(), 0u64);
    for t in tasks {
        match t.await? {
            Ok((lat, e, first)) => {
                all.extend(lat);
                errors += e;
                if let Some(first) = first {
                    eprintln!("error answers from {}: first was {first}", target.path);
                }
            }
            Err(e) => {
                eprintln!("a client of {} failed: {e}", target.path);
                errors += 1;
            }
        }
    }
    Ok(Load {
        ok: all.len() as u64,
        errors,
        secs: start.elapsed().as_secs_f64(),
        latency: Latency::of(all),
    })
}

fn bodies() -> Arc<Vec<Bytes>> {
    Arc::new(
        (0..KEYS)
            .map(|i| Bytes::from(common::payload(i, KEYS)))
            .collect(),
    )
}

fn load_row(what: &str, connections: usize, l: &Load) -> serde_json::Value {
    json!({
        "target": what, "connections": connections, "requests_per_s": l.rate(),
        "p50_ms": l.latency.p50_ms, "p99_ms": l.latency.p99_ms, "max_ms": l.latency.max_ms,
        "requests": l.ok, "errors": l.errors, "secs": l.secs,
    })
}

/// Part 2: publish and no-op at 64 and 1,000 connections, alternating on one server.
pub async fn ceiling(settings: &Settings) -> Result<Vec<Section>, Error> {
    let server = Server::start(settings, "ceiling").await?;
    let mut s = Section::new(
        "Ceiling: HTTP publish against a no-op handler (1 KiB bodies)",
        &[
            ("target", "route"),
            ("connections", "connections"),
            ("requests_per_s", "requests/s"),
            ("p50_ms", "p50 ms"),
            ("p99_ms", "p99 ms"),
            ("errors", "errors"),
            ("ops_per_commit", "events per commit"),
        ],
    );
    let noop = Target {
        path: "/noop",
        headers: vec![],
        bodies: bodies(),
    };
    let publish = Target {
        path: PUBLISH_PATH,
        ..noop.clone()
    };
    // `BENCH_CASES` (e.g. `publish`) and `BENCH_CONNECTIONS` (e.g. `1000`) narrow the part to
    // some cases, for profiling one of them; the ratio needs both `noop` and `publish`.
    let cases =
        std::env::var("BENCH_CASES").unwrap_or_else(|_| "noop,bare,publish,auth,embedded".into());
    let wanted = |case: &str| cases.split(',').any(|c| c.trim() == case);
    let counts: Vec<usize> = std::env::var("BENCH_CONNECTIONS")
        .ok()
        .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![64, 1000]);
    // The same publish with authentication on, on a second server: every request's token is
    // checked and its client and rights read, as `postroom serve` does by default.
    let authenticated = if wanted("auth") {
        let server = Server::start_with(settings, "ceiling-auth", true).await?;
        let token = bearer_token(&server).await?;
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|e| format!("token header: {e}"))?;
        let target = Target {
            headers: vec![(header::AUTHORIZATION, value)],
            ..publish.clone()
        };
        Some((server, target))
    } else {
        None
    };
    for connections in counts {
        let mut noop_rate = None;
        if wanted("noop") {
            let n = load(server.addr, &noop, connections, settings.length()).await?;
            s.row(load_row("no-op", connections, &n));
            noop_rate = Some(n.rate());
        }
        if wanted("bare") {
            let bare = Target {
                path: "/publish-bare",
                ..noop.clone()
            };
            let b = load(server.addr, &bare, connections, settings.length()).await?;
            s.row(load_row(
                "publish, bare handler (no layers)",
                connections,
                &b,
            ));
        }
        let mut publish_rate = None;
        if wanted("publish") {
            let c0 = server.fixture.broker.writer_counters();
            let p = load(server.addr, &publish, connections, settings.length()).await?;
            let c1 = server.fixture.broker.writer_counters();
            let mut row = load_row("publish", connections, &p);
            row["ops_per_commit"] =
                json!((c1.ops - c0.ops) as f64 / (c1.commits - c0.commits).max(1) as f64);
            s.row(row);
            publish_rate = Some(p.rate());
        }
        if let Some((server, target)) = &authenticated {
            let a = load(server.addr, target, connections, settings.length()).await?;
            s.row(load_row(
                "publish (all layers, bearer token)",
                connections,
                &a,
            ));
        }
        if wanted("embedded") {
            // The same broker without HTTP, to split the gap between storage and the HTTP stack.
            let e =
                common::publish_load(&server.fixture, connections, KEYS, settings.length()).await?;
            s.row(load_row("embedded publish (no HTTP)", connections, &e));
        }
        if let (Some(n), Some(p)) = (noop_rate, publish_rate) {
            let ratio = p / n;
            s.note(format!(
                "publish/no-op at {connections} connections: {ratio:.2} (target at least 0.5: {})",
                if ratio >= 0.5 { "met" } else { "not met" }
            ));
        }
    }
    server.stop().await;
    if let Some((server, _)) = authenticated {
        server.stop().await;
    }
    s.print();
    Ok(vec![s])
}

/// Part 6: 1,000 concurrent clients on the GovStack publish route (`/r1/.../pub/v1/{type}`),
/// against the specification's 100 requests/s and 1 s worst latency.
pub async fn floor(settings: &Settings) -> Result<Vec<Section>, Error> {
    let server = Server::start(settings, "floor").await?;
    let target = Target {
        path: GOV_PUBLISH_PATH,
        headers: vec![(
            HeaderName::from_static("x-govstack-client"),
            HeaderValue::from_static(GOV_CLIENT),
        )],
        bodies: Arc::new(
            (0..KEYS)
                .map(|i| {
                    let event = String::from_utf8(common::payload(i, KEYS)).unwrap_or_default();
                    Bytes::from(format!(r#"{{"eventType":"reading","event":{event}}}"#))
                })
                .collect(),
        ),
    };
    let length = settings.length().max(Duration::from_secs(10));
    // As fast as the clients can go: the throughput, and latency at saturation (where it is
    // the queue of 1,000 requests divided by the throughput).
    let saturated = load(server.addr, &target, 1000, length).await?;
    // Each client once a second: 1,000 requests/s offered, ten times the floor, with 1,000
    // connections open, which is the specification's situation.
    let paced = load_paced(
        server.addr,
        &target,
        1000,
        length,
        Some(Duration::from_secs(1)),
    )
    .await?;
    server.stop().await;
    let mut s = Section::new(
        "GovStack floor: 1,000 concurrent clients publishing through /r1",
        &[
            ("target", "load"),
            ("connections", "clients"),
            ("requests_per_s", "requests/s"),
            ("p50_ms", "p50 ms"),
            ("p99_ms", "p99 ms"),
            ("max_ms", "worst ms"),
            ("errors", "errors"),
        ],
    );
    s.row(load_row("closed loop (saturation)", 1000, &saturated));
    s.row(load_row("paced, 1 request/s per client", 1000, &paced));
    let verdict = |l: &Load| {
        format!(
            "{:.0} requests/s ({}), worst {:.0} ms ({})",
            l.rate(),
            if l.rate() >= 100.0 { "met" } else { "not met" },
            l.latency.max_ms,
            if l.latency.max_ms <= 1000.0 && l.errors == 0 {
                "met"
            } else {
                "not met"
            }
        )
    };
    s.note(format!(
        "specification floor, 100 requests/s and 1 s worst latency: saturated {}; paced at 1,000/s {}",
        verdict(&saturated),
        verdict(&paced)
    ));
    s.print();
    Ok(vec![s])
}
