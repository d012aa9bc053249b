//! The shipped domain schemas (`schemas/`). First and foremost, our IRC schemas (`schemas/irc/`, JSON Schema 2020-12, one event type per ICD operation) accept
//! exactly the payloads the original ICD 1.2.0 schemas (draft-04, one `oneOf`) accept.
//!
//! Guards against a field, pattern, enum, bound or `additionalProperties` rule drifting from the
//! ICD: a centre's unchanged client must never be refused, and nothing the ICD refuses may get
//! in. The corpus comes from a seeded generator (so a failure is reproducible): at least 1,000
//! valid events and 1,000 valid heartbeats, each also mutated in ways that break or stretch one
//! rule, plus hand-made edge cases. For every payload the two verdicts must be equal; "ours"
//! for an event is the verdict of the event type named by its `operation`, as the ingress
//! routes it (no such type: refused).
//!
//! One class of payloads differs between the schemas alone, by the drafts' definitions: an
//! integer field written with a fraction or exponent (`1.0`, `1e3`) is not an integer in
//! draft-04 and is one in 2020-12, which has no keyword to tell them apart. The ingress refuses
//! those before the schema (`broker_server::api::irc::integer_written_as_float`), so the test
//! asserts that (a) schema verdicts differ on exactly that class and nowhere else, and (b) the
//! ingress's verdict (that rule, then our schema) equals the original's on every payload. Then: both packs load and compile, and each Book a
//! Secure Move event type accepts its own example, refuses the others' `event_type`, and its
//! events are valid supplier notifications.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use broker_server::api::irc::{
    integer_written_as_float, EVENT_INTEGER_FIELDS, HEARTBEAT_INTEGER_FIELDS,
};
use jsonschema::{Draft, Validator};
use serde_json::{json, Map, Value};

fn dir(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(path: PathBuf) -> Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// The original: draft-04 (event.json names no draft; the ICD is draft-04), formats asserted as
/// the broker asserts them.
fn original(name: &str) -> Validator {
    jsonschema::options()
        .with_draft(Draft::Draft4)
        .should_validate_formats(true)
        .build(&read(dir("fixtures/irc-icd-1.2.0").join(name)))
        .expect("the original compiles")
}

/// Ours, compiled as the broker compiles event types: draft from `$schema`, formats asserted.
fn ours(name: &str) -> Validator {
    jsonschema::options()
        .should_validate_formats(true)
        .build(&read(
            dir("../schemas/irc").join(format!("{name}.schema.json")),
        ))
        .expect("our schema compiles")
}

const OPERATIONS: [(&str, &str); 7] = [
    ("check in", "check_in"),
    ("update individual", "update_individual"),
    ("check out", "check_out"),
    ("reinstatement", "reinstatement"),
    ("inter site transfer", "inter_site_transfer"),
    ("out commission", "out_commission"),
    ("in commission", "in_commission"),
];

struct Schemas {
    event: Validator,
    heartbeat: Validator,
    ours: BTreeMap<&'static str, Validator>,
    our_heartbeat: Validator,
}

impl Schemas {
    fn load() -> Self {
        Schemas {
            event: original("event.json"),
            heartbeat: original("heartbeat.json"),
            ours: OPERATIONS.iter().map(|(op, ty)| (*op, ours(ty))).collect(),
            our_heartbeat: ours("heartbeat"),
        }
    }

    fn ours_event(&self, v: &Value) -> bool {
        v.get("operation")
            .and_then(Value::as_str)
            .and_then(|op| self.ours.get(op))
            .is_some_and(|s| s.is_valid(v))
    }
}

/// xorshift64*: a tiny seeded generator, so the corpus is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn string(&mut self, alphabet: &[u8], len: usize) -> String {
        (0..len).map(|_| *self.pick(alphabet) as char).collect()
    }
}

const LOWER: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
const BED: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789- ";
const INTERSITE: [&str; 10] = [
    "Rule 40/42 dynamic risk assessment",
    "Moved to sterile condition pending removal",
    "Home Office interview scheme",
    "Separation of detainees",
    "Safety concern",
    "Behavioral concern",
    "Healthcare request",
    "Detained partner in other centre",
    "Charter movement",
    "Other",
];
const OOC: [&str; 6] = [
    "Maintenance - Malicious/Accidental Damage",
    "Maintenance - Health and Safety Concern",
    "Maintenance - Planned works",
    "Crime Scene",
    "Medical Isolation",
    "Other",
];
const SINGLE: [&str; 2] = ["Single Occupancy", "Single Occupancy - Reserved"];

