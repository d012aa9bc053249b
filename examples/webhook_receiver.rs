//! Webhook receiver: the smallest correct receiver of Postroom pushes, for other teams to copy.
//! It verifies the Standard Webhooks signature on the raw body (before parsing anything),
//! refuses stale timestamps (replays), answers 2xx at once, and drops repeats by `webhook-id`
//! (delivery is at least once). It depends only on axum, tokio, hmac, sha2 and base64: no
//! Postroom crate.
//!
//! Run: `WEBHOOK_SECRET=whsec_... cargo run -p postroom-examples --bin webhook_receiver -- 127.0.0.1:9000`
//! (the secret is the one `POST /v1/rooms/{room}/subscriptions` showed once). It prints
//! `listening on http://ADDR`, then one line per request: `accepted`, `repeat` or `rejected`.
//! Point a push subscription at `http://ADDR/hook`. It runs until stopped (Ctrl-C).
#![forbid(unsafe_code)]

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How far a `webhook-timestamp` may be from our clock, in seconds (the Standard Webhooks
/// libraries' default): older requests are refused, so a captured request cannot be replayed.
const TOLERANCE_SECS: u64 = 300;
/// How many recent ids are remembered to drop repeats; bounded so memory stays flat.
const SEEN_MAX: usize = 100_000;

/// Why a request is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    /// A `webhook-*` header is missing or malformed.
    MissingHeader(&'static str),
    /// The timestamp is outside the tolerance.
    Stale,
    /// No signature matches.
    BadSignature,
}

/// Checks a request's Standard Webhooks headers against `secret` (`whsec_` + base64 key) and
/// returns its `webhook-id`. `now_secs` is the receiver's clock.
pub fn verify(
    secret: &str,
    headers: &HeaderMap,
    body: &[u8],
    now_secs: u64,
) -> Result<String, Rejected> {
    let header = |name: &'static str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or(Rejected::MissingHeader(name))
    };
    let id = header("webhook-id")?;
    let ts: u64 = header("webhook-timestamp")?
        .parse()
        .map_err(|_| Rejected::MissingHeader("webhook-timestamp"))?;
    if now_secs.abs_diff(ts) > TOLERANCE_SECS {
        return Err(Rejected::Stale);
    }
    let key = secret
        .strip_prefix("whsec_")
        .and_then(|k| B64.decode(k).ok())
        .ok_or(Rejected::BadSignature)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|_| Rejected::BadSignature)?;
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    // Several signatures during a secret rotation: any one that matches will do.
    // `verify_slice` compares in constant time.
    let ok = header("webhook-signature")?.split(' ').any(|sig| {
        sig.strip_prefix("v1,")
            .and_then(|b| B64.decode(b).ok())
            .is_some_and(|got| mac.clone().verify_slice(&got).is_ok())
    });
    if ok {
        Ok(id.to_string())
    } else {
        Err(Rejected::BadSignature)
    }
}

struct Receiver {
    secret: String,
    seen: Mutex<(HashSet<String>, VecDeque<String>)>,
}

async fn hook(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let id = match verify(&r.secret, &headers, &body, now) {
        Ok(id) => id,
        Err(why) => {
            println!("rejected {why:?}");
            // 401 is a failure to the broker: it retries, and the attempt log shows it.
            return StatusCode::UNAUTHORIZED;
        }
    };
    {
        let mut seen = r.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.0.contains(&id) {
            println!("repeat {id}");
            return StatusCode::OK;
        }
        seen.0.insert(id.clone());
        seen.1.push_back(id.clone());
        if seen.1.len() > SEEN_MAX {
            if let Some(old) = seen.1.pop_front() {
                seen.0.remove(&old);
            }
        }
    }
    let ty = headers
        .get("postroom-event-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    // Hand the work to a queue or task here and answer at once: the broker times out after 5 s.
    println!("accepted {id} {ty} {}", String::from_utf8_lossy(&body));
    StatusCode::NO_CONTENT
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secret = std::env::var("WEBHOOK_SECRET")
        .map_err(|_| "set WEBHOOK_SECRET to the subscription's whsec_... secret")?;
    // A mistyped secret would refuse every push; say so now rather than on each request.
    if secret
        .strip_prefix("whsec_")
        .and_then(|k| B64.decode(k).ok())
        .is_none_or(|k| k.is_empty())
    {
        return Err("WEBHOOK_SECRET must be whsec_ followed by the base64 key".into());
    }
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".to_string());
    let state = Arc::new(Receiver {
        secret,
        seen: Mutex::new((HashSet::new(), VecDeque::new())),
    });
    let app = Router::new().route("/hook", post(hook)).with_state(state);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published Standard Webhooks test vector.
    #[test]
    fn verifies_the_standard_webhooks_test_vector() {
        let mut h = HeaderMap::new();
        h.insert(
            "webhook-id",
            "msg_p5jXN8AQM9LWM0D4loKWxJek".parse().unwrap(),
        );
        h.insert("webhook-timestamp", "1614265330".parse().unwrap());
        h.insert(
            "webhook-signature",
            "v1,bad v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
                .parse()
                .unwrap(),
        );
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            verify(secret, &h, body, 1614265330),
            Ok("msg_p5jXN8AQM9LWM0D4loKWxJek".to_string())
        );
        assert_eq!(
            verify(secret, &h, br#"{"test": 2432232315}"#, 1614265330),
            Err(Rejected::BadSignature)
        );
        assert_eq!(
            verify(secret, &h, body, 1614265330 + 301),
            Err(Rejected::Stale)
        );
    }
}
