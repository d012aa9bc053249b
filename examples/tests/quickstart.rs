//! Drives the quickstart program as a user would: twice in the same folder, with input on stdin.
//! Guards against the README's run command breaking and against data not persisting.
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::{Command, Stdio};

fn run(dir: &std::path::Path, stdin: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quickstart"))
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start quickstart");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "quickstart failed: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn quickstart_publishes_refuses_bad_input_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let first = run(
        dir.path(),
        "{\"person\":\"linus\",\"n\":1}\n{\"person\":42}\nnot json\n",
    );
    assert_eq!(first.matches("published ").count(), 4, "{first}");
    assert!(first.contains("refused (schema_violation)"), "{first}");
    assert!(first.contains("refused (invalid_json)"), "{first}");
    assert!(first.contains("key=ada sequence=2"), "{first}");
    assert!(first.contains("room demo holds 4 events"), "{first}");
    assert!(dir.path().join("data/postroom.redb").exists());
    let second = run(dir.path(), "");
    assert!(
        second.contains("key=ada sequence=4"),
        "sequences continue across runs: {second}"
    );
    assert!(second.contains("room demo holds 7 events"), "{second}");
}
