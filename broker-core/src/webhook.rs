//! Outbound webhooks: Standard Webhooks signing and the transport that POSTs deliveries.
//!
//! The core knows nothing about serving HTTP; sending a webhook is a delivery transport behind
//! the [`Transport`] trait, so tests and embedders can replace it, and reqwest stays in this one
//! module.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::net_guard::{literal_ip, PushGuard};
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

/// Idle connections kept per receiving host: as many as one subscription may have pushes in
/// flight (`delivery.in_flight_max_max`), so that the connections of a burst are used again by
/// the next one rather than closed and opened anew. With 32, a subscription with 64 pushes in
/// flight to one host reopened half its connections on every burst, each leaving a socket in
/// TIME_WAIT: the kernel's search for a free local port took 13% of the tokio workers' samples
/// in the delivery benchmark. Idle connections still close after reqwest's idle timeout (90 s).
/// Pushes in flight per host are bounded by the same number (`host_limits.rs`), so that every
/// connection a host needs is kept.
pub(crate) const IDLE_CONNECTIONS_PER_HOST: usize = 1024;

/// The reqwest transport: pooled connections, a request timeout, a bounded number of redirects,
/// and the push target guard applied to every address it connects to.
///
/// The guard is enforced in three places because reqwest reaches an address in three ways: a
/// host name goes through [`GuardedResolver`], which drops refused addresses; an IP-literal URL
/// skips name resolution, so [`HttpTransport::send`] checks it before sending; and a redirect to
/// an IP literal is stopped by the redirect policy (a redirect to a name goes through the
/// resolver again). A refused push is an ordinary failed attempt, retried and dead-lettered by
/// the retry policy, with an error text that starts "push target refused:".
pub(crate) struct HttpTransport {
    client: reqwest::Client,
    guard: Arc<PushGuard>,
}

impl HttpTransport {
    /// A transport with `timeout_ms` per request, at most `redirects_max` redirects, and `guard`
    /// deciding which addresses may be reached.
    pub(crate) fn new(
        timeout_ms: u64,
        redirects_max: usize,
        guard: Arc<PushGuard>,
    ) -> Result<Self> {
        let redirect_guard = guard.clone();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(timeout_ms))
            .connect_timeout(Duration::from_millis(timeout_ms))
            .redirect(reqwest::redirect::Policy::custom(
                move |attempt| match redirect_verdict(
                    &redirect_guard,
                    attempt.url(),
                    attempt.previous().len(),
                    redirects_max,
                ) {
                    Ok(()) => attempt.follow(),
                    Err(stop) => attempt.error(stop),
                },
            ))
            .dns_resolver(GuardedResolver {
                guard: guard.clone(),
            })
            .user_agent(concat!("Postroom/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(IDLE_CONNECTIONS_PER_HOST)
            .build()
            .map_err(|e| Error::Storage(format!("cannot build the HTTP client: {e}")))?;
        Ok(HttpTransport { client, guard })
    }
}

/// Why a push was not sent to an address: the guard refused it. Its text is what the attempt log
/// shows, so it says what happened in full.
#[derive(Debug)]
struct TargetRefused(String);

impl fmt::Display for TargetRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "push target refused: {}", self.0)
    }
}

impl std::error::Error for TargetRefused {}

/// Why a redirect is not followed.
#[derive(Debug)]
enum RedirectStop {
    /// More than `redirects_max` redirects.
    TooMany,
    /// The redirect names an IP address the guard refuses.
    Refused(TargetRefused),
}

impl fmt::Display for RedirectStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedirectStop::TooMany => f.write_str("too many redirects"),
            RedirectStop::Refused(r) => r.fmt(f),
        }
    }
}

impl std::error::Error for RedirectStop {}

