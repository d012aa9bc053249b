//! Runs the IRC capacity example with its header's command. Guards against the IRC ingress
//! losing or reordering a centre's events and heartbeats on their way to a pull subscriber:
//! the occupancy the dashboard prints last must equal what each centre last reported, and
//! its count of bed events must equal what each centre sent. Also checks the ingress's ICD
//! answers: a repeat is acknowledged without a second event, another centre's body is 422, a
//! post for a centre the client is not bound to is 403, a bad field is 400 naming it.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::process::Command;

#[test]
fn the_dashboard_shows_what_the_centres_sent() {
    let out = Command::new(env!("CARGO_BIN_EXE_irc_capacity"))
        .args(["3", "12"])
        .output()
        .expect("start irc_capacity");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "irc_capacity failed: {out:?}");
    let by_centre = |prefix: &str| -> BTreeMap<String, String> {
        stdout
            .lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .filter_map(|l| l.split_once(": "))
            .map(|(c, rest)| (c.to_string(), rest.to_string()))
            .collect()
    };
    let sent = by_centre("sent ");
    let shown = by_centre("dashboard ");
    assert_eq!(sent.len(), 3, "{stdout}");
    assert_eq!(sent, shown, "{stdout}");
    assert!(
        stdout.lines().filter(|l| l.starts_with("live ")).count() >= 36,
        "a live line per heartbeat: {stdout}"
    );
    assert!(
        stdout.contains("repeated event: 201 duplicate=true"),
        "{stdout}"
    );
    assert!(
        stdout.contains("other centre's body: 422 \"centre_mismatch\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("posting for another centre: 403 \"forbidden\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("bad timestamp: 400 field=\"timestamp\""),
        "{stdout}"
    );
}
