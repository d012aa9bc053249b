//! Durable publish throughput and latency, group commit against one commit per event.
//!
//! Run: `cargo bench -p broker-core --bench publish` (optional env: `BENCH_SECS`, default 5,
//! seconds per case; `BENCH_DIR`, where the database files go, default `target/bench-data`, which
//! must be a real disk for the fsync figures to mean anything; `BENCH_ONLY`, one concurrency). Prints a Markdown table and
//! writes `target/bench/publish.json`.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::{
    Broker, Config, EventTypeName, EventTypeSpec, NewRoom, Principal, PublishRequest, RoomName,
};
use serde_json::json;

const PAYLOAD_BYTES: usize = 1024;
const KEYS: u64 = 1000;

struct Case {
    mode: &'static str,
    concurrency: usize,
    commit_ops_max: usize,
}

struct Outcome {
    events: u64,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
    commits: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dir = std::env::var("BENCH_DIR").unwrap_or_else(|_| "target/bench-data".into());
    std::fs::create_dir_all(&dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut cases = Vec::new();
    for concurrency in [1, 64, 1024] {
        cases.push(Case {
            mode: "group commit",
            concurrency,
            commit_ops_max: 1024,
        });
        cases.push(Case {
            mode: "one commit per event",
            concurrency,
            commit_ops_max: 1,
        });
    }
    println!("| mode | concurrency | events/s | p50 ms | p99 ms | events per commit |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut json_rows = Vec::new();
    // `BENCH_ONLY=64` runs only the cases of that concurrency (for profiling one case).
    let only: Option<usize> = std::env::var("BENCH_ONLY")
        .ok()
        .and_then(|s| s.parse().ok());
    for case in cases
        .iter()
        .filter(|c| only.is_none_or(|o| o == c.concurrency))
    {
        let path = format!(
            "{dir}/publish-{}-{}.redb",
            case.commit_ops_max, case.concurrency
        );
        let _ = std::fs::remove_file(&path);
        let out = rt.block_on(run(case, &path, Duration::from_secs(secs)))?;
        let _ = std::fs::remove_file(&path);
        let rate = out.events as f64 / out.secs;
        let per_commit = out.events as f64 / out.commits.max(1) as f64;
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.1} |",
            case.mode,
            case.concurrency,
            rate,
            out.p50_us as f64 / 1000.0,
            out.p99_us as f64 / 1000.0,
            per_commit
        );
        json_rows.push(json!({
            "mode": case.mode, "concurrency": case.concurrency, "events_per_s": rate,
            "p50_ms": out.p50_us as f64 / 1000.0, "p99_ms": out.p99_us as f64 / 1000.0,
            "events": out.events, "commits": out.commits, "payload_bytes": PAYLOAD_BYTES,
        }));
    }
    let ratio = |c: usize| {
        let get = |mode: &str| {
            json_rows
                .iter()
                .find(|r| r["mode"] == mode && r["concurrency"] == c)
                .and_then(|r| r["events_per_s"].as_f64())
                .unwrap_or(f64::NAN)
        };
        get("group commit") / get("one commit per event")
    };
    for c in [1, 64, 1024] {
        println!(
            "group commit / one commit per event at concurrency {c}: {:.1}x",
            ratio(c)
        );
    }
    std::fs::create_dir_all("target/bench")?;
    std::fs::write(
        "target/bench/publish.json",
        serde_json::to_string_pretty(&json_rows)?,
    )?;
    Ok(())
}

async fn run(
    case: &Case,
    path: &str,
    length: Duration,
) -> Result<Outcome, Box<dyn std::error::Error>> {
    let mut config = Config::default();
    config.writer.commit_ops_max = case.commit_ops_max;
    if let Some(w) = std::env::var("BENCH_COMMIT_WAIT_US")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        config.writer.commit_wait_us = w;
    }
    config.retention.interval_ms = 0;
    let broker = Broker::open(path, config).await?;
    let room = RoomName::new("bench")?;
    let ty = EventTypeName::new("reading")?;
    let publisher = Principal::new("bench")?;
    broker
        .create_room(NewRoom::new(room.clone(), publisher.clone()).approved())
        .await?;
    broker
        .put_event_type(
            &room,
            EventTypeSpec {
                name: ty.clone(),
                description: String::new(),
                schema: json!({
                    "type": "object",
                    "required": ["sensor", "value", "pad"],
                    "properties": {"sensor": {"type": "string"}, "value": {"type": "integer"}, "pad": {"type": "string"}}
                }),
                key_pointer: Some("/sensor".into()),
            },
        )
        .await?;
    let payload_for = |i: u64| {
        let head = format!(r#"{{"sensor":"s{}","value":{},"pad":""#, i % KEYS, i);
        let pad = "x".repeat(PAYLOAD_BYTES - head.len() - 2);
        format!("{head}{pad}\"}}").into_bytes()
    };
    // Warm up the schema cache and the file.
    for i in 0..100 {
        broker
            .publish(PublishRequest::new(
                room.clone(),
                ty.clone(),
                publisher.clone(),
                payload_for(i),
            ))
            .await?;
    }
    let start_commits = broker.writer_counters().commits;
    let start = Instant::now();
    let deadline = start + length;
    let payloads: Arc<Vec<Vec<u8>>> = Arc::new((0..KEYS).map(payload_for).collect());
    let mut tasks = Vec::new();
    for t in 0..case.concurrency {
        let (broker, room, ty, publisher, payloads) = (
            broker.clone(),
            room.clone(),
            ty.clone(),
            publisher.clone(),
            payloads.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = t as u64;
            while Instant::now() < deadline {
                let req = PublishRequest::new(
                    room.clone(),
                    ty.clone(),
                    publisher.clone(),
                    payloads[(i % KEYS) as usize].clone(),
                );
                let t0 = Instant::now();
                broker.publish(req).await.map_err(|e| e.to_string())?;
                lat.push(t0.elapsed().as_micros() as u64);
                i += 7919;
            }
            Ok::<_, String>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    let commits = broker.writer_counters().commits - start_commits;
    broker.close().await;
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Ok(Outcome {
        events: all.len() as u64,
        secs,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        commits,
    })
}
