//! Delivery: push deliveries/s to a local receiver with 1, 10 and 100 subscriptions,
//! publish-to-receive latency at a fixed 1,000 events/s, and pull+ack messages/s (one client
//! with batches of 1 and 100, 16 clients with batches of 1). The same cases as
//! `broker-core/benches/delivery.rs`, here so that they run in the same command and under the
//! same load as the other parts. The part starts with the embedded publish at 64 publishers and
//! ends with every rate as a ratio to it (issue 15, item 7: see `delivery_ratios.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use broker_core::{Broker, DeliveryMode, NewSubscription, PushEndpoint, SubscriptionId};
use serde_json::json;

use crate::common::{self, Error, Fixture, Latency, Section, Settings};
use crate::delivery_ratios::{self, Case, Measured};

const KEYS: u64 = 1000;
/// Deliveries per push case (split over the subscriptions).
const PUSH_DELIVERIES: u64 = 50_000;
/// The backlog of the pull cases with batches of 1 (one client or 16) and of 100.
const PULL_BATCH1_EVENTS: u64 = 5_000;
const PULL_BATCH100_EVENTS: u64 = 50_000;
/// Concurrent pullers of the many-clients pull case (issue 15, item 7).
const PULLERS: usize = 16;
/// Publishers of the embedded publish the ratios are taken to.
const PUBLISHERS: usize = 64;

/// Counts deliveries and notes when each event id first arrived.
#[derive(Default)]
pub(crate) struct Sink {
    pub(crate) count: AtomicU64,
    arrivals: Mutex<HashMap<String, Instant>>,
    pub(crate) track: AtomicBool,
}