fn centre(r: &mut Rng) -> String {
    let len = 3 + r.below(28) as usize;
    r.string(LOWER, len)
}

fn timestamp(r: &mut Rng) -> String {
    let base = format!(
        "20{:02}-{:02}-{:02}T{:02}:{:02}:{:02}",
        r.below(40),
        1 + r.below(12),
        1 + r.below(28),
        r.below(24),
        r.below(60),
        r.below(60)
    );
    match r.below(4) {
        0 => format!("{base}Z"),
        1 => format!("{base}.{:03}Z", r.below(1000)),
        2 => format!("{base}+01:00"),
        _ => format!("{base}-05:30"),
    }
}

fn id(r: &mut Rng) -> Value {
    // Small ids and very large ones: the ICD sets no upper bound.
    if r.chance(80) {
        json!(r.below(100_000))
    } else {
        json!(r.next() >> 1)
    }
}

fn valid_event(r: &mut Rng) -> Value {
    let (op, _) = *r.pick(&OPERATIONS);
    let mut m = Map::new();
    m.insert("operation".into(), json!(op));
    m.insert("timestamp".into(), json!(timestamp(r)));
    m.insert("centre".into(), json!(centre(r)));
    let gender = json!(*r.pick(&["m", "f"]));
    match op {
        "check in" | "update individual" => {
            m.insert("person_id".into(), id(r));
            m.insert("cid_id".into(), id(r));
            m.insert("gender".into(), gender);
            let nat = if r.chance(10) {
                "xxx".to_string()
            } else {
                r.string(LOWER, 3)
            };
            m.insert("nationality".into(), json!(nat));
        }
        "check out" | "reinstatement" => {
            m.insert("person_id".into(), id(r));
        }
        "inter site transfer" => {
            m.insert("person_id".into(), id(r));
            m.insert("centre_to".into(), json!(centre(r)));
            m.insert("reason".into(), json!(*r.pick(&INTERSITE)));
        }
        "out commission" => {
            let len = r.below(76) as usize;
            m.insert("bed_ref".into(), json!(r.string(BED, len)));
            m.insert("gender".into(), gender);
            if r.chance(30) {
                m.insert("reason".into(), json!(*r.pick(&SINGLE)));
                m.insert("single_occupancy_person_id".into(), id(r));
            } else {
                m.insert("reason".into(), json!(*r.pick(&OOC)));
            }
        }
        _ => {
            let len = r.below(76) as usize;
            m.insert("bed_ref".into(), json!(r.string(BED, len)));
        }
    }
    Value::Object(m)
}

fn valid_heartbeat(r: &mut Rng) -> Value {
    let mut m = Map::new();
    m.insert("centre".into(), json!(centre(r)));
    for k in [
        "male_occupied",
        "female_occupied",
        "male_outofcommission",
        "female_outofcommission",
    ] {
        m.insert(k.into(), json!(r.below(5001)));
    }
    for k in ["male_total_configured", "female_total_configured"] {
        if r.chance(70) {
            m.insert(k.into(), json!(r.below(5001)));
        }
    }
    Value::Object(m)
}

