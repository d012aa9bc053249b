//! What every part shares: settings from the environment, the benchmark Room and its payloads,
//! latency percentiles, memory readings, and the Markdown/JSON tables the parts report in, so
//! that every case of every part measures the same thing the same way.

use std::time::Duration;

use broker_core::{
    Broker, Config, EventTypeName, EventTypeSpec, NewRoom, Principal, PublishRequest, RoomName,
};
use serde_json::{json, Value};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Payload size of every published event and every request body, as the issue asks.
pub const PAYLOAD_BYTES: usize = 1024;

/// Knobs read once from the environment.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Length of each timed case.
    pub secs: u64,
    /// Where database files go.
    pub dir: String,
    /// Largest backlog the growth part builds.
    pub backlog_max: u64,
}

impl Settings {
    pub fn from_env() -> Result<Settings, Error> {
        let num = |name: &str, default: u64| -> Result<u64, Error> {
            match std::env::var(name) {
                Ok(v) => Ok(v.replace('_', "").parse()?),
                Err(_) => Ok(default),
            }
        };
        let dir = std::env::var("BENCH_DIR").unwrap_or_else(|_| "target/bench-data".into());
        std::fs::create_dir_all(&dir)?;
        Ok(Settings {
            secs: num("BENCH_SECS", 5)?,
            dir,
            backlog_max: num("BENCH_BACKLOG_MAX", 10_000_000)?,
        })
    }

    pub fn length(&self) -> Duration {
        Duration::from_secs(self.secs)
    }

    pub fn to_json(&self) -> Value {
        json!({"secs": self.secs, "dir": self.dir, "backlog_max": self.backlog_max})
    }

    /// A fresh database path for one case (any previous file removed).
    pub fn db(&self, name: &str) -> String {
        let path = format!("{}/{name}.redb", self.dir);
        let _ = std::fs::remove_file(&path);
        path
    }
}

/// The broker configuration of every case: defaults, with the retention sweep off (it would
/// run at a random moment of a timed case) and loopback push targets allowed (the receiver is
/// local).
pub fn config() -> Config {
    let mut config = Config::default();
    config.retention.interval_ms = 0;
    config.delivery.push_allow.loopback = true;
    config
}

/// The benchmark Room, its one event type and the publisher.
#[derive(Clone)]
pub struct Fixture {
    pub broker: Broker,
    pub room: RoomName,
    pub ty: EventTypeName,
    pub me: Principal,
}

impl Fixture {
    /// Creates the Room `bench` and the event type `reading` (schema checked, ordering key at
    /// `/sensor`) unless they exist.
    pub async fn new(broker: Broker) -> Result<Fixture, Error> {
        let room = RoomName::new("bench")?;
        let ty = EventTypeName::new("reading")?;
        let me = Principal::new("bench")?;
        if broker.room(&room).is_err() {
            broker
                .create_room(NewRoom::new(room.clone(), me.clone()).approved())
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
                            "properties": {
                                "sensor": {"type": "string"},
                                "value": {"type": "integer"},
                                "pad": {"type": "string"}
                            }
                        }),
                        key_pointer: Some("/sensor".into()),
                    },
                )
                .await?;
        }
        Ok(Fixture {
            broker,
            room,
            ty,
            me,
        })
    }

    pub fn request(&self, i: u64, keys: u64) -> PublishRequest {
        PublishRequest::new(
            self.room.clone(),
            self.ty.clone(),
            self.me.clone(),
            payload(i, keys),
        )
    }

    /// Publishes `n` events in batches of 1,000 (the fastest way to fill a backlog).
    pub async fn fill(&self, start: u64, n: u64, keys: u64) -> Result<(), Error> {
        let mut i = start;
        while i < start + n {
            let end = (i + 1000).min(start + n);
            let reqs: Vec<_> = (i..end).map(|j| self.request(j, keys)).collect();
            for r in self.broker.publish_batch(reqs).await? {
                r?;
            }
            i = end;
        }
        Ok(())
    }
}

/// A 1 KiB JSON object whose ordering key is `s{i % keys}`.
pub fn payload(i: u64, keys: u64) -> Vec<u8> {
    let head = format!(r#"{{"sensor":"s{}","value":{},"pad":""#, i % keys.max(1), i);
    let pad = "x".repeat(PAYLOAD_BYTES - head.len() - 2);
    format!("{head}{pad}\"}}").into_bytes()
}

/// Latency percentiles in milliseconds from samples in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(mut us: Vec<u64>) -> Latency {
        us.sort_unstable();
        let pct = |p: f64| {
            us.get(((us.len() as f64 * p) as usize).min(us.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0) as f64
                / 1000.0
        };
        Latency {
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            max_ms: us.last().copied().unwrap_or(0) as f64 / 1000.0,
        }
    }
}

