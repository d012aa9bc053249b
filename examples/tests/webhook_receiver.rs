//! Runs the webhook receiver example as its header says and sends it real pushes from a broker,
//! plus a forged request and a repeat. Guards against the copyable receiver refusing the
//! broker's genuine signatures, accepting a forged one, or processing a repeat twice.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use broker_core::{
    Broker, Config, DeliveryMode, EventTypeName, EventTypeSpec, NewRoom, NewSubscription,
    Principal, PublishRequest, PushEndpoint, RoomName, SystemClock,
};
use serde_json::json;

/// Kills the receiver when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next stdout line of the receiver, waiting at most 30 s (a bound for a broken run only).
fn next_line(lines: &mpsc::Receiver<String>) -> String {
    lines
        .recv_timeout(Duration::from_secs(30))
        .expect("the receiver printed a line in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifies_broker_pushes_refuses_forgeries_and_drops_repeats() {
    // The receiver's port is chosen first, because the subscription (made before the receiver
    // starts, since the receiver needs its secret) must name it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut config = Config::default();
    config.delivery.push_allow.loopback = true;
    let broker = Broker::open_in_memory(config, Arc::new(SystemClock))
        .await
        .expect("broker");
    let me = Principal::new("team").expect("principal");
    let room = RoomName::new("notices").expect("room");
    broker
        .create_room(NewRoom::new(room.clone(), me.clone()).approved())
        .await
        .expect("room");
    let ty = EventTypeName::new("notice").expect("type");
    broker
        .put_event_type(
            &room,
            EventTypeSpec {
                name: ty.clone(),
                description: String::new(),
                schema: json!({"type": "object"}),
                key_pointer: None,
            },
        )
        .await
        .expect("type");
    let created = broker
        .create_subscription(
            &room,
            NewSubscription::new(
                me.clone(),
                DeliveryMode::Push(PushEndpoint {
                    url: format!("http://127.0.0.1:{port}/hook"),
                    headers: Vec::new(),
                    basic_auth: None,
                }),
            ),
        )
        .await
        .expect("subscription");
    let secret = created.secret.expect("a secret");

    let mut child = Command::new(env!("CARGO_BIN_EXE_webhook_receiver"))
        .arg(format!("127.0.0.1:{port}"))
        .env("WEBHOOK_SECRET", &secret)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start webhook_receiver");
    let stdout = child.stdout.take().expect("stdout");
    let _running = Running(child);
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    assert_eq!(
        next_line(&lines),
        format!("listening on http://127.0.0.1:{port}")
    );

    // Genuine pushes from the broker are accepted (the broker retries until the receiver is up).
    for n in 1..=2 {
        broker
            .publish(PublishRequest::new(
                room.clone(),
                ty.clone(),
                me.clone(),
                format!(r#"{{"n":{n}}}"#),
            ))
            .await
            .expect("publish");
    }
    let mut accepted = Vec::new();
    while accepted.len() < 2 {
        let l = next_line(&lines);
        assert!(l.starts_with("accepted "), "{l}");
        accepted.push(l);
    }
    assert!(accepted[0].ends_with(r#" notice {"n":1}"#), "{accepted:?}");
    assert!(accepted[1].ends_with(r#" notice {"n":2}"#), "{accepted:?}");

    // A forged request, then one signed with the secret, sent twice.
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/hook");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let body = r#"{"n":3}"#;
    let forged = http
        .post(&url)
        .header("webhook-id", "msg_forged")
        .header("webhook-timestamp", now.to_string())
        .header("webhook-signature", "v1,AAAA")
        .body(body)
        .send()
        .await
        .expect("send");
    assert_eq!(forged.status().as_u16(), 401);
    assert_eq!(next_line(&lines), "rejected BadSignature");
    let key = B64
        .decode(secret.trim_start_matches("whsec_"))
        .expect("base64 key");
    let signature = broker_core::sign_webhook(&key, "msg_twice", now, body.as_bytes());
    for expected in ["accepted msg_twice - {\"n\":3}", "repeat msg_twice"] {
        let r = http
            .post(&url)
            .header("webhook-id", "msg_twice")
            .header("webhook-timestamp", now.to_string())
            .header("webhook-signature", &signature)
            .body(body)
            .send()
            .await
            .expect("send");
        assert!(r.status().is_success());
        assert_eq!(next_line(&lines), expected);
    }
    broker.close().await;
}

/// A secret that is not `whsec_` + base64 stops the receiver at once with a message, instead of
/// a receiver that refuses every push.
#[test]
fn a_malformed_secret_is_refused_at_start() {
    for secret in ["", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_!!!"] {
        let out = Command::new(env!("CARGO_BIN_EXE_webhook_receiver"))
            .arg("127.0.0.1:0")
            .env("WEBHOOK_SECRET", secret)
            .output()
            .expect("start webhook_receiver");
        assert_eq!(out.status.code(), Some(1), "{secret:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("WEBHOOK_SECRET must be whsec_"),
            "{secret:?}: {out:?}"
        );
    }
}