/// Variants of a payload that break, or only stretch, one rule. Their verdicts are whatever
/// the original says; the test only asks that ours agree.
fn mutations(r: &mut Rng, v: &Value) -> Vec<Value> {
    let Value::Object(m) = v else { return vec![] };
    let keys: Vec<String> = m.keys().cloned().collect();
    let mut out = Vec::new();
    let with = |k: &str, val: Value| {
        let mut c = m.clone();
        c.insert(k.to_string(), val);
        Value::Object(c)
    };
    // Drop one property.
    let k = r.pick(&keys).clone();
    let mut c = m.clone();
    c.remove(&k);
    out.push(Value::Object(c));
    // An unknown property (refused by events, allowed by heartbeats).
    out.push(with("unexpected", json!(1)));
    // Each property replaced by a value of another kind or out of bounds.
    let k = r.pick(&keys).clone();
    let replacement = r
        .pick(&[
            json!(null),
            json!(-1),
            json!(5001),
            json!(1.5),
            json!(2.0),
            json!("12"),
            json!(true),
            json!([]),
            json!({}),
            json!(""),
            json!("ABC"),
            json!("ab"),
            json!("abcdefghijklmnopqrstuvwxyzabcde"),
            json!("gbr"),
            json!("x"),
            json!("bed_1"),
            json!("B".repeat(76)),
            json!("2024-13-01T00:00:00Z"),
            json!("2024-01-01 10:00:00"),
            json!("2024-01-01T10:00:00"),
            json!("Single Occupancy"),
            json!("Other"),
            json!("check in"),
            json!("check out"),
            json!("out commission"),
            json!("CHECK IN"),
        ])
        .clone();
    out.push(with(&k, replacement));
    // Another operation on the same body.
    let (op, _) = *r.pick(&OPERATIONS);
    out.push(with("operation", json!(op)));
    out
}

/// Hand-made payloads at the edges of the rules.
fn hand_made() -> Vec<Value> {
    let ci = json!({"operation": "check in", "timestamp": "2024-01-01T10:00:00Z", "centre": "brookhouse",
        "person_id": 1, "cid_id": 2, "gender": "m", "nationality": "gbr"});
    let ooc = json!({"operation": "out commission", "timestamp": "2024-01-01T10:00:00Z", "centre": "yarlswood",
        "bed_ref": "A-1 2", "reason": "Crime Scene", "gender": "f"});
    let mut cases = vec![
        json!(null),
        json!([]),
        json!("check in"),
        json!(1),
        json!({}),
        json!({"operation": "check in"}),
        json!({"operation": 5}),
        json!({"operation": "unknown", "timestamp": "2024-01-01T10:00:00Z", "centre": "abc"}),
        ci.clone(),
        ooc.clone(),
    ];
    let mut edit = |base: &Value, k: &str, v: Value| {
        let mut c = base.clone();
        c[k] = v;
        cases.push(c);
    };
    edit(&ci, "person_id", json!(0));
    edit(&ci, "person_id", json!(-1));
    edit(&ci, "person_id", json!(1.0));
    edit(&ci, "cid_id", json!(1e3));
    edit(&ci, "nationality", json!("xxx"));
    edit(&ci, "nationality", json!("XXX"));
    edit(&ci, "nationality", json!("gbrr"));
    edit(&ci, "centre", json!("ab"));
    edit(&ci, "centre", json!("a".repeat(30)));
    edit(&ci, "centre", json!("a".repeat(31)));
    edit(&ci, "centre", json!("brook house"));
    edit(&ci, "gender", json!("M"));
    edit(&ci, "timestamp", json!("2024-02-30T10:00:00Z"));
    edit(&ci, "timestamp", json!("2024-01-01T10:00:00+0100"));
    edit(&ci, "timestamp", json!("2024-01-01t10:00:00z"));
    edit(&ooc, "bed_ref", json!(""));
    edit(&ooc, "bed_ref", json!("x".repeat(75)));
    edit(&ooc, "bed_ref", json!("x".repeat(76)));
    edit(&ooc, "bed_ref", json!("A/1"));
    edit(&ooc, "reason", json!("Single Occupancy"));
    edit(&ooc, "single_occupancy_person_id", json!(3));
    let mut single = ooc.clone();
    single["reason"] = json!("Single Occupancy - Reserved");
    cases.push(single.clone());
    single["single_occupancy_person_id"] = json!(3);
    cases.push(single.clone());
    single["reason"] = json!("Medical Isolation");
    cases.push(single);
    cases
}

