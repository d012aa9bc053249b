//! Outbound webhooks: Standard Webhooks signing and the transport that POSTs deliveries.
//!
//! The core knows nothing about serving HTTP; sending a webhook is a delivery transport behind
//! the [`Transport`] trait, so tests and embedders can replace it, and reqwest stays in this one
//! module.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::subscription::BasicAuth;

/// The prefix of Standard Webhooks secrets.
const SECRET_PREFIX: &str = "whsec_";

/// Makes a new signing secret: `whsec_` and base64 of 32 random bytes (from the OS generator
/// through UUIDv4).
pub(crate) fn new_secret() -> String {
    let mut key = Vec::with_capacity(32);
    key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    format!("{SECRET_PREFIX}{}", B64.encode(key))
}

/// The key bytes of a `whsec_...` secret.
pub fn secret_key(secret: &str) -> Result<Vec<u8>> {
    let b64 = secret
        .strip_prefix(SECRET_PREFIX)
        .ok_or_else(|| Error::invalid("secret", "must start with whsec_"))?;
    B64.decode(b64)
        .map_err(|e| Error::invalid("secret", format!("not base64: {e}")))
}

/// The Standard Webhooks signature `v1,<base64 HMAC-SHA256(key, id.timestamp.body)>`.
pub fn sign(key: &[u8], msg_id: &str, timestamp_secs: u64, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

/// Checks a `webhook-signature` header (one or more space-separated `v1,...` signatures) against
/// a secret, in constant time per signature. For receivers; the broker only signs.
pub fn verify(
    secret: &str,
    msg_id: &str,
    timestamp_secs: u64,
    body: &[u8],
    signature_header: &str,
) -> bool {
    let Ok(key) = secret_key(secret) else {
        return false;
    };
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(&key) else {
        return false;
    };
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let expected = mac.finalize().into_bytes();
    signature_header.split(' ').any(|s| {
        s.strip_prefix("v1,")
            .and_then(|b| B64.decode(b).ok())
            .is_some_and(|got| {
                got.len() == expected.len()
                    && got
                        .iter()
                        .zip(expected.iter())
                        .fold(0u8, |a, (x, y)| a | (x ^ y))
                        == 0
            })
    })
}

/// One webhook request, fully prepared: the transport only sends it.
#[derive(Clone, Debug)]
pub struct PushRequest {
    /// The endpoint.
    pub url: String,
    /// Every header to send, signature included.
    pub headers: Vec<(String, String)>,
    /// Optional HTTP Basic credentials.
    pub basic_auth: Option<BasicAuth>,
    /// The payload bytes exactly as published.
    pub body: Vec<u8>,
}

/// What came back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushResponse {
    /// The final HTTP status, or `None` when no response came (connect error, timeout...).
    pub status: Option<u16>,
    /// The Retry-After the receiver asked for, in milliseconds.
    pub retry_after_ms: Option<u64>,
    /// The error text when there was no response.
    pub error: Option<String>,
    /// How long it took.
    pub latency_ms: u64,
}

/// Sends webhook requests.
pub trait Transport: Send + Sync + 'static {
    /// Sends one request and reports what came back; never panics on a bad endpoint.
    fn send(&self, request: PushRequest)
        -> Pin<Box<dyn Future<Output = PushResponse> + Send + '_>>;
}

/// The reqwest transport: pooled connections, a request timeout, a bounded number of redirects.
pub struct HttpTransport {
    client: reqwest::Client,
}

impl HttpTransport {
    /// A transport with `timeout_ms` per request and at most `redirects_max` redirects.
    pub fn new(timeout_ms: u64, redirects_max: usize) -> Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(timeout_ms))
            .connect_timeout(Duration::from_millis(timeout_ms))
            .redirect(reqwest::redirect::Policy::limited(redirects_max))
            .user_agent(concat!("Postroom/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(32)
            .build()
            .map_err(|e| Error::Storage(format!("cannot build the HTTP client: {e}")))?;
        Ok(HttpTransport { client })
    }
}

impl Transport for HttpTransport {
    fn send(
        &self,
        request: PushRequest,
    ) -> Pin<Box<dyn Future<Output = PushResponse> + Send + '_>> {
        Box::pin(async move {
            let started = Instant::now();
            let mut builder = self.client.post(&request.url).body(request.body);
            for (name, value) in &request.headers {
                builder = builder.header(name.as_str(), value.as_str());
            }
            if let Some(auth) = &request.basic_auth {
                builder = builder.basic_auth(&auth.username, Some(&auth.password));
            }
            let outcome = builder.send().await;
            let latency_ms = started.elapsed().as_millis() as u64;
            match outcome {
                Ok(resp) => {
                    let retry_after_ms = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_retry_after_ms(v, std::time::SystemTime::now()));
                    PushResponse {
                        status: Some(resp.status().as_u16()),
                        retry_after_ms,
                        error: None,
                        latency_ms,
                    }
                }
                Err(e) => {
                    let what = if e.is_timeout() {
                        "timeout"
                    } else if e.is_connect() {
                        "connect error"
                    } else if e.is_redirect() {
                        "too many redirects"
                    } else {
                        "request error"
                    };
                    PushResponse {
                        status: None,
                        retry_after_ms: None,
                        error: Some(format!("{what}: {e}")),
                        latency_ms,
                    }
                }
            }
        })
    }
}

/// Retry-After as delay-seconds or an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), relative to
/// `now`. Anything else is ignored.
pub(crate) fn parse_retry_after_ms(value: &str, now: std::time::SystemTime) -> Option<u64> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(secs.saturating_mul(1000));
    }
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let rest = value.split_once(", ")?.1;
    let parts: Vec<&str> = rest.split(' ').collect();
    let [day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| m == month)? as i64
        + 1;
    let (day, year): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let hms: Vec<i64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, s] = hms.as_slice() else {
        return None;
    };
    // days_from_civil (Howard Hinnant).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let at_secs = days * 86_400 + h * 3600 + m * 60 + s;
    let now_secs = now.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64;
    Some((at_secs - now_secs).max(0) as u64 * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published Standard Webhooks test vector.
    #[test]
    fn standard_webhooks_test_vector() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let key = secret_key(secret).unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let body = br#"{"test": 2432232314}"#;
        assert!(verify(
            secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            body,
            &sig
        ));
        assert!(verify(
            secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            body,
            &format!("v1,AAAA {sig}")
        ));
        assert!(!verify(
            secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_331,
            body,
            &sig
        ));
        assert!(!verify(
            secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            b"{}",
            &sig
        ));
    }

    #[test]
    fn new_secrets_are_distinct_and_usable() {
        let a = new_secret();
        let b = new_secret();
        assert_ne!(a, b);
        assert!(a.starts_with("whsec_"));
        assert_eq!(secret_key(&a).unwrap().len(), 32);
        assert!(secret_key("nope").is_err());
    }

    #[test]
    fn retry_after_forms() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(parse_retry_after_ms("120", now), Some(120_000));
        assert_eq!(
            parse_retry_after_ms("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(0)
        );
        let later = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777 - 30);
        assert_eq!(
            parse_retry_after_ms("Sun, 06 Nov 1994 08:49:37 GMT", later),
            Some(30_000)
        );
        assert_eq!(parse_retry_after_ms("soon", now), None);
    }
}
