//! IPT move: the inter-prison transfer walkthrough of Book a Secure Move (seed 002) as events.
//! Each move goes proposed -> requested -> booked -> in_transit -> completed (`MoveProposed`,
//! `MoveApprove`, `MoveAccept`, `MoveStart`, `MoveComplete` in the `moves` pack), published
//! into the `moves` Room of an embedded broker. A supplier's webhook receiver gets them by push:
//! it verifies the Standard Webhooks signature on the raw body, drops repeats by `webhook-id`,
//! and checks that each move's events arrive in order, while it fails at random (answering 500
//! before, or even after, it has taken an event, so the broker retries and sends repeats).
//!
//! Run: `cargo run -p postroom-examples --bin ipt_move [MOVES] [SEED]` (default 5 moves, seed 2).
//! It prints the answer to one forged request (401), each move's statuses as the supplier saw
//! them, then a summary line.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use broker_core::{
    Broker, Config, DeliveryMode, EventTypeName, NewSubscription, Principal, PublishRequest,
    PushEndpoint, RetryOverrides, RoomName, SystemClock,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// The lifecycle of seed 002, with the status each event leads to.
const LIFECYCLE: [(&str, &str); 5] = [
    ("MoveProposed", "proposed"),
    ("MoveApprove", "requested"),
    ("MoveAccept", "booked"),
    ("MoveStart", "in_transit"),
    ("MoveComplete", "completed"),
];

/// xorshift64*: random failures that are the same on every run with the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn percent(&mut self) -> u64 {
        self.next() % 100
    }
}

/// What the supplier's receiver has seen.
#[derive(Default)]
struct Seen {
    ids: HashSet<String>,
    /// Per move, the statuses in the order their events were taken.
    moves: BTreeMap<String, Vec<&'static str>>,
    out_of_order: u32,
    repeats_dropped: u32,
    failures_injected: u32,
    bad_signatures: u32,
}

struct Supplier {
    secret: OnceLock<String>,
    rng: Mutex<Rng>,
    seen: Mutex<Seen>,
    /// Told when a move has completed.
    done: mpsc::UnboundedSender<String>,
}

