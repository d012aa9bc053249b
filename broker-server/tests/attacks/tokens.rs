//! Attacks on tokens: a token forged with the signing key read from the data folder (issue 14,
//! item 4), signing-key rotation as the answer to such a theft (item 4), tokens that outlive the
//! secret or the client that minted them (item 9), and an external issuer naming Postroom's own
//! administrator (item 12).

use std::sync::Arc;

use axum::http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::harness::{config, jwt_parts, World, ADMIN_SECRET};

/// Ten years, in seconds: the lifetime of the attacker's forged administrator token.
const TEN_YEARS: u64 = 10 * 365 * 24 * 3600;

/// What an attacker who has read `postroom.redb` knows: the token signing key (and its key id),
/// and the bootstrap administrator client's record (its secret ids and incarnation).
struct Stolen {
    kid: Option<String>,
    key: Vec<u8>,
    secret_id: Value,
    incarnation: Value,
}

/// Reads what the attacker reads from the database file.
async fn steal(w: &World) -> Stolen {
    let ring = w
        .broker
        .signing_keys(broker_server::auth::TOKEN_KEY)
        .await
        .unwrap();
    let signer = ring.signer();
    let client = serde_json::to_value(w.broker.client("admin").unwrap()).unwrap();
    Stolen {
        kid: Some(signer.kid().to_string()),
        key: signer.secret().to_vec(),
        secret_id: client["secrets"][0]["id"].clone(),
        incarnation: client["incarnation"].clone(),
    }
}

/// An administrator token signed with the stolen key, issued at `iat` and expiring at `exp`.
fn forge(stolen: &Stolen, iat: u64, exp: u64) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = stolen.kid.clone();
    let claims = json!({
        "iss": "postroom",
        "aud": "postroom",
        "sub": "admin",
        "app": "local/ADMIN/postroom/admin",
        "iat": iat,
        "exp": exp,
        "jti": "forged",
        "secret": stolen.secret_id,
        "incarnation": stolen.incarnation,
    });
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&stolen.key)).unwrap()
}

/// The `kid` a token names in its header.
fn kid_of(token: &str) -> Option<String> {
    jwt_parts(token).0["kid"].as_str().map(String::from)
}

/// Issue 14, item 4. The attacker has read `postroom.redb` (it was 0644 in a 0755 folder) and
/// with it the token signing key, and signs an administrator token that lasts ten years. No
/// token of ours lives longer than `auth.token_ttl_secs`, so it is refused.
#[tokio::test]
async fn a_forged_administrator_token_valid_for_ten_years_is_refused() {
    let w = World::start().await;
    let stolen = steal(&w).await;
    let now = w.now_secs();

    // The same forgery with an ordinary lifetime shows the key and claims are right: the ten-year
    // token is refused for its lifetime alone.
    let hour = forge(&stolen, now, now + 3600);
    let a = w.get("/v1/admin/members", &hour).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);

    let decade = forge(&stolen, now, now + TEN_YEARS);
    let a = w.get("/v1/admin/members", &decade).await;
    assert_eq!(
        a.status,
        StatusCode::UNAUTHORIZED,
        "a ten-year token was accepted: {}",
        a.body
    );
    assert_eq!(a.body["code"], "token_lifetime_exceeded", "{}", a.body);
}

/// Issue 14, item 4. The attacker keeps within the lifetime cap by dating the token nine years
/// ahead: issued in 2035, expiring an hour later, and usable until then. A token issued in the
/// future (beyond a small clock allowance) is refused.
#[tokio::test]
async fn a_forged_token_issued_in_the_future_is_refused() {
    let w = World::start().await;
    let stolen = steal(&w).await;
    let later = w.now_secs() + 9 * 365 * 24 * 3600;
    let a = w
        .get("/v1/admin/members", &forge(&stolen, later, later + 3600))
        .await;
    assert_eq!(
        a.status,
        StatusCode::UNAUTHORIZED,
        "a token issued in nine years was accepted: {}",
        a.body
    );
    assert_eq!(a.body["code"], "token_issued_in_future", "{}", a.body);
}

