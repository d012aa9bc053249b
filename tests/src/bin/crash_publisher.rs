//! A publisher to be killed: the crash-consistency test runs it as a child process, reads the
//! receipts it prints, and kills it with SIGKILL mid-load. Each line it prints is an event the
//! broker acknowledged as durable: `ack <event id> <key> <sequence>`.
//!
//! Usage: crash_publisher <database file> <keys> <concurrency> [push URL]
//! With a push URL, the first run also subscribes that URL to the Room, so deliveries are in
//! flight when the process dies. A database given as `postgres:<connection string>` is a
//! PostgreSQL database, whose certificate authority is `POSTROOM_STORAGE__POSTGRES__CA_FILE` when
//! set (several of these processes may share one: a publish that lost a race
//! with another process, `storage_conflict`, is tried again).
#![forbid(unsafe_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use broker_core::{
    Broker, Config, DeliveryMode, EventTypeSpec, NewRoom, NewSubscription, PublishRequest,
    PushEndpoint, RetryOverrides,
};
use postroom_tests::{person_schema, room, ty, who};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (path, keys, concurrency, push_url) = match args.as_slice() {
        [_, p, k, c] => (p, k, c, None),
        [_, p, k, c, u] => (p, k, c, Some(u.clone())),
        _ => {
            return Err(
                "usage: crash_publisher <database file> <keys> <concurrency> [push URL]".into(),
            )
        }
    };
    let keys: u64 = keys.parse()?;
    let concurrency: u64 = concurrency.parse()?;
    let mut config = Config::default();
    // The test's receiver listens on loopback, which the push target guard refuses by default.
    config.delivery.push_allow.loopback = true;
    let broker = match path.strip_prefix("postgres:") {
        Some(url) => {
            let pg = broker_core::PostgresConfig {
                url: url.to_string(),
                ca_file: std::env::var("POSTROOM_STORAGE__POSTGRES__CA_FILE").unwrap_or_default(),
                ..Default::default()
            };
            Broker::open_postgres(pg, config).await?
        }
        None => Broker::open(path, config).await?,
    };
    if broker.room(&room("crash")).is_err() {
        broker
            .create_room(NewRoom::new(room("crash"), who("admin")).approved())
            .await?;
        broker
            .put_event_type(
                &room("crash"),
                EventTypeSpec {
                    name: ty("moved"),
                    description: String::new(),
                    schema: person_schema(),
                    key_pointer: Some("/person".into()),
                },
            )
            .await?;
        if let Some(url) = push_url {
            let mut sub = NewSubscription::new(
                who("receiver"),
                DeliveryMode::Push(PushEndpoint {
                    url,
                    headers: vec![],
                    basic_auth: None,
                }),
            );
            sub.in_flight_max = Some(32);
            sub.retry = RetryOverrides {
                initial_delay_ms: Some(10),
                delay_ms_max: Some(100),
                jitter_percent: Some(0),
                ..Default::default()
            };
            broker.create_subscription(&room("crash"), sub).await?;
        }
    }
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let broker = broker.clone();
        let out = out.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                let key = format!("k{}", (t + i * concurrency) % keys);
                let body = serde_json::json!({"person": key, "n": i, "pad": "x".repeat(200)});
                let req = PublishRequest::new(
                    room("crash"),
                    ty("moved"),
                    who("p"),
                    serde_json::to_vec(&body)?,
                );
                let r = loop {
                    match broker.publish(req.clone()).await {
                        Err(broker_core::Error::StorageConflict { .. }) => continue,
                        other => break other?,
                    }
                };
                let mut o = out.lock().map_err(|_| "stdout lock poisoned")?;
                writeln!(o, "ack {} {} {}", r.id, r.key, r.sequence.0)?;
                o.flush()?;
            }
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        }));
    }
    for t in tasks {
        t.await?.map_err(|e| e.to_string())?;
    }
    Ok(())
}
