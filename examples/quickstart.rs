//! Quickstart: runs the embedded broker on its default configuration, with its data in
//! `./data/postroom.redb`, creates a Room `demo` with one event type, publishes events and
//! prints what is stored.
//!
//! Run: `cargo run --release -p postroom-examples --bin quickstart`
//! Every line of standard input that is a JSON object `{"person": "...", "n": 1}` is published
//! too, e.g. `echo '{"person":"ada","n":1}' | cargo run -p postroom-examples --bin quickstart`.
//! Run it twice: the data is still there and each person's sequence continues.
#![forbid(unsafe_code)]

use std::io::{BufRead, IsTerminal};

use broker_core::{
    Broker, Config, Error, EventFilter, EventTypeName, EventTypeSpec, NewRoom, Principal,
    PublishRequest, RoomName,
};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = Broker::open("data/postroom.redb", Config::default()).await?;
    let room = RoomName::new("demo")?;
    let event_type = EventTypeName::new("person_moved")?;
    let me = Principal::new("quickstart")?;

    match broker
        .create_room(NewRoom::new(room.clone(), me.clone()).approved())
        .await
    {
        Ok(_) | Err(Error::RoomExists { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    broker
        .put_event_type(
            &room,
            EventTypeSpec {
                name: event_type.clone(),
                description: "A person moved somewhere".into(),
                schema: json!({
                    "$schema": "https://json-schema.org/draft/2020-12/schema",
                    "type": "object",
                    "required": ["person", "n"],
                    "properties": {"person": {"type": "string"}, "n": {"type": "integer"}},
                }),
                key_pointer: Some("/person".into()),
            },
        )
        .await?;

    let mut bodies: Vec<Vec<u8>> = vec![
        br#"{"person":"ada","n":1}"#.to_vec(),
        br#"{"person":"grace","n":1}"#.to_vec(),
        br#"{"person":"ada","n":2}"#.to_vec(),
    ];
    if !std::io::stdin().is_terminal() {
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            if !line.trim().is_empty() {
                bodies.push(line.into_bytes());
            }
        }
    }
    for body in bodies {
        let req = PublishRequest::new(room.clone(), event_type.clone(), me.clone(), body);
        match broker.publish(req).await {
            Ok(r) => println!("published {} key={} sequence={}", r.id, r.key, r.sequence.0),
            // Bad input is reported and skipped: the broker never stores it.
            Err(e) => println!("refused ({}): {e}", e.code()),
        }
    }
    let stored = broker.room(&room)?;
    println!(
        "room {} holds {} events ({} bytes)",
        stored.name, stored.events_stored, stored.bytes_stored
    );
    let page = broker
        .events(
            &room,
            EventFilter {
                limit: Some(5),
                ..Default::default()
            },
        )
        .await?;
    for e in page.items {
        println!(
            "  {} {} #{} {}",
            e.received_at.to_rfc3339(),
            e.key,
            e.sequence.0,
            String::from_utf8_lossy(&e.payload)
        );
    }
    broker.close().await;
    Ok(())
}
