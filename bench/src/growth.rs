//! Cost growth: publish throughput and resident memory as the undelivered backlog grows from 0
//! to 10M events and as the number of ordering keys grows from 1 to 100k, and the time a broker
//! takes to open and answer ready on a database holding 1M pending deliveries. Memory should
//! follow what is in flight, not what waits on disk; this part is where that is checked.
//!
//! The backlog is one data set grown in steps: a Room with one pull subscription that nobody
//! pulls, so that every event published stays owed. Memory is this process's `VmRSS`: the broker
//! runs in it, and the load generator holds only its latency samples.

use std::time::Instant;

use broker_core::{Broker, DeliveryMode, NewSubscription};
use serde_json::json;

use crate::common::{self, Error, Fixture, Section, Settings};

const CONCURRENCY: usize = 64;
const KEYS: u64 = 1000;
const RESTART_AT: u64 = 1_000_000;

async fn with_pull_subscription(path: &str, depth: u64) -> Result<Fixture, Error> {
    let f = Fixture::new(Broker::open(path, common::config()).await?).await?;
    if f.broker.subscriptions(&f.room)?.is_empty() {
        let mut s = NewSubscription::new(f.me.clone(), DeliveryMode::Pull);
        // The default queue depth bound (1M) would stop the backlog growing past it.
        s.queue_depth_max = Some(depth);
        f.broker.create_subscription(&f.room, s).await?;
    }
    Ok(f)
}

fn file_gib(path: &str) -> f64 {
    std::fs::metadata(path)
        .map(|m| m.len() as f64 / (1u64 << 30) as f64)
        .unwrap_or(f64::NAN)
}

/// Part 5.
pub async fn run(settings: &Settings) -> Result<Vec<Section>, Error> {
    let mut backlog = Section::new(
        "Cost growth: publish with a backlog of undelivered events (one pull subscription nobody pulls; 64 publishers)",
        &[
            ("backlog", "backlog before the case"),
            ("backlog_after", "after"),
            ("publishes_per_s", "publishes/s"),
            ("p99_ms", "p99 ms"),
            ("rss_mib", "RSS MiB"),
            ("file_gib", "file GiB"),
            ("fill_per_s", "fill events/s"),
        ],
    );
    let mut restart = Section::new(
        "Cost growth: restart to ready with pending deliveries",
        &[
            ("pending", "pending deliveries"),
            ("open_s", "open to ready s"),
            ("first_publish_ms", "then first publish ms"),
            ("rss_mib", "RSS MiB after"),
        ],
    );
    let path = settings.db("growth-backlog");
    let mut f = with_pull_subscription(&path, 2 * settings.backlog_max.max(1_000_000)).await?;
    let mut next = 0u64;
    let mut rss = Vec::new();
    for target in [0u64, 100_000, 1_000_000, 10_000_000] {
        if target > settings.backlog_max {
            backlog.note(format!(
                "backlog {target} not run (BENCH_BACKLOG_MAX={})",
                settings.backlog_max
            ));
            continue;
        }
        let have = f.broker.backlog_total()?;
        let mut fill_rate = None;
        if target > have {
            let t0 = Instant::now();
            f.fill(next, target - have, KEYS).await?;
            fill_rate = Some((target - have) as f64 / t0.elapsed().as_secs_f64());
            next += target - have;
        }
        if target == RESTART_AT.min(settings.backlog_max) && target > 0 {
            let pending = f.broker.backlog_total()?;
            f.broker.close().await;
            drop(f);
            let t0 = Instant::now();
            let broker = Broker::open(&path, common::config()).await?;
            // Readiness is a state, not an event: poll it, up to a minute.
            while !broker.unready_reasons().is_empty() {
                if t0.elapsed() > std::time::Duration::from_secs(60) {
                    return Err(format!(
                        "not ready a minute after opening: {:?}",
                        broker.unready_reasons()
                    )
                    .into());
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let open_s = t0.elapsed().as_secs_f64();
            f = Fixture::new(broker).await?;
            let t1 = Instant::now();
            f.broker.publish(f.request(next, KEYS)).await?;
            next += 1;
            let first_ms = t1.elapsed().as_secs_f64() * 1000.0;
            restart.row(json!({
                "pending": pending, "open_s": open_s, "first_publish_ms": first_ms,
                "rss_mib": common::rss_mib(),
            }));
        }
        let before = f.broker.backlog_total()?;
        let l = common::publish_load(&f, CONCURRENCY, KEYS, settings.length()).await?;
        let mem = common::rss_mib();
        rss.push(mem);
        let after = f.broker.backlog_total()?;
        backlog.row(json!({
            "backlog": before, "backlog_after": after, "publishes_per_s": l.rate(), "p50_ms": l.latency.p50_ms,
            "p99_ms": l.latency.p99_ms, "rss_mib": mem, "file_gib": file_gib(&path),
            "fill_per_s": fill_rate,
        }));
    }
    f.broker.close().await;
    drop(f);
    let _ = std::fs::remove_file(&path);
    if let (Some(first), Some(max)) = (rss.first(), rss.iter().cloned().reduce(f64::max)) {
        let growth = max / first;
        backlog.note(format!(
            "largest RSS / RSS at backlog 0: {growth:.2} (target within 20%: {})",
            if growth <= 1.2 { "met" } else { "not met" }
        ));
    }
    backlog.print();
    restart.print();

    let mut keys = Section::new(
        "Cost growth: publish with many ordering keys (one pull subscription; 64 publishers)",
        &[
            ("keys", "ordering keys"),
            ("publishes_per_s", "publishes/s"),
            ("p99_ms", "p99 ms"),
            ("rss_mib", "RSS MiB"),
        ],
    );
    for n in [1u64, 1_000, 100_000] {
        let path = settings.db(&format!("growth-keys{n}"));
        let f = with_pull_subscription(&path, 2 * settings.backlog_max.max(1_000_000)).await?;
        let l = common::publish_load(&f, CONCURRENCY, n, settings.length()).await?;
        keys.row(json!({
            "keys": n, "publishes_per_s": l.rate(), "p50_ms": l.latency.p50_ms,
            "p99_ms": l.latency.p99_ms, "rss_mib": common::rss_mib(),
        }));
        f.broker.close().await;
        drop(f);
        let _ = std::fs::remove_file(&path);
    }
    keys.print();
    Ok(vec![backlog, restart, keys])
}