/// Throughput and latency of a closed-loop load: `concurrency` clients, each sending its next
/// request when the previous one is answered, for the case's length.
#[derive(Clone, Copy, Debug, Default)]
pub struct Load {
    pub ok: u64,
    pub errors: u64,
    pub secs: f64,
    pub latency: Latency,
}

impl Load {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.secs.max(1e-9)
    }
}

/// A closed-loop load of `concurrency` tasks, each calling `op(i)` again as soon as the previous
/// call returned, for `length`, and timing every call. Task `t` starts at `i = t` and steps by a
/// prime, so that the tasks spread over whatever `i` selects (keys, payloads).
pub async fn closed_loop<F, Fut, E>(
    concurrency: usize,
    length: Duration,
    op: F,
) -> Result<Load, Error>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send,
    E: Into<Error> + Send + 'static,
{
    let start = std::time::Instant::now();
    let deadline = start + length;
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = t as u64;
            while std::time::Instant::now() < deadline {
                let t0 = std::time::Instant::now();
                op(i).await?;
                lat.push(t0.elapsed().as_micros() as u64);
                i += 7919;
            }
            Ok::<_, E>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?.map_err(Into::into)?);
    }
    Ok(Load {
        ok: all.len() as u64,
        errors: 0,
        secs: start.elapsed().as_secs_f64(),
        latency: Latency::of(all),
    })
}

/// Embedded durable publish: `concurrency` tasks calling `Broker::publish` in a loop, keys
/// spread over `keys`, for `length`.
pub async fn publish_load(
    f: &Fixture,
    concurrency: usize,
    keys: u64,
    length: Duration,
) -> Result<Load, Error> {
    let f = f.clone();
    closed_loop(concurrency, length, move |i| {
        let f = f.clone();
        async move { f.broker.publish(f.request(i, keys)).await.map(|_| ()) }
    })
    .await
}

/// The embedded durable publish rate that the issues compare with (issue 8's peer, issue 15's
/// delivery ratios): a fresh broker with the benchmark configuration and 1,000 keys,
/// `concurrency` tasks calling `Broker::publish` in a loop for the case's length. The database
/// file `name` is removed afterwards.
pub async fn embedded_publish(
    settings: &Settings,
    name: &str,
    concurrency: usize,
) -> Result<Load, Error> {
    let broker = Broker::open(settings.db(name), config()).await?;
    let f = Fixture::new(broker).await?;
    let load = publish_load(&f, concurrency, 1000, settings.length()).await;
    f.broker.close().await;
    let _ = std::fs::remove_file(settings.db(name));
    load
}

/// This process's resident memory in MiB (`VmRSS`), or NaN where /proc is missing.
pub fn rss_mib() -> f64 {
    proc_status_kib("VmRSS:") / 1024.0
}

fn proc_status_kib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(f64::NAN)
}

/// The machine and its load when the run started, for the report.
pub fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    let mem = read("/proc/meminfo")
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "memory": mem,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "loadavg_at_end": read("/proc/loadavg").trim(),
    })
}

/// One table of results: printed as Markdown when done, kept as JSON for the raw file.
pub struct Section {
    pub title: String,
    columns: Vec<(&'static str, &'static str)>,
    rows: Vec<Value>,
    notes: Vec<String>,
}

impl Section {
    /// A table with `columns` given as (JSON key, Markdown header).
    pub fn new(title: &str, columns: &[(&'static str, &'static str)]) -> Section {
        Section {
            title: title.into(),
            columns: columns.to_vec(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Adds a row and prints nothing yet: rows print together in [`Section::print`].
    pub fn row(&mut self, row: Value) {
        self.rows.push(row);
    }

    /// A line printed under the table and kept in the JSON (ratios, targets).
    pub fn note(&mut self, text: String) {
        self.notes.push(text);
    }

    pub fn print(&self) {
        println!("\n### {}\n", self.title);
        let heads: Vec<&str> = self.columns.iter().map(|c| c.1).collect();
        println!("| {} |", heads.join(" | "));
        let aligns: Vec<&str> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, _)| if i == 0 { "---" } else { "---:" })
            .collect();
        println!("|{}|", aligns.join("|"));
        for row in &self.rows {
            let cells: Vec<String> = self
                .columns
                .iter()
                .map(|(key, _)| cell(&row[*key]))
                .collect();
            println!("| {} |", cells.join(" | "));
        }
        for n in &self.notes {
            println!("\n{n}");
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    }

    pub fn to_json(&self) -> Value {
        json!({"title": self.title, "rows": self.rows, "notes": self.notes})
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if x.abs() >= 100.0 {
                format!("{x:.0}")
            } else {
                format!("{x:.2}")
            }
        }
        other => other.to_string(),
    }
}