#[test]
fn our_event_schemas_accept_exactly_what_icd_1_2_0_accepts() {
    let s = Schemas::load();
    let mut r = Rng(0x0001_CD12);
    let (mut valid, mut invalid, mut checked) = (0, 0, 0);
    let mut per_op: BTreeMap<String, usize> = BTreeMap::new();
    let mut corpus = hand_made();
    for _ in 0..1500 {
        let v = valid_event(&mut r);
        assert!(
            s.event.is_valid(&v),
            "the generator made an invalid event: {v}"
        );
        *per_op
            .entry(v["operation"].as_str().unwrap_or("").to_string())
            .or_default() += 1;
        corpus.extend(mutations(&mut r, &v));
        corpus.push(v);
    }
    let mut float_ints = 0;
    for v in &corpus {
        let theirs = s.event.is_valid(v);
        let ours = s.ours_event(v);
        let float_int = integer_written_as_float(v, &EVENT_INTEGER_FIELDS).is_some();
        if theirs != ours {
            assert!(float_int && ours, "schema verdicts differ on {v}");
            float_ints += 1;
        }
        assert_eq!(
            theirs,
            ours && !float_int,
            "the ingress's verdict differs on {v}"
        );
        checked += 1;
        if theirs {
            valid += 1;
        } else {
            invalid += 1;
        }
    }
    assert!(valid >= 1000, "only {valid} valid events");
    assert!(invalid >= 1000, "only {invalid} invalid events");
    assert_eq!(per_op.len(), 7, "every operation is generated: {per_op:?}");
    assert!(float_ints > 0, "the corpus has integers written as 1.0");
    eprintln!("{checked} events checked: {valid} valid, {invalid} invalid; {per_op:?}");
}

#[test]
fn our_heartbeat_schema_accepts_exactly_what_icd_1_2_0_accepts() {
    let s = Schemas::load();
    let mut r = Rng(0x4EA2_7BEA);
    let (mut valid, mut invalid) = (0, 0);
    let mut corpus = vec![
        json!({}),
        json!([]),
        json!({"centre": "abc", "male_occupied": 0, "female_occupied": 0, "male_outofcommission": 0, "female_outofcommission": 5000}),
        json!({"centre": "abc", "male_occupied": 0, "female_occupied": 0, "male_outofcommission": 0, "female_outofcommission": 5001}),
        json!({"centre": "abc", "male_occupied": 0, "female_occupied": 0, "male_outofcommission": 0, "female_outofcommission": 1, "male_total_configured": -1}),
        json!({"centre": "abc", "male_occupied": 0, "female_occupied": 0, "male_outofcommission": 0, "female_outofcommission": 1, "note": "extra"}),
        // A float in a property the ICD does not name is fine: only its integer fields count.
        json!({"centre": "abc", "male_occupied": 0, "female_occupied": 0, "male_outofcommission": 0, "female_outofcommission": 1, "ratio": 0.5, "person_id": 1.5}),
        json!({"centre": "abc", "male_occupied": 1.0, "female_occupied": 0, "male_outofcommission": 0, "female_outofcommission": 1}),
    ];
    for _ in 0..1500 {
        let v = valid_heartbeat(&mut r);
        assert!(
            s.heartbeat.is_valid(&v),
            "the generator made an invalid heartbeat: {v}"
        );
        corpus.extend(mutations(&mut r, &v));
        corpus.push(v);
    }
    for v in &corpus {
        let theirs = s.heartbeat.is_valid(v);
        let ours = s.our_heartbeat.is_valid(v);
        let float_int = integer_written_as_float(v, &HEARTBEAT_INTEGER_FIELDS).is_some();
        assert!(
            theirs == ours || (float_int && ours),
            "schema verdicts differ on {v}"
        );
        assert_eq!(
            theirs,
            ours && !float_int,
            "the ingress's verdict differs on {v}"
        );
        if theirs {
            valid += 1;
        } else {
            invalid += 1;
        }
    }
    assert!(valid >= 1000, "only {valid} valid heartbeats");
    assert!(invalid >= 500, "only {invalid} invalid heartbeats");
}

/// Every schema file of both packs is one the broker accepts, and each pack names them all.
#[test]
fn shipped_packs_load_and_every_schema_compiles() {
    for pack in ["irc", "moves"] {
        let path = dir("../schemas").join(pack).join("pack.toml");
        let loaded = broker_server::pack::Pack::load(&path).expect("pack loads");
        let types: usize = loaded.rooms.iter().map(|r| r.event_types.len()).sum();
        let files = std::fs::read_dir(dir("../schemas").join(pack))
            .expect("schema folder")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".schema.json"))
            .filter(|e| e.file_name() != "notification.schema.json")
            .count();
        assert_eq!(types, files, "{pack}: every schema file is in the pack");
        for room in &loaded.rooms {
            for t in &room.event_types {
                jsonschema::options()
                    .should_validate_formats(true)
                    .build(&t.schema)
                    .unwrap_or_else(|e| panic!("{pack}/{}: {e}", t.name));
                assert!(!t.description.is_empty(), "{}", t.name);
            }
        }
    }
}

