//! Attacks on the token endpoint's cost: guessing a client's secret as fast as the server
//! answers, cycling client ids from one address to get around a per-client limit, and a flood
//! of parallel attempts that makes the server run one Argon2 check (19 MiB each) per request.

use std::net::SocketAddr;

use axum::http::StatusCode;
use serde_json::Value;

use crate::harness::{Answer, World};

/// The form of a client credentials request.
const GRANT: &str = "grant_type=client_credentials";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The `Retry-After` of an answer, in seconds (panics when it is missing or not a number).
fn retry_after(a: &Answer) -> u64 {
    a.headers
        .get("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After on {} {}", a.status, a.body))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// The audit entries whose action starts with `auth.`: the token endpoint's brakes.
async fn brake_audit(w: &World) -> Vec<Value> {
    let a = w.get("/v1/admin/audit?action=auth.", &w.admin).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    a.body["items"].as_array().unwrap().clone()
}

/// Issue 14, item 5. Mallory guesses the Ministry of Justice client `alice`'s secret from one
/// address, 300 guesses as fast as the server answers. Only the first 10 (the default limit of
/// failures per client id and address per minute) reach the secret check; every later attempt
/// from her address for `alice` is refused with 429 and `Retry-After` before any Argon2 work,
/// the right secret included (the server cannot tell it is right without checking it). Alice,
/// from her own address, and Bob, a Home Office client elsewhere, still get tokens: Mallory
/// cannot lock `alice` out by failing on purpose. The audit log has one entry for the trip,
/// not one per refusal, and the trip is counted in `/metrics`. Once the clock has moved past
/// `Retry-After`, an attempt from Mallory's address is checked again.
#[tokio::test]
async fn guessing_a_secret_is_refused_before_the_check() {
    let w = World::start().await;
    let alice = w.justice("alice").await;
    let bob = w.home_office("bob").await;
    let mallory = addr("203.0.113.7:50000");

    let mut answers = Vec::new();
    for i in 0..300 {
        let guess = format!("guess-{i}");
        answers.push(w.token_form(GRANT, Some(("alice", &guess)), mallory).await);
    }
    let checked = answers
        .iter()
        .filter(|a| a.status == StatusCode::UNAUTHORIZED)
        .count();
    assert_eq!(
        checked, 10,
        "only 10 guesses may reach the secret check; {checked} were answered 401"
    );
    assert!(answers[..10]
        .iter()
        .all(|a| a.status == StatusCode::UNAUTHORIZED));
    for a in &answers[10..] {
        assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
        assert_eq!(a.body["code"], "too_many_failures", "{}", a.body);
        assert!((1..=60).contains(&retry_after(a)), "{:?}", a.headers);
    }

    // The right secret from Mallory's address is refused too, unchecked.
    let right = w
        .token_form(GRANT, Some(("alice", &alice.secret)), mallory)
        .await;
    assert_eq!(
        right.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        right.body
    );
    let wait = retry_after(&right);

    // Alice from her own address, and Bob from his, are not locked out.
    let own = w
        .token_form(
            GRANT,
            Some(("alice", &alice.secret)),
            addr("198.51.100.20:443"),
        )
        .await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.body);
    let other = w
        .token_form(GRANT, Some(("bob", &bob.secret)), addr("192.0.2.44:1234"))
        .await;
    assert_eq!(other.status, StatusCode::OK, "{}", other.body);

    // One audit entry for the trip, naming the client and the address.
    let entries = brake_audit(&w).await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    let target = entries[0]["target"].as_str().unwrap();
    assert!(
        target.contains("alice") && target.contains("203.0.113.7"),
        "{target}"
    );
    let text = metrics_text(&w).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("postroom_auth_limit_trips_total{limit=\"client_address\"}")),
        "{text}"
    );

    // After Retry-After, the address may try again.
    w.clock.advance_ms(wait * 1000);
    let again = w
        .token_form(GRANT, Some(("alice", &alice.secret)), mallory)
        .await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
}

/// `GET /metrics` as text.
async fn metrics_text(w: &World) -> String {
    let req = axum::http::Request::builder()
        .uri("/metrics")
        .body(axum::body::Body::empty())
        .unwrap();
    let resp = tower::ServiceExt::oneshot(w.app.clone(), req)
        .await
        .unwrap();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Issue 14, item 5. Mallory gets around the limit per client id by naming a different client
/// id on every attempt, all from one address. After 30 failures (the default limit per address
/// per minute) her address is refused with 429 whatever client it names, before any secret is
/// checked; the audit log has one entry for the address; Alice from elsewhere still gets a
/// token.
#[tokio::test]
async fn cycling_client_ids_from_one_address_is_refused() {
    let w = World::start().await;
    let alice = w.justice("alice").await;
    let mallory = addr("203.0.113.9:40000");

    let mut statuses = Vec::new();
    for i in 0..40 {
        let a = w
            .token_form(GRANT, Some((&format!("nobody-{i}"), "guess")), mallory)
            .await;
        statuses.push(a.status);
        if a.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(a.body["code"], "too_many_failures", "{}", a.body);
            assert!(retry_after(&a) >= 1);
        }
    }
    let checked = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    assert_eq!(checked, 30, "{statuses:?}");
    assert!(statuses[30..]
        .iter()
        .all(|s| *s == StatusCode::TOO_MANY_REQUESTS));

    let entries = brake_audit(&w).await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(
        entries[0]["target"]
            .as_str()
            .unwrap()
            .contains("203.0.113.9"),
        "{entries:?}"
    );

    let own = w
        .token_form(
            GRANT,
            Some(("alice", &alice.secret)),
            addr("198.51.100.20:443"),
        )
        .await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.body);
}

