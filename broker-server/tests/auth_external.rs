//! Tokens from an external OpenID Connect issuer, checked by `ExternalVerifier` against a JSON
//! Web Key Set made in the test from freshly generated RSA and EC keys. Guards against accepting
//! a token that is not the issuer's, not for this broker, out of date or not naming a valid
//! application, and against missing a key the issuer has just published.
#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use broker_server::auth_external::ExternalVerifier;
use broker_server::config::ExternalIssuer;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::{json, Value};

const ISSUER: &str = "https://id.example/realms/postroom";
const AUDIENCE: &str = "postroom";
const APP: &str = "EE/GOV/70000001/payments";
const NOW: u64 = 1_767_225_600;

/// A signing key and its public half as a JWK.
struct TestKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn ec_key(kid: &str) -> TestKey {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    // The uncompressed point: 0x04, then x and y of 32 bytes each.
    let point = kp.public_key_raw();
    assert_eq!(point.len(), 65);
    TestKey {
        kid: kid.into(),
        alg: Algorithm::ES256,
        encoding: EncodingKey::from_ec_der(&kp.serialize_der()),
        jwk: json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": b64(&point[1..33]), "y": b64(&point[33..]),
        }),
    }
}

fn rsa_key(kid: &str) -> TestKey {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let private = rsa::RsaPrivateKey::from_pkcs8_der(&kp.serialize_der()).unwrap();
    let pkcs1 = private.to_pkcs1_der().unwrap();
    TestKey {
        kid: kid.into(),
        alg: Algorithm::RS256,
        encoding: EncodingKey::from_rsa_der(pkcs1.as_bytes()),
        // No `alg` here: many issuers leave it out, and the key type must then decide.
        jwk: json!({
            "kty": "RSA", "use": "sig", "kid": kid,
            "n": b64(&private.n().to_bytes_be()), "e": b64(&private.e().to_bytes_be()),
        }),
    }
}

fn jwks(keys: &[&TestKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

/// Claims that the verifier accepts at `NOW`.
fn good_claims() -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "service-account-payments",
        "iat": NOW - 10,
        "nbf": NOW - 10,
        "exp": NOW + 300,
        "postroom_application": APP,
    })
}

fn sign(key: &TestKey, claims: &Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    encode(&header, claims, &key.encoding).unwrap()
}

/// `good_claims()` with `name` set to `value` (or removed when `value` is null).
fn with(name: &str, value: Value) -> Value {
    let mut c = good_claims();
    let map = c.as_object_mut().unwrap();
    if value.is_null() {
        map.remove(name);
    } else {
        map.insert(name.into(), value);
    }
    c
}

fn issuer_cfg(file: Option<&Path>, url: Option<String>) -> ExternalIssuer {
    ExternalIssuer {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        jwks_file: file.map(Path::to_path_buf),
        jwks_url: url,
        application_claim: "postroom_application".into(),
    }
}

async fn from_file(keys: &[&TestKey]) -> (ExternalVerifier, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(keys)).unwrap();
    let v = ExternalVerifier::load(&issuer_cfg(Some(&file), None))
        .await
        .unwrap();
    (v, dir)
}

/// Asserts that `token` is refused with a message containing `expected`.
fn refused(v: &ExternalVerifier, token: &str, expected: &str) {
    match v.verify(token, NOW) {
        Ok(p) => panic!("accepted as {p:?}; expected a refusal with `{expected}`"),
        Err(e) => assert!(e.contains(expected), "`{e}` should contain `{expected}`"),
    }
}

#[tokio::test]
async fn good_rsa_and_ec_tokens_name_the_application() {
    let ec = ec_key("ec-1");
    let rsa = rsa_key("rsa-1");
    let (v, _dir) = from_file(&[&ec, &rsa]).await;
    for key in [&ec, &rsa] {
        let p = v.verify(&sign(key, &good_claims()), NOW).unwrap();
        assert_eq!(p.as_str(), APP, "{:?}", key.alg);
    }
    // `aud` may be a list; `nbf` may be absent; the async form agrees.
    let listed = sign(&ec, &with("aud", json!(["account", AUDIENCE])));
    assert_eq!(v.verify(&listed, NOW).unwrap().as_str(), APP);
    let no_nbf = sign(&rsa, &with("nbf", Value::Null));
    assert_eq!(
        v.verify_or_refresh(&no_nbf, NOW).await.unwrap().as_str(),
        APP
    );
}

