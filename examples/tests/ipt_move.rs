//! Runs the IPT move example with its header's command (more moves, another seed). Guards
//! against a supplier seeing a move's events out of order, losing one, or seeing a repeat it
//! cannot drop, while its receiver fails at random; and against the signature check failing
//! on the broker's real pushes.
#![forbid(unsafe_code)]

use std::process::Command;

#[test]
fn every_move_reaches_the_supplier_in_order_with_repeats_dropped() {
    let moves = 8;
    let out = Command::new(env!("CARGO_BIN_EXE_ipt_move"))
        .args([moves.to_string(), "11".to_string()])
        .output()
        .expect("start ipt_move");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ipt_move failed: {out:?}");
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("move ")).collect();
    assert_eq!(lines.len(), moves, "{stdout}");
    for l in &lines {
        assert!(
            l.ends_with(": proposed -> requested -> booked -> in_transit -> completed"),
            "{l}"
        );
    }
    assert!(
        stdout.contains("move d5e345ee-4be1-4510-b8ee-7bdf30599711: "),
        "the walkthrough's move is there: {stdout}"
    );
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("moves "))
        .expect("a summary line");
    assert!(
        summary.starts_with(&format!(
            "moves {moves}/{moves} completed, out of order 0, "
        )),
        "{summary}"
    );
    // The broker's pushes all verify; the one forged request does not.
    assert!(stdout.contains("forged request: 401"), "{stdout}");
    assert!(summary.ends_with("bad signatures 1"), "{summary}");
    let number_after = |label: &str| -> u64 {
        summary
            .split(label)
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(number_after("repeats dropped ") >= 1, "{summary}");
    assert!(number_after("failures injected ") >= 1, "{summary}");
}