/// The supplier's webhook endpoint.
async fn hook(State(s): State<Arc<Supplier>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    // 1. Verify the signature on the raw body, before parsing anything.
    let id = header("webhook-id").to_string();
    let ts: u64 = header("webhook-timestamp").parse().unwrap_or(0);
    let secret = s.secret.get().map(String::as_str).unwrap_or("");
    if !broker_core::verify_webhook(secret, &id, ts, &body, header("webhook-signature")) {
        lock(&s.seen).bad_signatures += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let (fail_before, fail_after) = {
        let mut r = lock(&s.rng);
        (r.percent() < 25, r.percent() < 10)
    };
    if fail_before {
        lock(&s.seen).failures_injected += 1;
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    // 2. Drop repeats by id: at-least-once delivery sends an event again after a failure.
    let mut guard = lock(&s.seen);
    // A plain `&mut Seen`, so that its fields can be borrowed apart.
    let seen = &mut *guard;
    if !seen.ids.insert(id) {
        seen.repeats_dropped += 1;
        return StatusCode::OK;
    }
    // 3. Check order: the event must be the move's next step.
    let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let move_id = event["move_id"].as_str().unwrap_or("").to_string();
    let ty = event["event_type"].as_str().unwrap_or("");
    let statuses = seen.moves.entry(move_id.clone()).or_default();
    let step = statuses.len();
    match LIFECYCLE.iter().position(|(t, _)| *t == ty) {
        Some(i) if i == step => statuses.push(LIFECYCLE[i].1),
        Some(i) => {
            statuses.push(LIFECYCLE[i].1);
            seen.out_of_order += 1;
        }
        None => seen.out_of_order += 1,
    }
    if statuses.len() == LIFECYCLE.len() {
        let _ = s.done.send(move_id);
    }
    // The very first event's answer is always lost, so every run shows a repeat being dropped.
    if fail_after || seen.ids.len() == 1 {
        // Taken, but the answer is lost: the broker will send it again, and step 2 drops it.
        seen.failures_injected += 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    StatusCode::NO_CONTENT
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The payload of one lifecycle event, as the `moves` schemas want it.
fn payload(move_id: &str, ty: &str, minute: u32) -> Value {
    let at = format!("2020-07-07T15:{minute:02}:00+01:00");
    let details = match ty {
        // BRINSFORD (HMP) to ISLE OF WIGHT (HMP), as in the walkthrough.
        "MoveProposed" => json!({
            "from_location": "067c2855-fa41-493d-9c80-1311a4f7ba45",
            "to_location": "056eed18-772b-45b3-b64a-4d7d563641f7",
            "date_from": "2020-07-06", "date_to": "2020-07-09",
            "move_type": "prison_transfer", "move_agreed": true, "move_agreed_by": "Fred Bloggs",
        }),
        "MoveApprove" => json!({"date": "2020-07-08"}),
        _ => json!({}),
    };
    let mut p = json!({
        "event_type": ty, "move_id": move_id, "occurred_at": at, "recorded_at": at,
        "details": details,
    });
    if ty == "MoveStart" {
        p["notes"] = json!("van on the way");
    }
    p
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let moves: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5);
    let seed: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2);

    // The supplier's receiver, on a loopback port.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let supplier = Arc::new(Supplier {
        secret: OnceLock::new(),
        rng: Mutex::new(Rng(seed.max(1))),
        seen: Mutex::new(Seen::default()),
        done: done_tx,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let hook_url = url.clone();
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(supplier.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    // The broker, in memory, with the `moves` pack. Loopback pushes are refused by default
    // (a push target guard); the receiver here is on this machine, so they are allowed.
    let mut config = Config::default();
    config.delivery.push_allow.loopback = true;
    let broker = Broker::open_in_memory(config, Arc::new(SystemClock)).await?;
    let admin = Principal::new("local/ADMIN/postroom/admin")?;
    let pack = broker_server::pack::Pack::load(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/moves/pack.toml").as_ref(),
    )?;
    broker_server::pack::apply(&broker, &pack, &admin).await?;
    let room = RoomName::new("moves")?;

    // The supplier subscribes by push. Retries are made fast for the demonstration (the pack's
    // Room default starts at 2 s); per-move order holds whatever the timing.
    let supplier_app = Principal::new("UK/GOV/SUPPLIER/geoamey")?;
    let mut sub = NewSubscription::new(
        supplier_app,
        DeliveryMode::Push(PushEndpoint {
            url,
            headers: Vec::new(),
            basic_auth: None,
        }),
    );
    sub.retry = RetryOverrides {
        initial_delay_ms: Some(20),
        multiplier: Some(1.5),
        delay_ms_max: Some(200),
        attempts_max: Some(100),
        ..Default::default()
    };
    sub.in_flight_max = Some(4);
    let created = broker.create_subscription(&room, sub).await?;
    let secret = created.secret.ok_or("a push subscription has a secret")?;
    let _ = supplier.secret.set(secret);

    // PECS and the supplier publish the lifecycle of every move, the moves interleaved.
    let ids: Vec<String> = (0..moves)
        .map(|i| match i {
            0 => "d5e345ee-4be1-4510-b8ee-7bdf30599711".to_string(),
            i => format!("00000000-0000-4000-8000-{i:012}"),
        })
        .collect();
    let pecs = Principal::new("UK/GOV/MOJ/pecs")?;
    for (step, (ty, _)) in LIFECYCLE.iter().enumerate() {
        for id in &ids {
            let body = payload(id, ty, 10 + step as u32).to_string();
            let req =
                PublishRequest::new(room.clone(), EventTypeName::new(*ty)?, pecs.clone(), body);
            broker.publish(req).await?;
        }
    }

    // Wait until the supplier has every move completed; the bound only stops a broken run.
    let mut completed = 0;
    while completed < moves {
        match tokio::time::timeout(Duration::from_secs(60), done_rx.recv()).await {
            Ok(Some(_)) => completed += 1,
            _ => break,
        }
    }
    // A request that did not come from the broker is refused, and counted.
    let forged = reqwest::Client::new()
        .post(&hook_url)
        .header("webhook-id", "msg_forged")
        .header("webhook-timestamp", "1614265330")
        .header("webhook-signature", "v1,bm90IGEgc2lnbmF0dXJl")
        .body(r#"{"event_type":"MoveCancel"}"#)
        .send()
        .await?;
    println!("forged request: {}", forged.status().as_u16());
    {
        let seen = lock(&supplier.seen);
        for (id, statuses) in &seen.moves {
            println!("move {id}: {}", statuses.join(" -> "));
        }
        println!(
            "moves {completed}/{moves} completed, out of order {}, repeats dropped {}, failures injected {}, bad signatures {}",
            seen.out_of_order, seen.repeats_dropped, seen.failures_injected, seen.bad_signatures
        );
    }
    broker.close().await;
    if completed < moves {
        return Err("not every move reached the supplier in time".into());
    }
    Ok(())
}