#[tokio::test]
async fn bad_tokens_are_each_refused_with_a_reason() {
    let ec = ec_key("ec-1");
    let rsa = rsa_key("rsa-1");
    let (v, _dir) = from_file(&[&ec, &rsa]).await;

    refused(
        &v,
        &sign(&ec, &with("iss", json!("https://evil.example"))),
        "wrong issuer",
    );
    refused(&v, &sign(&ec, &with("iss", Value::Null)), "wrong issuer");
    refused(
        &v,
        &sign(&ec, &with("aud", json!("someone-else"))),
        "wrong audience",
    );
    refused(
        &v,
        &sign(&ec, &with("aud", json!(["a", "b"]))),
        "wrong audience",
    );
    refused(
        &v,
        &sign(&ec, &with("exp", json!(NOW - 3600))),
        "token expired",
    );
    refused(&v, &sign(&ec, &with("exp", Value::Null)), "no expiry");
    refused(
        &v,
        &sign(&ec, &with("nbf", json!(NOW + 3600))),
        "not valid yet",
    );
    refused(
        &v,
        &sign(&ec, &with("postroom_application", Value::Null)),
        "no `postroom_application` claim",
    );
    refused(
        &v,
        &sign(&ec, &with("postroom_application", json!(42))),
        "not a string",
    );
    for not_an_app in ["payments", "EE/GOV/70000001", "EE/GOV/7 1/payments", ""] {
        refused(
            &v,
            &sign(&ec, &with("postroom_application", json!(not_an_app))),
            "not an application id",
        );
    }

    // A key the set does not have.
    let stranger = ec_key("ec-unknown");
    refused(&v, &sign(&stranger, &good_claims()), "unknown signing key");
    // Another key claiming to be a known one: the signature does not check.
    let impostor = TestKey {
        kid: "ec-1".into(),
        ..ec_key("ignored")
    };
    refused(&v, &sign(&impostor, &good_claims()), "bad signature");
    // A token whose claims were changed after signing.
    let token = sign(&ec, &good_claims());
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    parts[1] = b64(with("postroom_application", json!("EE/GOV/1/admin"))
        .to_string()
        .as_bytes());
    refused(&v, &parts.join("."), "bad signature");
    // The right key named with the wrong algorithm.
    let mismatched = TestKey {
        kid: "ec-1".into(),
        ..rsa_key("ignored")
    };
    refused(&v, &sign(&mismatched, &good_claims()), "not for algorithm");
    // A symmetric algorithm, which a published key set must never enable.
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("ec-1".into());
    let hs_token = encode(&hs, &good_claims(), &EncodingKey::from_secret(b"x")).unwrap();
    refused(&v, &hs_token, "not accepted");
    // No key id, and not a token at all.
    let no_kid = encode(&Header::new(Algorithm::ES256), &good_claims(), &ec.encoding).unwrap();
    refused(&v, &no_kid, "kid");
    refused(&v, "not.a.token", "malformed");
}

#[tokio::test]
async fn clock_skew_is_tolerated_up_to_a_minute() {
    let ec = ec_key("ec-1");
    let (v, _dir) = from_file(&[&ec]).await;
    assert!(v
        .verify(&sign(&ec, &with("exp", json!(NOW - 30))), NOW)
        .is_ok());
    refused(
        &v,
        &sign(&ec, &with("exp", json!(NOW - 60))),
        "token expired",
    );
    assert!(v
        .verify(&sign(&ec, &with("nbf", json!(NOW + 30))), NOW)
        .is_ok());
    refused(
        &v,
        &sign(&ec, &with("nbf", json!(NOW + 61))),
        "not valid yet",
    );
}