/// Starts a local receiver counting into `sink`; its URL.
pub(crate) async fn start_receiver(sink: Arc<Sink>) -> Result<String, Error> {
    let app = Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, _body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                if sink.track.load(Ordering::Relaxed) {
                    let id = headers
                        .get("webhook-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    sink.arrivals
                        .lock()
                        .expect("lock")
                        .entry(id)
                        .or_insert_with(Instant::now);
                }
                sink.count.fetch_add(1, Ordering::Relaxed);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}

async fn fixture(settings: &Settings, name: &str) -> Result<Fixture, Error> {
    let mut config = common::config();
    config.delivery.scheduler_tick_ms = 50;
    let broker = Broker::open(settings.db(name), config).await?;
    Fixture::new(broker).await
}

/// A push subscription to `url` with 64 pushes in flight.
pub(crate) fn push_sub(f: &Fixture, url: &str) -> NewSubscription {
    let mut s = NewSubscription::new(
        f.me.clone(),
        DeliveryMode::Push(PushEndpoint {
            url: url.into(),
            headers: vec![],
            basic_auth: None,
        }),
    );
    s.in_flight_max = Some(64);
    s
}

/// Publishes to paused subscriptions, resumes them all, and times until every delivery arrived.
async fn push_case(settings: &Settings, subs: usize) -> Result<Measured, Error> {
    let sink = Arc::new(Sink::default());
    let url = start_receiver(sink.clone()).await?;
    let f = fixture(settings, &format!("delivery-push{subs}")).await?;
    let mut ids = Vec::new();
    for _ in 0..subs {
        let id = f
            .broker
            .create_subscription(&f.room, push_sub(&f, &url))
            .await?
            .subscription
            .id;
        f.broker.pause_subscription(id).await?;
        ids.push(id);
    }
    let events = PUSH_DELIVERIES / subs as u64;
    f.fill(0, events, KEYS).await?;
    let total = events * subs as u64;
    let c0 = f.broker.writer_counters();
    let start = Instant::now();
    for id in &ids {
        f.broker.resume_subscription(*id).await?;
    }
    let deadline = start + Duration::from_secs(300);
    while sink.count.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let got = sink.count.load(Ordering::Relaxed);
    let c1 = f.broker.writer_counters();
    f.broker.close().await;
    Ok(Measured::new(got, secs, c0, c1))
}

/// Publishes at a fixed rate to one push subscription and times each event from the publish
/// call to the receiver's handler.
async fn latency_case(settings: &Settings, rate: u64) -> Result<(Latency, u64), Error> {
    let sink = Arc::new(Sink::default());
    sink.track.store(true, Ordering::Relaxed);
    let url = start_receiver(sink.clone()).await?;
    let f = fixture(settings, "delivery-latency").await?;
    f.broker
        .create_subscription(&f.room, push_sub(&f, &url))
        .await?;
    let measured = timed_publishes(std::slice::from_ref(&f), &sink, rate, settings.secs).await;
    f.broker.close().await;
    Ok(measured)
}

/// Publishes `rate` events a second for `secs` seconds, in turn through each of `fixtures` (a
/// publish that lost a race with another node is tried again, as a client retrying a 503
/// would), and times each event from its first publish call to `sink`'s receiver; the latencies
/// and how many events arrived.
pub(crate) async fn timed_publishes(
    fixtures: &[Fixture],
    sink: &Sink,
    rate: u64,
    secs: u64,
) -> (Latency, u64) {
    sink.track.store(true, Ordering::Relaxed);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..rate * secs {
        tick.tick().await;
        let f = &fixtures[i as usize % fixtures.len()];
        let (broker, req, tx) = (f.broker.clone(), f.request(i, KEYS), tx.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            loop {
                match broker.publish(req.clone()).await {
                    Ok(r) => {
                        let _ = tx.send((r.id.to_string(), t0));
                    }
                    Err(broker_core::Error::StorageConflict { .. }) => continue,
                    Err(_) => {}
                }
                break;
            }
        });
    }
    drop(tx);
    let mut sent = Vec::new();
    while let Some(s) = rx.recv().await {
        sent.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while sink.arrivals.lock().expect("lock").len() < sent.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let arrivals = sink.arrivals.lock().expect("lock").clone();
    let lat: Vec<u64> = sent
        .iter()
        .filter_map(|(id, t0)| {
            arrivals
                .get(id)
                .map(|t| t.duration_since(*t0).as_micros() as u64)
        })
        .collect();
    let n = lat.len() as u64;
    (Latency::of(lat), n)
}

fn pull_db(clients: usize, batch: usize) -> String {
    format!("delivery-pull{clients}x{batch}")
}

/// `clients` tasks on one pull subscription, each pulling `batch` messages and acknowledging
/// what it pulled, in a loop, until `events` are acknowledged; timed from the first pull to the
/// last acknowledgement.
async fn pull_case(
    settings: &Settings,
    clients: usize,
    batch: usize,
    events: u64,
) -> Result<Measured, Error> {
    let f = fixture(settings, &pull_db(clients, batch)).await?;
    let id: SubscriptionId = f
        .broker
        .create_subscription(
            &f.room,
            NewSubscription::new(f.me.clone(), DeliveryMode::Pull),
        )
        .await?
        .subscription
        .id;
    f.fill(0, events, KEYS).await?;
    let done = Arc::new(AtomicU64::new(0));
    let c0 = f.broker.writer_counters();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(300);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (broker, done) = (f.broker.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut last = start;
            while done.load(Ordering::Relaxed) < events && Instant::now() < deadline {
                // A short long-poll: with ordering, the other pullers may hold every ready key
                // for a moment, and their acks wake this one.
                let msgs = broker.pull(id, batch, None, 50).await?;
                if msgs.is_empty() {
                    continue;
                }
                let acks: Vec<String> = msgs.iter().map(|m| m.ack_id.clone()).collect();
                for r in broker.ack(id, &acks).await? {
                    r?;
                }
                done.fetch_add(msgs.len() as u64, Ordering::Relaxed);
                last = Instant::now();
            }
            Ok::<_, broker_core::Error>(last)
        }));
    }
    let mut end = start;
    for t in tasks {
        end = end.max(t.await??);
    }
    let c1 = f.broker.writer_counters();
    f.broker.close().await;
    let secs = end.duration_since(start).as_secs_f64();
    Ok(Measured::new(done.load(Ordering::Relaxed), secs, c0, c1))
}

/// Whether the case named `name` runs: every case unless `BENCH_CASES` lists some (comma
/// separated: `push1`, `push10`, `push100`, `latency`, `pull1`, `pull100`, `pull16`), for
/// profiling one case. The embedded publish the ratios are taken to always runs.
fn selected(name: &str) -> bool {
    match std::env::var("BENCH_CASES") {
        Ok(list) if !list.trim().is_empty() => list.split(',').any(|c| c.trim() == name),
        _ => true,
    }
}