/// Whether to follow a redirect to `next`, `previous_urls` being the URLs visited so far (the
/// first is the original request, not a redirect). A redirect to a host name is followed here
/// and checked by the resolver when it connects.
fn redirect_verdict(
    guard: &PushGuard,
    next: &reqwest::Url,
    previous_urls: usize,
    redirects_max: usize,
) -> std::result::Result<(), RedirectStop> {
    if previous_urls > redirects_max {
        return Err(RedirectStop::TooMany);
    }
    check_literal(guard, next).map_err(RedirectStop::Refused)
}

/// Checks the host of `url` when it is an IP literal; names are left to the resolver.
fn check_literal(guard: &PushGuard, url: &reqwest::Url) -> std::result::Result<(), TargetRefused> {
    let Some(ip) = literal_ip(url) else {
        return Ok(());
    };
    guard
        .check(ip)
        .map_err(|refused| TargetRefused(refused.to_string()))
}

/// The DNS resolver of the push client: the system resolver, minus the addresses the guard
/// refuses. Connecting only to what is left is what defeats DNS rebinding, where a name that
/// resolved to a public address when the subscription was made later resolves to an internal
/// one.
struct GuardedResolver {
    guard: Arc<PushGuard>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.guard.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            // The attempt log is read by the subscriber and the Room's managers, so a refusal
            // names no address, and a name that does not resolve reads the same as one that
            // resolves only to refused addresses (see `check_push_target`): the broker's DNS
            // answers describe its own network. Operators get the detail here.
            let refuse = |reason: String| {
                tracing::warn!(
                    target: "postroom::push_guard", host, reason,
                    "push target refused at connect"
                );
                Box::new(TargetRefused(format!(
                    "{host} is not an allowed push target"
                ))) as Box<dyn std::error::Error + Send + Sync>
            };
            // reqwest's request timeout bounds the whole call, resolution included.
            let resolved = match tokio::net::lookup_host((host.as_str(), 0)).await {
                Ok(resolved) => resolved,
                Err(e) => return Err(refuse(format!("does not resolve: {e}"))),
            };
            let mut allowed = Vec::new();
            let mut first_refusal = None;
            for addr in resolved {
                match guard.check(addr.ip()) {
                    Ok(()) => allowed.push(addr),
                    Err(refused) => {
                        first_refusal.get_or_insert(refused);
                    }
                }
            }
            match (allowed.is_empty(), first_refusal) {
                (false, _) => {
                    let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
                    Ok(addrs)
                }
                (true, Some(refused)) => Err(refuse(format!("resolves to {refused}"))),
                (true, None) => Err(refuse("resolves to no address".into())),
            }
        })
    }
}

/// The guard's refusal somewhere in an error's source chain, if that is why the request failed.
fn find_refusal(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<TargetRefused>() {
            return Some(r.to_string());
        }
        if let Some(RedirectStop::Refused(r)) = c.downcast_ref::<RedirectStop>() {
            return Some(r.to_string());
        }
        cause = c.source();
    }
    None
}

impl Transport for HttpTransport {
    fn send(
        &self,
        request: PushRequest,
    ) -> Pin<Box<dyn Future<Output = PushResponse> + Send + '_>> {
        Box::pin(async move {
            let started = Instant::now();
            // An IP-literal URL never reaches the resolver, so the guard looks at it here.
            if let Ok(url) = reqwest::Url::parse(&request.url) {
                if let Err(refused) = check_literal(&self.guard, &url) {
                    return PushResponse {
                        status: None,
                        retry_after_ms: None,
                        error: Some(refused.to_string()),
                        latency_ms: 0,
                    };
                }
            }
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
                Err(mut e) => {
                    // reqwest names the URL in its errors; the attempt log must not show
                    // credentials a URL stored before they were refused may carry.
                    if let Some(u) = e.url_mut() {
                        crate::subscription::redact_userinfo(u);
                    }
                    let error = if let Some(refusal) = find_refusal(&e) {
                        refusal
                    } else {
                        let what = if e.is_timeout() {
                            "timeout"
                        } else if e.is_connect() {
                            "connect error"
                        } else if e.is_redirect() {
                            "too many redirects"
                        } else {
                            "request error"
                        };
                        format!("{what}: {e}")
                    };
                    PushResponse {
                        status: None,
                        retry_after_ms: None,
                        error: Some(error),
                        latency_ms,
                    }
                }
            }
        })
    }
}

