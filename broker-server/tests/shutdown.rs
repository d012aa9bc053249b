//! Shutting the server down while requests wait: a long-poll in flight is answered at once and
//! `serve` returns within seconds, not at the end of the poll's wait. Its own test binary, so
//! that the process-wide count of requests in flight is this test's alone.
#![forbid(unsafe_code)]

mod common;
use common::local;

use std::time::Duration;

use serde_json::{json, Value};

/// Issue 15, defect 4 (and item 5): a long-poll of 20 s in flight when the shutdown signal comes
/// is answered at once (200, no messages), and `serve` returns within a few seconds instead of
/// holding the shutdown for the poll's whole wait while its listener is already closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_in_flight_does_not_hold_the_shutdown() {
    let served = common::Served::start(local()).await;
    let base = format!("http://{}", served.addr);
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{base}/v1/rooms"))
        .json(&json!({"name": "r"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let sub: Value = client
        .post(format!("{base}/v1/rooms/r/subscriptions"))
        .json(&json!({"mode": "pull"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = sub["subscription"]["id"].as_str().unwrap().to_string();
    let poll = {
        let (client, url) = (client.clone(), format!("{base}/v1/subscriptions/{id}/pull"));
        tokio::spawn(async move {
            let r = client
                .post(url)
                .json(&json!({"wait_ms": 20_000}))
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        })
    };
    // The poll is in flight once the server counts two requests: it and the one asking.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let system: Value = client
            .get(format!("{base}/v1/admin/system"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if system["requests_in_flight"].as_i64() >= Some(2) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the poll never got in flight"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(3), served.stop())
        .await
        .expect("serve returned within 3 s of the shutdown signal");
    let (status, body) = tokio::time::timeout(Duration::from_secs(1), poll)
        .await
        .expect("the poll was answered")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messages"], json!([]));
    eprintln!("serve returned {:?} after the signal", started.elapsed());
}