/// Issue 14, item 4. The operator finds out that the data folder was readable and rotates the
/// signing key. Tokens clients already hold keep working until they expire; new tokens name the
/// new key; the attacker cannot use the old key for a token issued after the rotation; and once
/// the longest token the old key could have signed has expired, the old key is dropped.
#[tokio::test]
async fn rotating_the_signing_key_keeps_live_tokens_and_then_drops_the_old_key() {
    let w = World::start().await;
    let ho = w.home_office("visa").await;
    let before = ho.token.clone();
    let old_kid = kid_of(&before).expect("our tokens name their key");
    let stolen = steal(&w).await;
    w.clock.advance_ms(600_000);

    let r = w
        .post("/v1/admin/signing-keys/rotate", &w.admin, json!({}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let new_kid = r.body["signing_kid"].as_str().unwrap().to_string();
    assert_ne!(new_kid, old_kid);

    // A token from before the rotation still works, and so does the administrator's.
    assert_eq!(w.get("/v1/rooms", &before).await.status, StatusCode::OK);
    assert_eq!(
        w.get("/v1/admin/members", &w.admin).await.status,
        StatusCode::OK
    );
    // A new token names the new key.
    let after = w.token("visa", &ho.secret).await;
    assert_eq!(kid_of(&after).as_deref(), Some(new_kid.as_str()));
    assert_eq!(w.get("/v1/rooms", &after).await.status, StatusCode::OK);
    // The old key signs nothing new: a token it signs dated after the rotation is refused
    // (a second later: `iat` counts whole seconds, and the rotation's own second may hold
    // tokens the old key signed before it).
    w.clock.advance_ms(1000);
    let now = w.now_secs();
    let forged = forge(&stolen, now, now + 3600);
    let a = w.get("/v1/admin/members", &forged).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.body);

    // The rotation is in the audit log, with who did it.
    let log = w
        .get(
            "/v1/admin/audit?action=POST%20/v1/admin/signing-keys",
            &w.admin,
        )
        .await;
    let items = log.body["items"].as_array().unwrap();
    assert!(
        items
            .iter()
            .any(|e| e["action"] == "POST /v1/admin/signing-keys/rotate"
                && e["actor"] == "local/ADMIN/postroom/admin"
                && e["outcome"] == "success"),
        "{}",
        log.body
    );

    // During the grace the old key is listed as retired...
    let keys = w.get("/v1/admin/signing-keys", &w.admin).await;
    assert_eq!(keys.status, StatusCode::OK, "{}", keys.body);
    let kids = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(kids(&keys.body), vec![new_kid.clone(), old_kid.clone()]);

    // ...and once the longest token it could have signed (token_ttl_secs) has expired, the token
    // from before is refused and the old key is gone.
    w.clock.advance_ms(3600 * 1000 + 1000);
    let a = w.get("/v1/rooms", &before).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.body);
    let admin = w.token("admin", ADMIN_SECRET).await;
    let keys = w.get("/v1/admin/signing-keys", &admin).await;
    assert_eq!(kids(&keys.body), vec![new_kid.clone()]);
}

/// Issue 14, item 4. After a theft the operator does not wait for the grace: the rotation drops
/// the old key at once. Every token it signed, the attacker's and the ones the server had
/// already verified and remembers, is refused from the next request; clients fetch new ones.
#[tokio::test]
async fn a_rotation_that_drops_the_old_key_stops_its_tokens_at_once() {
    let w = World::start().await;
    let ho = w.home_office("visa").await;
    let stolen = steal(&w).await;
    let now = w.now_secs();
    let forged = forge(&stolen, now, now + 3600);
    // Both verified once, so the server remembers them.
    assert_eq!(w.get("/v1/rooms", &ho.token).await.status, StatusCode::OK);
    assert_eq!(
        w.get("/v1/admin/members", &forged).await.status,
        StatusCode::OK
    );

    let r = w
        .post(
            "/v1/admin/signing-keys/rotate",
            &w.admin,
            json!({"drop_previous": true}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    for token in [&ho.token, &forged, &w.admin] {
        let a = w.get("/v1/rooms", token).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.body);
    }
    let fresh = w.token("visa", &ho.secret).await;
    assert_eq!(w.get("/v1/rooms", &fresh).await.status, StatusCode::OK);
}

/// Issue 14, item 9. The Home Office rotates its client's secret because the first one leaked:
/// it adds secret 2 and revokes secret 1. The attacker who got a token with secret 1 keeps
/// using it; the token dies with its secret.
#[tokio::test]
async fn a_token_dies_with_the_secret_that_minted_it() {
    let w = World::start().await;
    let ho = w.home_office("visa").await;
    let leaked = ho.token.clone();
    assert_eq!(w.get("/v1/rooms", &leaked).await.status, StatusCode::OK);

    let added = w
        .post("/v1/admin/clients/visa/secrets", &w.admin, json!({}))
        .await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.body);
    let second = added.body["client_secret"].as_str().unwrap().to_string();
    let with_second = w.token("visa", &second).await;
    let revoked = w.delete("/v1/admin/clients/visa/secrets/1", &w.admin).await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.body);

    let a = w.get("/v1/rooms", &leaked).await;
    assert_eq!(
        a.status,
        StatusCode::UNAUTHORIZED,
        "a token of a revoked secret was accepted: {}",
        a.body
    );
    assert_eq!(a.body["code"], "token_secret_revoked", "{}", a.body);
    assert_eq!(
        w.get("/v1/rooms", &with_second).await.status,
        StatusCode::OK,
        "the new secret's token works"
    );
}