/// Retry-After as delay-seconds or an HTTP date (IMF-fixdate `Sun, 06 Nov 1994 08:49:37 GMT`,
/// or the obsolete RFC 850 and asctime forms RFC 9110 still asks recipients to read), relative
/// to `now`; a date in the past is 0. Anything else is ignored. Dates are parsed by `httpdate`
/// (hyper's), which refuses out-of-range parts instead of overflowing; delay-seconds too large
/// for a `u64` count as the longest delay (the retry policy caps it anyway).
pub(crate) fn parse_retry_after_ms(value: &str, now: std::time::SystemTime) -> Option<u64> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(
            value
                .parse::<u64>()
                .map_or(u64::MAX, |secs| secs.saturating_mul(1000)),
        );
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let wait = at.duration_since(now).unwrap_or_default();
    Some(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX))
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

    /// Issue 15, defect 10: a hostile receiver's Retry-After could overflow the hand-written
    /// date arithmetic (a debug build panicked the push task). Huge or malformed dates are
    /// ignored, never a panic or a wrapped delay.
    #[test]
    fn retry_after_cannot_overflow() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777);
        for hostile in [
            "Sun, 06 Nov 9223372036854775807 08:49:37 GMT",
            "Sun, 9223372036854775807 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 9223372036854775807:49:37 GMT",
            "Sun, 06 Nov -9223372036854775807 08:49:37 GMT",
            "Sun, 06 Nov 1994 -1:-1:-1 GMT",
        ] {
            let got = std::panic::catch_unwind(|| parse_retry_after_ms(hostile, now));
            assert!(matches!(got, Ok(None)), "{hostile}: {got:?}");
        }
        // The obsolete HTTP date forms are understood too (RFC 9110 5.6.7).
        let later = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777 - 30);
        assert_eq!(
            parse_retry_after_ms("Sunday, 06-Nov-94 08:49:37 GMT", later),
            Some(30_000)
        );
        assert_eq!(
            parse_retry_after_ms("99999999999999999999", now),
            Some(u64::MAX)
        );
    }

    use crate::config::PushAllow;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A guard from the flags and ranges of a test.
    fn guard(loopback: bool, cidrs: &[&str]) -> Arc<PushGuard> {
        Arc::new(
            PushGuard::new(&PushAllow {
                loopback,
                cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
                ..PushAllow::default()
            })
            .expect("valid test guard"),
        )
    }

    /// A local HTTP server on `ip` that counts the requests it gets and answers `/go` with a 307
    /// to `redirect_to`, anything else with 200. Returns its port and its counter.
    async fn counting_server(ip: &str, redirect_to: Option<String>) -> (u16, Arc<AtomicUsize>) {
        use axum::response::IntoResponse;
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let counter = counter.clone();
            let redirect_to = redirect_to.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                match redirect_to {
                    Some(to) if uri.path() == "/go" => (
                        axum::http::StatusCode::TEMPORARY_REDIRECT,
                        [("location", to)],
                    )
                        .into_response(),
                    _ => axum::http::StatusCode::OK.into_response(),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .expect("bind a local test port");
        let port = listener.local_addr().expect("local addr").port();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (port, hits)
    }

    fn post(url: String) -> PushRequest {
        PushRequest {
            url,
            headers: vec![],
            basic_auth: None,
            body: b"{}".to_vec(),
        }
    }

    /// A name that resolves to a refused address is never connected to: the resolver drops the
    /// address and the attempt fails with the guard's reason.
    #[tokio::test]
    async fn connect_time_guard_refuses_a_name_resolving_to_loopback() {
        let (port, hits) = counting_server("127.0.0.1", None).await;
        let url = format!("http://localhost:{port}/hook");

        let refusing = HttpTransport::new(5000, 3, guard(false, &[])).expect("transport");
        let got = refusing.send(post(url.clone())).await;
        assert_eq!(got.status, None);
        let error = got.error.expect("an error text");
        // The attempt log is the subscriber's to read: the refusal names no address.
        assert_eq!(
            error, "push target refused: localhost is not an allowed push target",
            "{error}"
        );
        assert_eq!(hits.load(Ordering::SeqCst), 0, "the receiver saw nothing");

        // The same request goes through when loopback is allowed, so the refusal above was the
        // guard's doing and not a broken test server.
        let allowing = HttpTransport::new(5000, 3, guard(true, &[])).expect("transport");
        let got = allowing.send(post(url)).await;
        assert_eq!(got.status, Some(200), "{:?}", got.error);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    /// IP-literal URLs skip the resolver, so the transport checks them itself, mapped forms
    /// included.
    #[tokio::test]
    async fn connect_time_guard_refuses_ip_literals() {
        let (port, hits) = counting_server("127.0.0.1", None).await;
        let refusing = HttpTransport::new(5000, 3, guard(false, &[])).expect("transport");
        for (url, says) in [
            (format!("http://127.0.0.1:{port}/hook"), "127.0.0.1"),
            (
                format!("http://[::ffff:127.0.0.1]:{port}/hook"),
                "::ffff:127.0.0.1",
            ),
            // The URL parser reads a bare number as an IPv4 address.
            (format!("http://2130706433:{port}/hook"), "127.0.0.1"),
        ] {
            let got = refusing.send(post(url.clone())).await;
            assert_eq!(
                got.error,
                Some(format!("push target refused: {says} is a loopback address")),
                "{url}"
            );
        }
        assert_eq!(hits.load(Ordering::SeqCst), 0, "the receiver saw nothing");
    }

    /// A redirect from an allowed target to a refused IP literal is not followed.
    #[tokio::test]
    async fn redirects_to_refused_addresses_are_not_followed() {
        let (landing_port, landed) = counting_server("127.0.0.2", None).await;
        let landing = format!("http://127.0.0.2:{landing_port}/landing");
        let (port, hits) = counting_server("127.0.0.1", Some(landing)).await;
        let url = format!("http://127.0.0.1:{port}/go");

        let only_first =
            HttpTransport::new(5000, 3, guard(false, &["127.0.0.1/32"])).expect("transport");
        let got = only_first.send(post(url.clone())).await;
        assert_eq!(
            got.error.as_deref(),
            Some("push target refused: 127.0.0.2 is a loopback address")
        );
        assert_eq!(hits.load(Ordering::SeqCst), 1, "the first target was asked");
        assert_eq!(
            landed.load(Ordering::SeqCst),
            0,
            "the redirect was not followed"
        );

        let both = HttpTransport::new(5000, 3, guard(false, &["127.0.0.1/32", "127.0.0.2/32"]))
            .expect("transport");
        let got = both.send(post(url)).await;
        assert_eq!(got.status, Some(200), "{:?}", got.error);
        assert_eq!(landed.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn redirect_verdicts() {
        let g = guard(false, &[]);
        let url = |s: &str| reqwest::Url::parse(s).expect("test URL");
        assert!(redirect_verdict(&g, &url("https://example.org/x"), 1, 3).is_ok());
        assert!(redirect_verdict(&g, &url("https://8.8.8.8/x"), 3, 3).is_ok());
        assert!(matches!(
            redirect_verdict(&g, &url("https://example.org/x"), 4, 3),
            Err(RedirectStop::TooMany)
        ));
        let Err(RedirectStop::Refused(r)) =
            redirect_verdict(&g, &url("http://[::ffff:169.254.169.254]/latest"), 1, 3)
        else {
            panic!("metadata behind a mapped address must be refused");
        };
        assert_eq!(
            r.to_string(),
            "push target refused: ::ffff:169.254.169.254 is a cloud metadata address"
        );
    }
}
