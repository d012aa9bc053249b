//! Embedded: broker-core inside another Rust service, with no HTTP at all. The program opens a
//! broker on a data folder, registers a Room and an event type, subscribes in pull mode,
//! publishes three events for two keys, pulls them (in order per key), acknowledges them, and
//! shows that nothing is left to pull.
//!
//! Run: `cargo run -p postroom-examples --bin embedded [DATA_DIR]` (default `./data/embedded`).
//! It prints one line per step; run it twice and the sequences carry on from the first run.
#![forbid(unsafe_code)]

use broker_core::{
    Broker, Config, DeliveryMode, Error, EventTypeName, EventTypeSpec, NewRoom, NewSubscription,
    Principal, PublishRequest, RoomName,
};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "data/embedded".to_string());
    std::fs::create_dir_all(&dir)?;
    // 1. Open: one redb file; every acknowledged publish is on disk.
    let broker = Broker::open(format!("{dir}/postroom.redb"), Config::default()).await?;
    let me = Principal::new("orders-service")?;
    let room = RoomName::new("orders")?;
    let placed = EventTypeName::new("order_placed")?;

    // 2. Register: a Room (approved, since this service is its own administrator) and an event
    // type whose ordering key is the customer, so each customer's events stay in order.
    match broker
        .create_room(NewRoom::new(room.clone(), me.clone()).approved())
        .await
    {
        Ok(_) => println!("room orders created"),
        Err(Error::RoomExists { .. }) => println!("room orders exists"),
        Err(e) => return Err(e.into()),
    }
    broker
        .put_event_type(
            &room,
            EventTypeSpec {
                name: placed.clone(),
                description: "A customer placed an order".into(),
                schema: json!({
                    "type": "object",
                    "required": ["customer", "order"],
                    "properties": {"customer": {"type": "string"}, "order": {"type": "integer"}},
                }),
                key_pointer: Some("/customer".into()),
            },
        )
        .await?;
    // One pull subscription, made on the first run only, so that a second run reads its queue.
    let sub = match broker
        .subscriptions(&room)?
        .into_iter()
        .find(|s| s.subscriber == me)
    {
        Some(s) => s,
        None => {
            broker
                .create_subscription(&room, NewSubscription::new(me.clone(), DeliveryMode::Pull))
                .await?
                .subscription
        }
    };
    println!("subscription {}", sub.id);

    // 3. Publish: each call returns once the event is durable, with its key and sequence.
    for (customer, order) in [("ada", 1), ("grace", 2), ("ada", 3)] {
        let payload = json!({"customer": customer, "order": order}).to_string();
        let r = broker
            .publish(PublishRequest::new(
                room.clone(),
                placed.clone(),
                me.clone(),
                payload,
            ))
            .await?;
        println!("published key={} sequence={}", r.key, r.sequence.0);
    }

    // 4. Pull and 5. ack until the queue is empty. With per-key order, a customer's next event
    // is handed out only after the previous one is acknowledged, so one pass may not see all.
    let mut acked = 0;
    loop {
        let batch = broker.pull(sub.id, 10, None, 0).await?;
        if batch.is_empty() {
            break;
        }
        let ids: Vec<String> = batch.iter().map(|m| m.ack_id.clone()).collect();
        for m in &batch {
            println!(
                "pulled key={} sequence={} {}",
                m.event.key,
                m.event.sequence.0,
                String::from_utf8_lossy(&m.event.payload)
            );
        }
        for r in broker.ack(sub.id, &ids).await? {
            r?;
            acked += 1;
        }
    }
    println!(
        "acked {acked}; backlog {}",
        broker.subscription(sub.id)?.backlog
    );
    broker.close().await;
    Ok(())
}
