//! Delivery throughput and latency: push to a local receiver with 1, 10 and 100 subscriptions,
//! publish-to-receive latency at a fixed publish rate, and pull+ack with batches of 1 and 100.
//!
//! Run: `cargo bench -p broker-core --bench delivery` (env: `BENCH_DIR` for the database files,
//! default `target/bench-data`; `BENCH_EVENTS`, deliveries per push case, default 50,000).
//! Prints Markdown tables and writes `target/bench/delivery.json`.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use broker_core::{
    Broker, Config, DeliveryMode, EventTypeName, EventTypeSpec, NewRoom, NewSubscription,
    Principal, PublishRequest, PushEndpoint, RoomName, SubscriptionId,
};
use serde_json::json;

const PAYLOAD_BYTES: usize = 1024;
const KEYS: u64 = 1000;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Counts deliveries and notes when each event id first arrived.
#[derive(Default)]
struct Sink {
    count: AtomicU64,
    arrivals: Mutex<HashMap<String, Instant>>,
    track: std::sync::atomic::AtomicBool,
}

async fn start_receiver(sink: Arc<Sink>) -> Result<String, Error> {
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

struct Fixture {
    broker: Broker,
    room: RoomName,
    ty: EventTypeName,
    me: Principal,
}

async fn fixture(dir: &str, name: &str) -> Result<Fixture, Error> {
    let path = format!("{dir}/delivery-{name}.redb");
    let _ = std::fs::remove_file(&path);
    let mut config = Config::default();
    config.retention.interval_ms = 0;
    config.delivery.scheduler_tick_ms = 50;
    // The bench's receiver listens on loopback, which the push target guard refuses by default.
    config.delivery.push_allow.loopback = true;
    let broker = Broker::open(&path, config).await?;
    let room = RoomName::new("bench")?;
    let ty = EventTypeName::new("reading")?;
    let me = Principal::new("bench")?;
    broker
        .create_room(NewRoom::new(room.clone(), me.clone()).approved())
        .await?;
    broker
        .put_event_type(
            &room,
            EventTypeSpec {
                name: ty.clone(),
                description: String::new(),
                schema: json!({"type": "object", "required": ["sensor"]}),
                key_pointer: Some("/sensor".into()),
            },
        )
        .await?;
    Ok(Fixture {
        broker,
        room,
        ty,
        me,
    })
}

fn payload(i: u64) -> Vec<u8> {
    let head = format!(r#"{{"sensor":"s{}","value":{},"pad":""#, i % KEYS, i);
    let pad = "x".repeat(PAYLOAD_BYTES - head.len() - 2);
    format!("{head}{pad}\"}}").into_bytes()
}

async fn publish_n(f: &Fixture, n: u64) -> Result<(), Error> {
    let reqs: Vec<_> = (0..n)
        .map(|i| PublishRequest::new(f.room.clone(), f.ty.clone(), f.me.clone(), payload(i)))
        .collect();
    for chunk in reqs.chunks(1000) {
        for r in f.broker.publish_batch(chunk.to_vec()).await? {
            r?;
        }
    }
    Ok(())
}

async fn push_case(dir: &str, subs: usize, deliveries: u64) -> Result<(f64, u64), Error> {
    let sink = Arc::new(Sink::default());
    let url = start_receiver(sink.clone()).await?;
    let f = fixture(dir, &format!("push{subs}")).await?;
    let mut ids = Vec::new();
    for _ in 0..subs {
        let mut s = NewSubscription::new(
            f.me.clone(),
            DeliveryMode::Push(PushEndpoint {
                url: url.clone(),
                headers: vec![],
                basic_auth: None,
            }),
        );
        s.in_flight_max = Some(64);
        let id = f
            .broker
            .create_subscription(&f.room, s)
            .await?
            .subscription
            .id;
        f.broker.pause_subscription(id).await?;
        ids.push(id);
    }
    let events = deliveries / subs as u64;
    publish_n(&f, events).await?;
    let total = events * subs as u64;
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
    f.broker.close().await;
    Ok((got as f64 / secs, got))
}

async fn latency_case(dir: &str, rate: u64, secs: u64) -> Result<(u64, u64, u64), Error> {
    let sink = Arc::new(Sink::default());
    sink.track.store(true, Ordering::Relaxed);
    let url = start_receiver(sink.clone()).await?;
    let f = fixture(dir, "latency").await?;
    let mut s = NewSubscription::new(
        f.me.clone(),
        DeliveryMode::Push(PushEndpoint {
            url,
            headers: vec![],
            basic_auth: None,
        }),
    );
    s.in_flight_max = Some(64);
    f.broker.create_subscription(&f.room, s).await?;
    let mut sent: Vec<(String, Instant)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..rate * secs {
        tick.tick().await;
        let broker = f.broker.clone();
        let req = PublishRequest::new(f.room.clone(), f.ty.clone(), f.me.clone(), payload(i));
        let tx = tx.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            if let Ok(r) = broker.publish(req).await {
                let _ = tx.send((r.id.to_string(), t0));
            }
        });
    }
    drop(tx);
    while let Some(s) = rx.recv().await {
        sent.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while sink.arrivals.lock().expect("lock").len() < sent.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let arrivals = sink.arrivals.lock().expect("lock").clone();
    let mut lat: Vec<u64> = sent
        .iter()
        .filter_map(|(id, t0)| {
            arrivals
                .get(id)
                .map(|t| t.duration_since(*t0).as_micros() as u64)
        })
        .collect();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    f.broker.close().await;
    Ok((pct(0.5), pct(0.99), lat.len() as u64))
}

async fn pull_case(dir: &str, batch: usize, events: u64) -> Result<f64, Error> {
    let f = fixture(dir, &format!("pull{batch}")).await?;
    let id: SubscriptionId = f
        .broker
        .create_subscription(
            &f.room,
            NewSubscription::new(f.me.clone(), DeliveryMode::Pull),
        )
        .await?
        .subscription
        .id;
    publish_n(&f, events).await?;
    let start = Instant::now();
    let mut done = 0u64;
    while done < events {
        let msgs = f.broker.pull(id, batch, None, 0).await?;
        if msgs.is_empty() {
            break;
        }
        let acks: Vec<String> = msgs.iter().map(|m| m.ack_id.clone()).collect();
        for r in f.broker.ack(id, &acks).await? {
            r?;
        }
        done += msgs.len() as u64;
    }
    let rate = done as f64 / start.elapsed().as_secs_f64();
    f.broker.close().await;
    Ok(rate)
}

fn main() -> Result<(), Error> {
    let dir = std::env::var("BENCH_DIR").unwrap_or_else(|_| "target/bench-data".into());
    let deliveries: u64 = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50_000);
    std::fs::create_dir_all(&dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    println!("| push subscriptions | deliveries | deliveries/s |");
    println!("|---:|---:|---:|");
    for subs in [1usize, 10, 100] {
        let (rate, got) = rt.block_on(push_case(&dir, subs, deliveries))?;
        println!("| {subs} | {got} | {rate:.0} |");
        rows.push(json!({"case": "push", "subscriptions": subs, "deliveries": got, "deliveries_per_s": rate}));
    }
    let (p50, p99, n) = rt.block_on(latency_case(&dir, 1000, 5))?;
    println!();
    println!("| publish rate | events | publish-to-receive p50 ms | p99 ms |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| 1000/s | {n} | {:.2} | {:.2} |",
        p50 as f64 / 1000.0,
        p99 as f64 / 1000.0
    );
    rows.push(json!({"case": "latency", "rate_per_s": 1000, "events": n, "p50_ms": p50 as f64 / 1000.0, "p99_ms": p99 as f64 / 1000.0}));
    println!();
    println!("| pull batch | messages/s (pull + ack) |");
    println!("|---:|---:|");
    for batch in [1usize, 100] {
        let events = if batch == 1 { 5_000 } else { 50_000 };
        let rate = rt.block_on(pull_case(&dir, batch, events))?;
        println!("| {batch} | {rate:.0} |");
        rows.push(json!({"case": "pull_ack", "batch": batch, "messages_per_s": rate}));
    }
    std::fs::create_dir_all("target/bench")?;
    std::fs::write(
        "target/bench/delivery.json",
        serde_json::to_string_pretty(&rows)?,
    )?;
    Ok(())
}