/// Issue 14, item 9. The administrator deletes the compromised client `visa`; later a client
/// with the same id is created again (for the same application, with a new secret). The token
/// the attacker kept from the first client must not come back to life.
#[tokio::test]
async fn a_deleted_client_s_token_stays_dead_when_its_id_is_used_again() {
    let w = World::start().await;
    let ho = w.home_office("visa").await;
    let kept = ho.token.clone();
    let d = w.delete("/v1/admin/clients/visa", &w.admin).await;
    assert_eq!(d.status, StatusCode::NO_CONTENT, "{}", d.body);
    assert_eq!(
        w.get("/v1/rooms", &kept).await.status,
        StatusCode::UNAUTHORIZED
    );

    let again = w
        .post(
            "/v1/admin/clients",
            &w.admin,
            json!({"application": ho.principal, "client_id": "visa"}),
        )
        .await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
    let a = w.get("/v1/rooms", &kept).await;
    assert_eq!(
        a.status,
        StatusCode::UNAUTHORIZED,
        "the deleted client's token works again: {}",
        a.body
    );
    assert_eq!(a.body["code"], "token_client_replaced", "{}", a.body);
    let secret = again.body["client_secret"].as_str().unwrap();
    let fresh = w.token("visa", secret).await;
    assert_eq!(w.get("/v1/rooms", &fresh).await.status, StatusCode::OK);
}

/// Issue 14, item 12. A member organisation runs the identity provider the broker trusts for
/// its applications. Its administrator gives a service account the application claim
/// `local/ADMIN/postroom/admin`, the identity of Postroom's own administrator, and calls the
/// administrators' API with the token. The `local/` identities belong to Postroom's own
/// clients: the token is refused.
#[tokio::test]
async fn an_external_token_cannot_name_postroom_s_own_administrator() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = key.public_key_raw();
    let b64 = |b: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    };
    let jwks = json!({"keys": [{
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": "idp-1",
        "x": b64(&point[1..33]), "y": b64(&point[33..]),
    }]});
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks.to_string()).unwrap();
    let issuer = broker_server::config::ExternalIssuer {
        issuer: "https://id.example/realms/ho".into(),
        audience: "postroom".into(),
        jwks_file: Some(file),
        jwks_url: None,
        application_claim: "postroom_application".into(),
    };
    let mut cfg = config();
    cfg.auth.external = Some(issuer.clone());
    let verifier = broker_server::auth_external::ExternalVerifier::load(&issuer)
        .await
        .unwrap();
    let w = World::start_with_external(cfg, Arc::new(verifier)).await;
    let ho = w.home_office("visa").await;

    let now = w.now_secs();
    let sign = |application: &str| {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("idp-1".into());
        let claims = json!({
            "iss": issuer.issuer, "aud": "postroom", "sub": "service-account",
            "iat": now, "exp": now + 300, "postroom_application": application,
        });
        jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_ec_der(&key.serialize_der()),
        )
        .unwrap()
    };

    // The issuer's tokens work for the applications it may name.
    let own = w.get("/v1/rooms", &sign(&ho.principal)).await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.body);

    for claimed in ["local/ADMIN/postroom/admin", "LOCAL/ADMIN/postroom/admin"] {
        let a = w.get("/v1/admin/members", &sign(claimed)).await;
        assert_eq!(
            a.status,
            StatusCode::UNAUTHORIZED,
            "an external token named `{claimed}`: {}",
            a.body
        );
        assert_eq!(a.body["code"], "reserved_identity", "{}", a.body);
    }
}