#[tokio::test]
async fn bad_issuer_settings_stop_the_server() {
    let ec = ec_key("ec-1");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(&[&ec])).unwrap();
    let err = |cfg: ExternalIssuer| async move {
        ExternalVerifier::load(&cfg).await.unwrap_err().to_string()
    };

    let both = err(issuer_cfg(
        Some(&file),
        Some("http://127.0.0.1:1/jwks".into()),
    ))
    .await;
    assert!(
        both.contains("exactly one of jwks_file and jwks_url"),
        "{both}"
    );
    let neither = err(issuer_cfg(None, None)).await;
    assert!(
        neither.contains("exactly one of jwks_file and jwks_url"),
        "{neither}"
    );
    let missing = err(issuer_cfg(Some(&dir.path().join("nope.json")), None)).await;
    assert!(missing.contains("nope.json"), "{missing}");
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, r#"{"keys": []}"#).unwrap();
    let e = err(issuer_cfg(Some(&empty), None)).await;
    assert!(e.contains("no usable public key"), "{e}");
    let not_url = err(issuer_cfg(None, Some("file:///etc/passwd".into()))).await;
    assert!(not_url.contains("http"), "{not_url}");
    // Nobody listens on a port that was just free: the fetch fails at start.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = err(issuer_cfg(
        None,
        Some(format!("http://127.0.0.1:{port}/jwks")),
    ))
    .await;
    assert!(down.contains("jwks_url"), "{down}");
}

/// A local issuer that serves whatever key set it is told to and counts the fetches.
struct Issuer {
    url: String,
    jwks: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
}

async fn local_issuer(initial: String) -> Issuer {
    let jwks = Arc::new(Mutex::new(initial));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (served, counted) = (jwks.clone(), fetches.clone());
    let app = axum::Router::new().route(
        "/certs",
        axum::routing::get(move || {
            let (served, counted) = (served.clone(), counted.clone());
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                let body = served.lock().unwrap().clone();
                ([("content-type", "application/json")], body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Issuer {
        url: format!("http://{addr}/certs"),
        jwks,
        fetches,
    }
}

#[tokio::test]
async fn a_url_key_set_is_fetched_again_for_a_new_key_at_most_once_a_minute() {
    let first = ec_key("k1");
    let issuer = local_issuer(jwks(&[&first])).await;
    let v = ExternalVerifier::load(&issuer_cfg(None, Some(issuer.url.clone())))
        .await
        .unwrap();
    assert_eq!(issuer.fetches.load(Ordering::SeqCst), 1);
    assert_eq!(
        v.verify(&sign(&first, &good_claims()), NOW)
            .unwrap()
            .as_str(),
        APP
    );

    // The issuer rotates a new key in and signs with it at once.
    let second = rsa_key("k2");
    *issuer.jwks.lock().unwrap() = jwks(&[&first, &second]);
    let token = sign(&second, &good_claims());
    refused(&v, &token, "unknown signing key");
    assert_eq!(
        issuer.fetches.load(Ordering::SeqCst),
        1,
        "verify never fetches"
    );
    assert_eq!(
        v.verify_or_refresh(&token, NOW).await.unwrap().as_str(),
        APP
    );
    assert_eq!(issuer.fetches.load(Ordering::SeqCst), 2);
    // Now known, it needs no fetch.
    assert!(v.verify_or_refresh(&token, NOW + 1).await.is_ok());
    assert_eq!(issuer.fetches.load(Ordering::SeqCst), 2);

    // Another new key within the minute: no fetch, refused.
    let third = ec_key("k3");
    *issuer.jwks.lock().unwrap() = jwks(&[&first, &second, &third]);
    let token = sign(&third, &good_claims());
    let e = v.verify_or_refresh(&token, NOW + 59).await.unwrap_err();
    assert!(e.contains("unknown signing key"), "{e}");
    assert_eq!(issuer.fetches.load(Ordering::SeqCst), 2);
    // After the minute it is fetched once more.
    assert!(v.verify_or_refresh(&token, NOW + 60).await.is_ok());
    assert_eq!(issuer.fetches.load(Ordering::SeqCst), 3);

    // A key id nobody has costs at most one fetch a minute, however often it is tried.
    let stranger = ec_key("nobody");
    let token = sign(&stranger, &good_claims());
    for t in 0..5 {
        assert!(v.verify_or_refresh(&token, NOW + 120 + t).await.is_err());
    }
    assert_eq!(issuer.fetches.load(Ordering::SeqCst), 4);
}
