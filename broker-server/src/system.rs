//! Facts about the host for `GET /v1/admin/system`: what an operator asks first when something
//! is slow (load, memory, disk, connections). Linux values come from `/proc`; elsewhere what
//! cannot be read is `null` rather than a guess.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use serde::Serialize;
use utoipa::ToSchema;

/// When the process started serving, for the uptime.
static STARTED: OnceLock<Instant> = OnceLock::new();

/// Notes the start time; the first call wins. The router calls it when built.
pub fn mark_started() {
    STARTED.get_or_init(Instant::now);
}

/// The answer of `GET /v1/admin/system`.
#[derive(Serialize, ToSchema)]
pub struct SystemInfo {
    /// The server's version.
    pub version: String,
    /// Seconds since the server started.
    pub uptime_seconds: u64,
    /// The operating system (`linux`, `macos`, ...).
    pub os: String,
    /// The CPU architecture (`x86_64`, `aarch64`, ...).
    pub arch: String,
    /// CPUs available to the process.
    pub cpu_count: usize,
    /// The 1, 5 and 15 minute load averages (Linux only).
    pub load_average: Option<[f64; 3]>,
    /// Total memory of the host, in bytes (Linux only).
    pub memory_total_bytes: Option<u64>,
    /// Memory available for new work without swapping, in bytes (Linux only).
    pub memory_available_bytes: Option<u64>,
    /// The process's resident memory, in bytes (Linux only).
    pub process_resident_bytes: Option<u64>,
    /// Free space for the server on the data folder's file system, in bytes.
    pub disk_free_bytes: Option<u64>,
    /// HTTP requests being handled now (this one included).
    pub requests_in_flight: i64,
    /// Client connections open now, idle keep-alive ones included; `null` when the router is
    /// served by a program embedding it rather than by `postroom serve`.
    pub connections_open: Option<i64>,
}

/// Reads the host's state now. `data_dir` is the folder whose file system is measured.
pub fn read(data_dir: &Path) -> SystemInfo {
    let started = STARTED.get_or_init(Instant::now);
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let mem = |key: &str| {
        meminfo
            .as_deref()
            .and_then(|m| meminfo_kib(m, key))
            .map(|k| k * 1024)
    };
    SystemInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_seconds: started.elapsed().as_secs(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        cpu_count: std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_average: std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| loadavg(&s)),
        memory_total_bytes: mem("MemTotal"),
        memory_available_bytes: mem("MemAvailable"),
        process_resident_bytes: std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| statm_resident_pages(&s))
            .map(|pages| pages * rustix::param::page_size() as u64),
        disk_free_bytes: disk_free(data_dir),
        requests_in_flight: crate::observe::requests_in_flight(),
        connections_open: crate::connections::open(),
    }
}

/// Free bytes for unprivileged users on the file system holding `dir` (or its nearest existing
/// ancestor, since the data folder of a broker in memory may not exist).
fn disk_free(dir: &Path) -> Option<u64> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("."));
    let existing = if existing.as_os_str().is_empty() {
        Path::new(".")
    } else {
        existing
    };
    let st = rustix::fs::statvfs(existing).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// The three load averages of `/proc/loadavg`.
fn loadavg(s: &str) -> Option<[f64; 3]> {
    let mut it = s.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// A `/proc/meminfo` value in KiB, e.g. `MemTotal:  16318652 kB`.
fn meminfo_kib(m: &str, key: &str) -> Option<u64> {
    m.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The resident set, in pages: the second field of `/proc/self/statm`.
fn statm_resident_pages(s: &str) -> Option<u64> {
    s.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_formats_parse() {
        assert_eq!(
            loadavg("0.52 0.58 0.59 1/389 12345\n"),
            Some([0.52, 0.58, 0.59])
        );
        assert_eq!(loadavg("garbage"), None);
        let m = "MemTotal:       16318652 kB\nMemFree:  1 kB\nMemAvailable:   8000000 kB\n";
        assert_eq!(meminfo_kib(m, "MemTotal"), Some(16_318_652));
        assert_eq!(meminfo_kib(m, "MemAvailable"), Some(8_000_000));
        assert_eq!(meminfo_kib(m, "Mem"), None);
        assert_eq!(statm_resident_pages("1000 250 30 1 0 100 0\n"), Some(250));
    }
}
