//! `postroom-bench`: every benchmark of issue 8 in one command, so that the figures that are
//! compared (publish against a no-op handler, Postroom against NATS JetStream, a small backlog
//! against a big one) come from one run on one machine, under the same load. A shared machine is
//! too noisy to compare figures of different runs; ratios within a run are what we report.
//!
//! Run: `cargo run --release -p postroom-bench -- all` (or one part: `ceiling`, `peer`,
//! `delivery`, `growth`, `floor`, `postgres`). Environment: `BENCH_SECS` (seconds per timed case, default
//! 5), `BENCH_DIR` (database files, default `target/bench-data`; must be a real disk for fsync
//! to cost what it costs), `BENCH_BACKLOG_MAX` (largest backlog of the growth part, default
//! 10,000,000), `BENCH_CASES` (the delivery part's cases to run, for profiling one:
//! see `delivery.rs`). Prints Markdown tables and writes the raw figures to `target/bench/<part>.json`.
#![forbid(unsafe_code)]

mod common;
mod delivery;
mod delivery_ratios;
mod growth;
mod http;
mod peer;
mod postgres;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use common::{Error, Section, Settings};

/// The allocator of the `postroom` binary, so that the server measured here is the one shipped.
/// `--features system-allocator` measures with the platform's malloc instead (the "before" of
/// the allocator row in BENCHMARKS.md).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Postroom's side-by-side benchmarks (issue 8)")]
struct Cli {
    #[command(subcommand)]
    part: Part,
}

#[derive(Subcommand, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// HTTP publish against a no-op handler on the same server (64 and 1,000 connections).
    Ceiling,
    /// Embedded durable publish against NATS JetStream (installs nats-server if missing).
    Peer,
    /// Push deliveries with 1, 10 and 100 subscriptions, publish-to-receive latency, pull+ack,
    /// and each as a ratio to the embedded publish rate of the same run (issue 15).
    Delivery,
    /// Publish throughput and memory with growing backlogs and key counts; restart-to-ready.
    Growth,
    /// The GovStack floor: 1,000 concurrent clients on the GovStack publish route.
    Floor,
    /// Publish with 1 and 3 nodes over one PostgreSQL and push on one node, beside the
    /// embedded broker (issue 16; starts its own PostgreSQL server).
    Postgres,
    /// Every part above, in that order.
    All,
}

fn main() -> Result<(), Error> {
    let cli = Cli::parse();
    let settings = Settings::from_env()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let parts: Vec<Part> = match cli.part {
        Part::All => vec![
            Part::Ceiling,
            Part::Peer,
            Part::Delivery,
            Part::Growth,
            Part::Floor,
            Part::Postgres,
        ],
        p => vec![p],
    };
    std::fs::create_dir_all("target/bench")?;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut all = serde_json::Map::new();
    for part in parts {
        let (name, sections) = match part {
            Part::Ceiling => ("ceiling", rt.block_on(http::ceiling(&settings))?),
            Part::Peer => ("peer", rt.block_on(peer::run(&settings))?),
            Part::Delivery => ("delivery", rt.block_on(delivery::run(&settings))?),
            Part::Growth => ("growth", rt.block_on(growth::run(&settings))?),
            Part::Floor => ("floor", rt.block_on(http::floor(&settings))?),
            Part::Postgres => ("postgres", rt.block_on(postgres::run(&settings))?),
            Part::All => unreachable!("expanded above"),
        };
        let raw: Vec<Value> = sections.iter().map(Section::to_json).collect();
        std::fs::write(
            format!("target/bench/{name}.json"),
            serde_json::to_string_pretty(&raw)?,
        )?;
        all.insert(name.into(), Value::Array(raw));
    }
    if cli.part == Part::All {
        let doc = json!({
            "started_unix_s": started,
            "settings": settings.to_json(),
            "machine": common::machine(),
            "parts": all,
        });
        std::fs::write("target/bench/all.json", serde_json::to_string_pretty(&doc)?)?;
        println!("raw figures: target/bench/all.json");
    }
    Ok(())
}