fn moves_schema(name: &str) -> Validator {
    jsonschema::options()
        .should_validate_formats(true)
        .build(&read(
            dir("../schemas/moves").join(format!("{name}.schema.json")),
        ))
        .expect("our schema compiles")
}

/// A minimal valid example of each move and journey event type.
fn move_example(ty: &str) -> Value {
    let loc = "067c2855-fa41-493d-9c80-1311a4f7ba45";
    let details = match ty {
        "MoveProposed" => {
            json!({"from_location": loc, "date_from": "2020-07-06", "move_type": "prison_transfer"})
        }
        "MoveRequested" => {
            json!({"from_location": loc, "date": "2020-07-08", "move_type": "court_appearance"})
        }
        "MoveApprove" => json!({"date": "2020-07-08"}),
        "MoveCancel" => {
            json!({"cancellation_reason": "made_in_error", "cancellation_reason_comment": "x"})
        }
        "MoveReject" => json!({"rejection_reason": "no_transport_available", "rebook": true}),
        "MoveRedirect" => json!({"to_location": loc, "reason": "no_space"}),
        "MoveLockout" => json!({"from_location": loc, "reason": "traffic_issues"}),
        "MoveLodgingStart" => json!({"location_id": loc, "reason": "overnight_lodging"}),
        "MoveLodgingEnd" => json!({"location_id": loc}),
        _ => json!({}),
    };
    let mut v = json!({
        "event_type": ty,
        "move_id": "d5e345ee-4be1-4510-b8ee-7bdf30599711",
        "occurred_at": "2020-07-16T11:05:23.248Z",
        "recorded_at": "2020-07-16T11:05:24+01:00",
        "notes": "van on the way",
        "details": details,
    });
    if ty.starts_with("Journey") {
        v["journey_id"] = json!("8b5a7a0e-0f7e-4c36-9d0a-2d8f0b0c1e55");
    }
    v
}

#[test]
fn move_schemas_accept_their_examples_and_every_event_is_a_valid_notification() {
    let pack = broker_server::pack::Pack::load(&dir("../schemas/moves/pack.toml")).expect("pack");
    let notification = moves_schema("notification");
    let types: Vec<String> = pack.rooms[0]
        .event_types
        .iter()
        .map(|t| t.name.to_string())
        .collect();
    assert!(types.len() >= 18, "{types:?}");
    for ty in &types {
        let s = moves_schema(ty);
        let ok = move_example(ty);
        assert!(
            s.is_valid(&ok),
            "{ty}: {:?}",
            s.iter_errors(&ok)
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
        );
        assert!(notification.is_valid(&ok), "{ty} is a notification");
        for other in types.iter().filter(|o| *o != ty) {
            assert!(
                !s.is_valid(&with_type(&ok, other)),
                "{ty} refuses event_type {other}"
            );
        }
        for (k, v) in [
            ("move_id", json!("not-a-uuid")),
            ("occurred_at", json!("2020-07-16")),
            ("unexpected", json!(1)),
        ] {
            let mut bad = ok.clone();
            bad[k] = v;
            assert!(!s.is_valid(&bad), "{ty} refuses {k}");
        }
    }
    // Reasons are enums, as in the real API.
    let mut cancel = move_example("MoveCancel");
    cancel["details"]["cancellation_reason"] = json!("bored");
    assert!(!moves_schema("MoveCancel").is_valid(&cancel));
    let mut lodging = move_example("MoveLodgingStart");
    lodging["details"] = json!({"location_id": "067c2855-fa41-493d-9c80-1311a4f7ba45"});
    assert!(
        !moves_schema("MoveLodgingStart").is_valid(&lodging),
        "a lodging needs a reason"
    );
}

fn with_type(v: &Value, ty: &str) -> Value {
    let mut v = v.clone();
    v["event_type"] = json!(ty);
    v
}
