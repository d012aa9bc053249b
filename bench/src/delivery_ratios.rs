//! Issue 15, item 7: delivery speed as ratios to the embedded durable publish rate at 64
//! publishers measured in the same run (machines here differ by 2x from day to day; ratios
//! measured minutes apart do not). Each delivery case of the `delivery` part is reported with its
//! rate, its ratio, the issue's target and whether it meets it, and with the writer's commits
//! over the case, which show what each message cost in durable commits.

use broker_core::WriterCounters;
use serde_json::{json, Value};

use crate::common::{Load, Section};

/// What one timed delivery case did: messages (deliveries) done, in how long, and the writer's
/// commits and operations meanwhile.
#[derive(Clone, Copy, Debug)]
pub struct Measured {
    pub done: u64,
    pub secs: f64,
    pub commits: u64,
    pub ops: u64,
}

impl Measured {
    /// From the writer's counters at the start and at the end of the case.
    pub fn new(done: u64, secs: f64, c0: WriterCounters, c1: WriterCounters) -> Measured {
        Measured {
            done,
            secs,
            commits: c1.commits.saturating_sub(c0.commits),
            ops: c1.ops.saturating_sub(c0.ops),
        }
    }

    pub fn rate(&self) -> f64 {
        self.done as f64 / self.secs.max(1e-9)
    }
}

/// A delivery case of issue 15, item 7: its name, the ratio the issue measured on 2026-11-29
/// with the code then landed, and its target (a ratio at least this).
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub name: &'static str,
    pub issue_ratio: Option<f64>,
    pub target: Option<f64>,
}

pub const PUSH_1: Case = Case {
    name: "push, 1 subscription",
    issue_ratio: Some(0.41),
    target: Some(0.8),
};
/// No target of its own; reported between the two that have one.
pub const PUSH_10: Case = Case {
    name: "push, 10 subscriptions (in total)",
    issue_ratio: Some(0.26),
    target: None,
};
pub const PUSH_100: Case = Case {
    name: "push, 100 subscriptions (in total)",
    issue_ratio: Some(0.09),
    target: Some(0.5),
};
pub const PULL_100: Case = Case {
    name: "pull + ack, batch 100, one client",
    issue_ratio: Some(0.54),
    target: Some(1.0),
};
pub const PULL_1: Case = Case {
    name: "pull + ack, batch 1, one client",
    issue_ratio: Some(0.017),
    target: Some(0.05),
};
pub const PULL_1_CONCURRENT: Case = Case {
    name: "pull + ack, batch 1, 16 concurrent clients",
    issue_ratio: None,
    target: Some(0.3),
};

/// The "Delivery ratios" table: the embedded publish first (the base, ratio 1), then each case.
pub fn section(publish: &Load, cases: &[(Case, Measured)]) -> Section {
    let mut s = Section::new(
        "Delivery ratios (issue 15, item 7): to the embedded publish at 64 publishers of this run",
        &[
            ("case", "case"),
            ("per_s", "per s"),
            ("ratio_shown", "ratio"),
            ("target_shown", "target"),
            ("meets", "meets"),
            ("issue_ratio_shown", "ratio on 2026-11-29 (issue)"),
            ("per_commit", "messages per commit"),
        ],
    );
    let base = publish.rate();
    s.row(json!({
        "case": "embedded publish, 64 publishers (the base)",
        "per_s": base,
        "ratio": 1.0,
        "ratio_shown": "1",
        "target": null,
        "target_shown": "-",
        "meets": "-",
        "issue_ratio": 1.0,
        "issue_ratio_shown": "1 (39.7k/s)",
        "per_commit": null,
    }));
    let mut verdicts = Vec::new();
    for (case, m) in cases {
        let ratio = m.rate() / base.max(1e-9);
        let meets = case.target.map(|t| ratio >= t);
        if let (Some(t), Some(ok)) = (case.target, meets) {
            verdicts.push(format!(
                "{}: {} (≥ {})",
                case.name,
                if ok { "met" } else { "not met" },
                shown(t)
            ));
        }
        s.row(row(case, m, ratio, meets));
    }
    s.note(format!(
        "Base: {:.0} embedded durable publishes/s (64 publishers, {} in {:.1} s), measured at \
         the start of this run. {}.",
        base,
        publish.ok,
        publish.secs,
        verdicts.join("; ")
    ));
    s
}

fn row(case: &Case, m: &Measured, ratio: f64, meets: Option<bool>) -> Value {
    json!({
        "case": case.name,
        "per_s": m.rate(),
        "ratio": ratio,
        "ratio_shown": shown(ratio),
        "target": case.target,
        "target_shown": case.target.map_or("-".into(), |t| format!("≥ {}", shown(t))),
        "meets": meets.map_or("-", |ok| if ok { "yes" } else { "no" }),
        "issue_ratio": case.issue_ratio,
        "issue_ratio_shown": case.issue_ratio.map_or("-".into(), shown),
        "per_commit": m.done as f64 / m.commits.max(1) as f64,
        "messages": m.done,
        "secs": m.secs,
        "commits": m.commits,
        "writer_ops": m.ops,
    })
}

/// A ratio with three significant digits at most (0.017, 0.41, 1.2).
fn shown(x: f64) -> String {
    let text = if x >= 1.0 {
        format!("{x:.2}")
    } else if x >= 0.1 {
        format!("{x:.3}")
    } else {
        format!("{x:.4}")
    };
    // Trailing zeros say nothing: 0.800 -> 0.8, 1.00 -> 1.
    let trimmed = text.trim_end_matches('0').trim_end_matches('.');
    trimmed.to_string()
}
