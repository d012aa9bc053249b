//! Attacks: transport (filled in by its item's fix).

/// Issue 14, item 13: the push target guard's answers tell no DNS answers.
mod dns_answers {
    use axum::http::StatusCode;
    use serde_json::json;

    use crate::harness::World;

    /// Dotted IPv4 addresses in `text` (four dot-separated runs of digits).
    fn ipv4_in(text: &str) -> Vec<String> {
        text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|w| {
                let parts: Vec<&str> = w.split('.').collect();
                parts.len() == 4 && parts.iter().all(|p| !p.is_empty() && p.len() <= 3)
            })
            .map(String::from)
            .collect()
    }

    /// Issue 14, item 13. Mallory, a subscriber, maps the broker's internal network by
    /// subscribing with push URLs whose names resolve to internal addresses and reading the
    /// refusals ("`x` resolves to 10.1.2.3, a private address"). `localhost` resolves to a
    /// loopback address, refused by default: the refusal says the target is not allowed and
    /// names no address, and a name that does not resolve at all gets the same words.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_push_target_reveals_no_dns_answer() {
        let w = World::start().await;
        w.room("transfers").await;
        let mallory = w.justice("mallory").await;
        w.grant(&mallory, "subscriber", "transfers", None).await;

        let subscribe = |host: &str| {
            let body = json!({"mode": "push", "push": {"url": format!("http://{host}:9/hook")}});
            w.post("/v1/rooms/transfers/subscriptions", &mallory.token, body)
        };
        let local = subscribe("localhost").await;
        assert_eq!(
            local.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{}",
            local.body
        );
        assert_eq!(local.body["code"], "invalid_input");
        let detail = local.body["detail"].as_str().unwrap_or("").to_string();
        assert!(ipv4_in(&detail).is_empty(), "addresses in: {detail}");
        assert!(!detail.contains("::1"), "addresses in: {detail}");
        assert!(
            !detail.contains("loopback"),
            "the address class in: {detail}"
        );
        assert!(detail.contains("not an allowed push target"), "{detail}");

        // A name that does not resolve is answered in the same words.
        let nowhere = subscribe("nowhere.invalid").await;
        assert_eq!(nowhere.status, local.status, "{}", nowhere.body);
        assert_eq!(
            nowhere.body["detail"]
                .as_str()
                .unwrap_or("")
                .replace("nowhere.invalid", "HOST"),
            detail.replace("localhost", "HOST")
        );
    }
}
