//! Attacks on secrets the broker keeps for others: a Room manager reading a subscriber's push
//! credentials (item 10).

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::harness::{config, World};

/// The Ministry of Justice's API key for its webhook.
const API_KEY: &str = "moj-webhook-key-5b7e0c1d";
/// Its Basic password.
const PASSWORD: &str = "moj-basic-password-93a1";
/// A password written into a URL.
const URL_PASSWORD: &str = "hunter2-in-the-url";

/// Issue 14, item 10. A Ministry of Justice subscriber creates a push subscription on Home
/// Office Room `transfers` with an `X-Api-Key` header and Basic credentials. Mallory, the Home
/// Office manager of the Room, lists the Room's subscriptions and reads this one, looking for
/// the key: she sees the header's name with its value redacted, and no password. Neither does
/// the subscriber (the values are write-only). A push URL carrying credentials
/// (`http://user:pass@host/`) is refused on creation, on change and through the GovStack route,
/// pointing at `basic_auth`, without echoing the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_manager_cannot_read_a_subscribers_push_secrets() {
    let mut c = config();
    c.broker.delivery.push_allow.loopback = true;
    let w = World::start_with(c).await;
    w.room("transfers").await;
    let mallory = w.home_office("manager").await;
    let moj = w.justice("subscriber").await;
    w.grant(&mallory, "room_manager", "transfers", None).await;
    w.grant(&moj, "subscriber", "transfers", None).await;

    let created = w
        .post(
            "/v1/rooms/transfers/subscriptions",
            &moj.token,
            json!({"mode": "push", "push": {
                "url": "http://127.0.0.1:9/hooks/postroom",
                "headers": {"X-Api-Key": API_KEY},
                "basic_auth": {"username": "postroom", "password": PASSWORD}
            }}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["subscription"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let sub = &created.body["subscription"];
    assert_eq!(
        sub["mode"]["headers"],
        json!([["X-Api-Key", "***"]]),
        "{sub}"
    );
    assert_eq!(sub["mode"]["basic_auth"], json!({"username": "postroom"}));

    // What the manager and the subscriber read.
    let listed = w
        .get("/v1/rooms/transfers/subscriptions", &mallory.token)
        .await;
    let read = w
        .get(&format!("/v1/subscriptions/{id}"), &mallory.token)
        .await;
    let own = w.get(&format!("/v1/subscriptions/{id}"), &moj.token).await;
    for (who, a) in [
        ("manager lists", &listed),
        ("manager reads", &read),
        ("subscriber reads", &own),
    ] {
        assert_eq!(a.status, StatusCode::OK, "{who}: {}", a.body);
        let text = a.body.to_string();
        assert!(!text.contains(API_KEY), "{who} sees the API key: {text}");
        assert!(!text.contains(PASSWORD), "{who} sees the password: {text}");
        assert!(
            text.contains("X-Api-Key"),
            "{who} sees the header's name: {text}"
        );
    }
    assert_eq!(read.body["mode"]["headers"], json!([["X-Api-Key", "***"]]));

    // Credentials in the URL are refused, wherever a URL is set.
    let in_url = format!("http://postroom:{URL_PASSWORD}@127.0.0.1:9/hooks/postroom");
    let refused = w
        .post(
            "/v1/rooms/transfers/subscriptions",
            &moj.token,
            json!({"mode": "push", "push": {"url": in_url}}),
        )
        .await;
    let changed = w
        .call(
            Method::PATCH,
            &format!("/v1/subscriptions/{id}"),
            Some(&moj.token),
            Some(json!({"push": {"url": in_url}})),
        )
        .await;
    w.event_type("transfers", "u").await;
    let gov = w
        .gov(
            Method::POST,
            &moj,
            "transfers",
            "api/v1/subs/u",
            Some(json!({"delivery": "PUSH", "pushUrl": in_url})),
        )
        .await;
    for (how, a, status) in [
        ("create", &refused, StatusCode::UNPROCESSABLE_ENTITY),
        ("change", &changed, StatusCode::UNPROCESSABLE_ENTITY),
        ("GovStack", &gov, StatusCode::BAD_REQUEST),
    ] {
        assert_eq!(a.status, status, "{how}: {}", a.body);
        assert_eq!(a.body["code"], "invalid_input", "{how}: {}", a.body);
        assert_eq!(a.body["field"], "push.url", "{how}: {}", a.body);
        let detail = a.body["detail"].as_str().unwrap_or("");
        assert!(detail.contains("basic_auth"), "{how}: {detail}");
        assert!(!detail.contains(URL_PASSWORD), "{how}: {detail}");
    }
    // The subscription kept its endpoint.
    let after = w.get(&format!("/v1/subscriptions/{id}"), &moj.token).await;
    assert_eq!(
        after.body["mode"]["url"],
        "http://127.0.0.1:9/hooks/postroom"
    );
}
