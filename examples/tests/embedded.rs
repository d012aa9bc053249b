//! Runs the embedded example twice in one folder, as its header says. Guards against the run
//! command breaking, against events not being pulled in per-key order, and against
//! acknowledged events coming back.
#![forbid(unsafe_code)]

use std::process::Command;

fn run(dir: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_embedded"))
        .arg(dir.join("data"))
        .output()
        .expect("start embedded");
    assert!(out.status.success(), "embedded failed: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn embedded_publishes_pulls_in_key_order_and_acks_everything() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = run(dir.path());
    assert!(first.contains("room orders created"), "{first}");
    assert!(first.contains("published key=ada sequence=2"), "{first}");
    let pulled: Vec<&str> = first
        .lines()
        .filter(|l| l.starts_with("pulled key=ada"))
        .collect();
    assert_eq!(
        pulled,
        [
            r#"pulled key=ada sequence=1 {"customer":"ada","order":1}"#,
            r#"pulled key=ada sequence=2 {"customer":"ada","order":3}"#
        ],
        "{first}"
    );
    assert!(first.contains("acked 3; backlog 0"), "{first}");
    let second = run(dir.path());
    assert!(second.contains("room orders exists"), "{second}");
    assert!(second.contains("published key=ada sequence=4"), "{second}");
    // Only the three new events: the first run's were acknowledged for good.
    assert!(second.contains("acked 3; backlog 0"), "{second}");
}
