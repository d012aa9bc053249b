//! Attacks on the audit log: filling the disk with it, anonymously or with long paths, and a
//! log that is never trimmed.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::json;

use crate::harness::World;

/// How many entries the audit log holds, read by the administrator page by page.
async fn audit_entries(w: &World) -> Vec<serde_json::Value> {
    audit_entries_as(w, &w.admin).await
}

/// [`audit_entries`] with the administrator's token `admin`.
async fn audit_entries_as(w: &World, admin: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/admin/audit?limit=1000&cursor={c}"),
            None => "/v1/admin/audit?limit=1000".to_string(),
        };
        let page = w.get(&path, admin).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        out.extend(page.body["items"].as_array().unwrap().iter().cloned());
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

/// Issue 14, item 3. An anonymous caller sends 300 `DELETE /v1/x<12 KB>` requests. Before the
/// fix each was written durably to the audit log with its 12 KB path (1,000 of them grew the
/// database by 53 MB). Now none is stored: they are counted in a metric instead.
#[tokio::test]
async fn anonymous_refusals_are_counted_not_stored() {
    let w = World::start().await;
    let before = audit_entries(&w).await.len();
    let long = "x".repeat(12 * 1024);
    for _ in 0..300 {
        let req = Request::builder()
            .method(Method::DELETE)
            .uri(format!("/v1/{long}"))
            .body(Body::empty())
            .unwrap();
        let a = w.raw(req).await;
        assert!(
            a.status == StatusCode::UNAUTHORIZED || a.status == StatusCode::NOT_FOUND,
            "{}",
            a.status
        );
        let req = Request::builder()
            .method(Method::POST)
            .uri("/v1/rooms")
            .header("authorization", "Bearer forged")
            .header("content-type", "application/json")
            .body(Body::from(json!({"name": long}).to_string()))
            .unwrap();
        assert_eq!(w.raw(req).await.status, StatusCode::UNAUTHORIZED);
    }
    let after = audit_entries(&w).await;
    assert_eq!(
        after.len(),
        before,
        "anonymous refusals reached the audit log: {:?}",
        after.last()
    );
    let metrics = w.call(Method::GET, "/metrics", None, None).await;
    let text = String::from_utf8_lossy(&metrics.raw_body).to_string();
    let counted: f64 = text
        .lines()
        .find(|l| l.starts_with("postroom_unauthenticated_refusals_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no refusal counter in /metrics"));
    assert!(counted >= 600.0, "{counted}");
}

/// Issue 14, item 3. An authenticated member sends administrative requests with 12 KB paths.
/// Each is audited (it is an attempt by a known caller), but the entry stays a few hundred
/// bytes: its action and target are cut.
#[tokio::test]
async fn an_audited_path_is_bounded() {
    let w = World::start().await;
    let mallory = w.home_office("mallory").await;
    let long = "y".repeat(12 * 1024);
    let a = w
        .delete(
            &format!("/v1/rooms/{long}/event-types/{long}"),
            &mallory.token,
        )
        .await;
    assert!(a.status.is_client_error(), "{}", a.status);
    let entries = audit_entries(&w).await;
    let last = entries.last().unwrap();
    assert_eq!(last["actor"], mallory.principal.as_str(), "{last}");
    let size = last.to_string().len();
    assert!(size < 1024, "an audit entry of {size} bytes: {last}");
    assert!(last["target"]
        .as_str()
        .unwrap()
        .starts_with("/v1/rooms/yyy"));
}

/// Issue 14, item 3. The audit log was never trimmed. Now the retention sweep keeps at most
/// `audit_entries_max` entries and none older than `audit_retention_ms`, always keeping the
/// newest (so sequence numbers never repeat).
#[tokio::test]
async fn the_audit_log_has_retention() {
    let mut config = crate::harness::config();
    config.broker.retention.audit_entries_max = 10;
    config.broker.retention.audit_retention_ms = 24 * 3_600_000;
    config.broker.retention.interval_ms = 0;
    let w = World::start_with(config).await;
    for i in 0..30 {
        let a = w
            .post(
                "/v1/admin/members",
                &w.admin,
                json!({"id": format!("UK/GOV/M{i}")}),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    }
    let before = audit_entries(&w).await;
    assert!(before.len() >= 30, "{}", before.len());
    let newest = before.last().unwrap()["seq"].as_u64().unwrap();

    let swept = w.broker.sweep_retention().await.unwrap();
    assert_eq!(swept.audit_entries_removed as usize, before.len() - 10);
    let kept = audit_entries(&w).await;
    assert_eq!(kept.len(), 10);
    assert_eq!(kept.last().unwrap()["seq"].as_u64().unwrap(), newest);

    // A day and a bit later everything but the newest entry has aged out.
    w.clock.advance_ms(25 * 3_600_000);
    w.broker.sweep_retention().await.unwrap();
    let admin = w.token("admin", crate::harness::ADMIN_SECRET).await;
    let kept = audit_entries_as(&w, &admin).await;
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0]["seq"].as_u64().unwrap(), newest);

    // The next entry continues the numbering.
    let a = w
        .post("/v1/admin/members", &admin, json!({"id": "UK/GOV/NEXT"}))
        .await;
    assert_eq!(a.status, StatusCode::CREATED);
    let kept = audit_entries_as(&w, &admin).await;
    assert!(kept.last().unwrap()["seq"].as_u64().unwrap() > newest);
}