/// Issue 14, item 5. Mallory sends eight token requests at once (with a valid secret, from
/// eight addresses, so that no failure limit is involved) to a server allowed one secret check
/// at a time and no wait for it: one is checked and answered 200; the other seven are refused
/// at once with 503, `Retry-After` and the problem code `authentication_busy` instead of each
/// starting an Argon2 check of its own. Afterwards the slot is free again.
#[tokio::test]
async fn parallel_secret_checks_beyond_the_bound_are_refused() {
    let mut config = crate::harness::config();
    config.broker.limits.secret_checks_max = 1;
    config.broker.limits.secret_check_wait_ms = 0;
    let w = World::start_with(config).await;
    let alice = w.justice("alice").await;
    let ask = |i: u8| {
        w.token_form(
            GRANT,
            Some(("alice", &alice.secret)),
            SocketAddr::from(([192, 0, 2, i], 1000)),
        )
    };
    // All eight run on this task: the first one polled takes the only slot and holds it until
    // its check is polled again, which `join!` does only after every other has been polled once.
    let (a1, a2, a3, a4, a5, a6, a7, a8) = tokio::join!(
        ask(1),
        ask(2),
        ask(3),
        ask(4),
        ask(5),
        ask(6),
        ask(7),
        ask(8)
    );
    let all = [a1, a2, a3, a4, a5, a6, a7, a8];
    let ok = all.iter().filter(|a| a.status == StatusCode::OK).count();
    let busy: Vec<&Answer> = all
        .iter()
        .filter(|a| a.status == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    assert_eq!(
        (ok, busy.len()),
        (1, 7),
        "{:?}",
        all.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    for a in busy {
        assert_eq!(a.body["code"], "authentication_busy", "{}", a.body);
        assert!(retry_after(a) >= 1);
    }
    let later = ask(9).await;
    assert_eq!(later.status, StatusCode::OK, "{}", later.body);
}

/// Issue 14, item 5, over a real socket. The address limits count the TCP peer's address, as
/// `postroom serve` passes it to the handlers: with one failure allowed per address (and no
/// limit per client id), Mallory's second attempt from 127.0.0.1, naming another client id, is
/// refused with 429 before its secret is checked. A forged `X-Forwarded-For` does not move her
/// to another address.
#[tokio::test]
async fn the_address_is_the_connections() {
    let mut config = crate::harness::config();
    config.auth.failures_per_client_address_per_minute = 0;
    config.auth.failures_per_address_per_minute = 1;
    let served = crate::common::Served::start(config).await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/oauth/token", served.addr);
    let attempt = |id: &'static str| {
        http.post(&url)
            .basic_auth(id, Some("guess"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-forwarded-for", format!("198.51.100.{}", id.len()))
            .body(GRANT)
            .send()
    };
    let first = attempt("nobody").await.unwrap();
    assert_eq!(first.status(), reqwest::StatusCode::UNAUTHORIZED);
    let second = attempt("somebody-else").await.unwrap();
    assert_eq!(
        second.status(),
        reqwest::StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        second.text().await
    );
    served.stop().await;
}

/// Found in review of issue 14, item 5. A member application with a valid secret asks for
/// tokens in a loop. Each request holds one of the few secret-check slots for an Argon2 check,
/// so before the fix one client could keep every other client's authentication waiting or
/// refused. Now a client gets at most `auth.tokens_per_client_per_minute` tokens, and the
/// rest are refused (429 `too_many_tokens`) before its secret is checked; other clients are
/// not affected.
#[tokio::test]
async fn a_client_looping_on_the_token_endpoint_is_slowed_down() {
    let mut config = crate::harness::config();
    config.auth.tokens_per_client_per_minute = 5;
    let w = World::start_with(config).await;
    let greedy = w.home_office("greedy").await; // its first token
    let other = w.justice("other").await;
    let peer: std::net::SocketAddr = "198.51.100.7:5000".parse().unwrap();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let a = w
            .token_form(
                "grant_type=client_credentials",
                Some((&greedy.client_id, &greedy.secret)),
                peer,
            )
            .await;
        if a.status == axum::http::StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(a.body["code"], "too_many_tokens", "{}", a.body);
            assert!(a.headers.contains_key("retry-after"));
        }
        statuses.push(a.status.as_u16());
    }
    let granted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(granted, 4, "{statuses:?}"); // 5 a minute, one already taken
    assert!(statuses[4..].iter().all(|s| *s == 429), "{statuses:?}");
    // Another client is served, and the greedy one again a minute later.
    w.token(&other.client_id, &other.secret).await;
    w.clock.advance_ms(60_000);
    w.token(&greedy.client_id, &greedy.secret).await;
}