/// Part 4.
pub async fn run(settings: &Settings) -> Result<Vec<Section>, Error> {
    // First, so that every delivery rate of this run has the publish rate of this run to be
    // compared with.
    let publish = common::embedded_publish(settings, "delivery-embedded", PUBLISHERS).await?;
    let mut base = Section::new(
        "Delivery: the embedded publish the ratios are taken to (64 publishers, 1,000 keys)",
        &[
            ("publishers", "publishers"),
            ("publishes_per_s", "publishes/s"),
            ("p50_ms", "p50 ms"),
            ("p99_ms", "p99 ms"),
        ],
    );
    base.row(json!({
        "publishers": PUBLISHERS, "publishes_per_s": publish.rate(), "publishes": publish.ok,
        "secs": publish.secs, "p50_ms": publish.latency.p50_ms, "p99_ms": publish.latency.p99_ms,
    }));
    base.print();
    let mut measured: Vec<(Case, Measured)> = Vec::new();
    let mut push = Section::new(
        "Delivery: push to a local receiver (in_flight_max 64, 1,000 keys, ordered)",
        &[
            ("subscriptions", "push subscriptions"),
            ("deliveries", "deliveries"),
            ("deliveries_per_s", "deliveries/s"),
        ],
    );
    for (subs, case) in [
        (1usize, delivery_ratios::PUSH_1),
        (10, delivery_ratios::PUSH_10),
        (100, delivery_ratios::PUSH_100),
    ] {
        if !selected(&format!("push{subs}")) {
            continue;
        }
        let m = push_case(settings, subs).await?;
        push.row(
            json!({"subscriptions": subs, "deliveries": m.done, "deliveries_per_s": m.rate()}),
        );
        measured.push((case, m));
    }
    push.print();
    let mut latency = Section::new(
        "Delivery: publish-to-receive latency, one push subscription",
        &[
            ("rate", "publish rate"),
            ("events", "events"),
            ("p50_ms", "p50 ms"),
            ("p99_ms", "p99 ms"),
        ],
    );
    if selected("latency") {
        let (l, n) = latency_case(settings, 1000).await?;
        latency.row(json!({"rate": "1000/s", "events": n, "p50_ms": l.p50_ms, "p99_ms": l.p99_ms, "max_ms": l.max_ms}));
        latency.print();
    }
    let mut pull = Section::new(
        "Delivery: pull + ack, one subscription (each client acks what it pulled)",
        &[
            ("clients", "clients"),
            ("batch", "pull batch"),
            ("messages", "messages"),
            ("messages_per_s", "messages/s"),
        ],
    );
    let pulls = [
        (1usize, 1usize, PULL_BATCH1_EVENTS, delivery_ratios::PULL_1),
        (1, 100, PULL_BATCH100_EVENTS, delivery_ratios::PULL_100),
        (
            PULLERS,
            1,
            PULL_BATCH1_EVENTS,
            delivery_ratios::PULL_1_CONCURRENT,
        ),
    ];
    for (clients, batch, events, case) in pulls {
        let name = if clients > 1 {
            "pull16".to_string()
        } else {
            format!("pull{batch}")
        };
        if !selected(&name) {
            continue;
        }
        let m = pull_case(settings, clients, batch, events).await?;
        pull.row(json!({
            "clients": clients, "batch": batch, "messages": m.done, "messages_per_s": m.rate(),
        }));
        measured.push((case, m));
    }
    pull.print();
    let ratios = delivery_ratios::section(&publish, &measured);
    ratios.print();
    for name in ["delivery-push1", "delivery-push10", "delivery-push100"] {
        let _ = std::fs::remove_file(settings.db(name));
    }
    let _ = std::fs::remove_file(settings.db("delivery-latency"));
    for (clients, batch, _, _) in pulls {
        let _ = std::fs::remove_file(settings.db(&pull_db(clients, batch)));
    }
    Ok(vec![base, push, latency, pull, ratios])
}
