//! Tokens from an external OpenID Connect issuer (Keycloak and the like). It exists so that an
//! organisation that already runs an identity provider can give its applications tokens from
//! there, instead of registering API clients with Postroom: a token is accepted when its
//! signature checks against the issuer's published JSON Web Key Set (JWKS), it is meant for this
//! broker (`iss`, `aud`), it is within its lifetime, and it names a Postroom application in the
//! configured claim.
//!
//! The key set comes from a file or a URL (`[auth.external]`). A URL is fetched at start and
//! again when a token names a key id the set does not have, because issuers rotate keys by
//! publishing the new one before signing with it; that refetch happens at most once a minute so
//! that tokens with made-up key ids cannot make the broker hammer the issuer.
//!
//! Only asymmetric algorithms are accepted (RSA, RSA-PSS, ECDSA, EdDSA): a symmetric key in a
//! published key set would let anyone who can read the set sign tokens.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use broker_core::Principal;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::config::ExternalIssuer;
use crate::error::StartError;

/// How far the issuer's clock may be from ours: a token is accepted up to this many seconds
/// after its `exp` and before its `nbf`.
pub const CLOCK_SKEW_SECS: u64 = 60;

/// The shortest time between two fetches of the key set triggered by unknown key ids.
pub const REFRESH_INTERVAL_SECS: u64 = 60;

/// How long one fetch of the key set may take in all (connect, answer, body).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest key set accepted, in bytes: real ones are a few kilobytes.
const JWKS_BYTES_MAX: usize = 1024 * 1024;

/// The longest part of an application id, as broker-core's identity registry accepts it.
const ID_PART_BYTES_MAX: usize = 64;

/// The algorithms a token may be signed with.
const ACCEPTED_ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Checks tokens of one external issuer against its key set. Cheap to share behind an `Arc`;
/// every method takes `&self`.
pub struct ExternalVerifier {
    issuer: String,
    audience: String,
    application_claim: String,
    source: Source,
    keys: RwLock<Arc<KeySet>>,
    /// When (in the callers' clock, seconds) the key set was last fetched because of an unknown
    /// key id. The lock also makes concurrent callers wait for one fetch instead of each doing
    /// their own.
    last_refresh: tokio::sync::Mutex<Option<u64>>,
}

impl std::fmt::Debug for ExternalVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalVerifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("application_claim", &self.application_claim)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Where the key set comes from.
#[derive(Debug)]
enum Source {
    File(PathBuf),
    Url {
        url: String,
        client: reqwest::Client,
    },
}

/// The usable keys of a key set, by key id.
struct KeySet {
    keys: HashMap<String, Key>,
}

struct Key {
    decoding: DecodingKey,
    family: AlgorithmFamily,
    /// The key's `alg`, when the set names one: the token must then use exactly it.
    alg: Option<Algorithm>,
    /// The curve of an EC key, which fixes its algorithm.
    curve: Option<EllipticCurve>,
}

/// Why a token was refused; an unknown key id is told apart because it may be cured by
/// fetching the key set again.
enum Refusal {
    UnknownKey(String),
    Other(String),
}

impl Refusal {
    fn message(self) -> String {
        match self {
            Refusal::UnknownKey(kid) => format!("unknown signing key `{kid}`"),
            Refusal::Other(m) => m,
        }
    }
}

fn refuse<T>(message: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::Other(message.into()))
}

impl ExternalVerifier {
    /// Reads the key set from `cfg.jwks_file`, or fetches it from `cfg.jwks_url` (bounded by a
    /// 10 s timeout). Exactly one of the two must be set, and the set must hold at least one
    /// usable public key with a key id; otherwise the server cannot start.
    pub async fn load(cfg: &ExternalIssuer) -> Result<ExternalVerifier, StartError> {
        let config_error = |m: String| StartError::Config(format!("auth.external: {m}"));
        if cfg.issuer.is_empty() || cfg.audience.is_empty() || cfg.application_claim.is_empty() {
            return Err(config_error(
                "issuer, audience and application_claim must not be empty".into(),
            ));
        }
        let source = match (&cfg.jwks_file, &cfg.jwks_url) {
            (Some(path), None) => Source::File(path.clone()),
            (None, Some(url)) => {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(config_error(format!(
                        "jwks_url `{url}` must be an http:// or https:// URL"
                    )));
                }
                let client = reqwest::Client::builder()
                    .timeout(FETCH_TIMEOUT)
                    .connect_timeout(FETCH_TIMEOUT)
                    .redirect(reqwest::redirect::Policy::limited(3))
                    .build()
                    .map_err(|e| config_error(format!("cannot build the HTTP client: {e}")))?;
                Source::Url {
                    url: url.clone(),
                    client,
                }
            }
            _ => {
                return Err(config_error(
                    "exactly one of jwks_file and jwks_url must be set".into(),
                ))
            }
        };
        let keys = source.fetch().await.map_err(config_error)?;
        Ok(ExternalVerifier {
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            application_claim: cfg.application_claim.clone(),
            source,
            keys: RwLock::new(Arc::new(keys)),
            last_refresh: tokio::sync::Mutex::new(None),
        })
    }

    /// Checks `token` against the key set as it is now, at `now_secs` (seconds since the Unix
    /// epoch), and returns the application it names. The error is a short sentence for the
    /// caller's 401 answer. Use [`ExternalVerifier::verify_or_refresh`] in async code, so that
    /// a key the issuer has just rotated in is picked up.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<Principal, String> {
        self.check(token, now_secs).map_err(Refusal::message)
    }

    /// Like [`ExternalVerifier::verify`], but when the token names a key id the set does not
    /// have and the set comes from a URL, fetches the set again first (at most once every
    /// [`REFRESH_INTERVAL_SECS`], counted in the callers' `now_secs`) and checks once more.
    pub async fn verify_or_refresh(&self, token: &str, now_secs: u64) -> Result<Principal, String> {
        match self.check(token, now_secs) {
            Err(Refusal::UnknownKey(_)) if matches!(self.source, Source::Url { .. }) => {
                self.refresh(now_secs).await;
                self.check(token, now_secs).map_err(Refusal::message)
            }
            outcome => outcome.map_err(Refusal::message),
        }
    }

    /// Fetches the key set again unless that was done less than [`REFRESH_INTERVAL_SECS`] ago.
    /// A failed fetch keeps the keys there were, and counts as a fetch for the bound.
    async fn refresh(&self, now_secs: u64) {
        let mut last = self.last_refresh.lock().await;
        // A clock that went backwards is taken as "long enough ago", so that a clock correction
        // cannot block refreshes for as long as it moved.
        if let Some(t) = *last {
            if now_secs >= t && now_secs - t < REFRESH_INTERVAL_SECS {
                return;
            }
        }
        *last = Some(now_secs);
        match self.source.fetch().await {
            Ok(keys) => {
                let mut current = self.keys.write().unwrap_or_else(|e| e.into_inner());
                *current = Arc::new(keys);
            }
            Err(e) => tracing::warn!("auth.external: refreshing the key set failed: {e}"),
        }
    }

    fn check(&self, token: &str, now_secs: u64) -> Result<Principal, Refusal> {
        let header = match jsonwebtoken::decode_header(token) {
            Ok(h) => h,
            Err(_) => return refuse("malformed token"),
        };
        let alg = header.alg;
        if !ACCEPTED_ALGORITHMS.contains(&alg) {
            return refuse(format!("signing algorithm {alg:?} is not accepted"));
        }
        let Some(kid) = header.kid else {
            return refuse("token names no signing key (kid)");
        };
        let keys = Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()));
        let Some(key) = keys.keys.get(&kid) else {
            return Err(Refusal::UnknownKey(kid));
        };
        if !key.accepts(alg) {
            return refuse(format!("key `{kid}` is not for algorithm {alg:?}"));
        }
        // The library checks only the signature; the claims are checked below against the
        // caller's clock, which keeps this function deterministic for a given `now_secs`.
        let mut validation = Validation::new(alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let claims =
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &validation) {
                Ok(data) => data.claims,
                Err(e) => {
                    return refuse(match e.kind() {
                        jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                            "bad signature".to_string()
                        }
                        _ => format!("invalid token: {e}"),
                    })
                }
            };
        self.check_claims(&claims, now_secs)
    }

    fn check_claims(&self, claims: &Map<String, Value>, now: u64) -> Result<Principal, Refusal> {
        if claims.get("iss").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return refuse("wrong issuer");
        }
        let audience_ok = match claims.get("aud") {
            Some(Value::String(a)) => *a == self.audience,
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(&self.audience)),
            _ => false,
        };
        if !audience_ok {
            return refuse("wrong audience");
        }
        let exp = match time_claim(claims, "exp")? {
            Some(exp) => exp,
            None => return refuse("token has no expiry (exp)"),
        };
        if exp.saturating_add(CLOCK_SKEW_SECS) <= now {
            return refuse("token expired");
        }
        if let Some(nbf) = time_claim(claims, "nbf")? {
            if nbf > now.saturating_add(CLOCK_SKEW_SECS) {
                return refuse("token not valid yet (nbf)");
            }
        }
        let name = &self.application_claim;
        let application = match claims.get(name) {
            None => return refuse(format!("token has no `{name}` claim")),
            Some(Value::String(s)) => s,
            Some(_) => return refuse(format!("claim `{name}` is not a string")),
        };
        if !is_application_id(application) {
            return refuse(format!(
                "claim `{name}` is not an application id INSTANCE/CLASS/MEMBER/APPLICATION"
            ));
        }
        Principal::new(application.as_str())
            .or_else(|_| refuse(format!("claim `{name}` is not a valid principal")))
    }
}

impl Key {
    /// Whether a token signed with `alg` may be checked with this key.
    fn accepts(&self, alg: Algorithm) -> bool {
        if alg.family() != self.family || self.alg.is_some_and(|a| a != alg) {
            return false;
        }
        match self.curve {
            Some(EllipticCurve::P256) => alg == Algorithm::ES256,
            Some(EllipticCurve::P384) => alg == Algorithm::ES384,
            Some(_) => false,
            None => true,
        }
    }
}

/// A NumericDate claim (seconds since the epoch, possibly fractional) rounded down.
fn time_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, Refusal> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) => Ok(Some(n)),
            None => match v.as_f64() {
                Some(f) if f.is_finite() && f >= 0.0 => Ok(Some(f as u64)),
                _ => refuse(format!("claim `{name}` is not a time")),
            },
        },
    }
}

/// `INSTANCE/CLASS/MEMBER/APPLICATION`, each part 1 to 64 bytes of letters, digits or `-._~%`:
/// the application ids broker-core's identity registry accepts.
fn is_application_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 4
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= ID_PART_BYTES_MAX
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b))
        })
}

impl Source {
    /// Reads or downloads the key set and keeps its usable keys.
    async fn fetch(&self) -> Result<KeySet, String> {
        match self {
            Source::File(path) => {
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|e| format!("jwks_file {}: cannot read: {e}", path.display()))?;
                parse_key_set(&bytes).map_err(|e| format!("jwks_file {}: {e}", path.display()))
            }
            Source::Url { url, client } => {
                let bytes = download(client, url)
                    .await
                    .map_err(|e| format!("jwks_url {url}: {e}"))?;
                parse_key_set(&bytes).map_err(|e| format!("jwks_url {url}: {e}"))
            }
        }
    }
}

/// GETs `url`, refusing an error status and bodies over [`JWKS_BYTES_MAX`].
async fn download(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let mut resp = client
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("answered {}", resp.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > JWKS_BYTES_MAX {
            return Err(format!("key set larger than {JWKS_BYTES_MAX} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The usable keys of a JWKS document. Keys are read one by one, so that one key of a type
/// this server does not know does not make the whole set unusable; keys without an id, keys for
/// encryption and symmetric keys are left out.
fn parse_key_set(bytes: &[u8]) -> Result<KeySet, String> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let Some(list) = doc.get("keys").and_then(Value::as_array) else {
        return Err("not a key set: no `keys` array".into());
    };
    let mut keys = HashMap::new();
    for raw in list {
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw.clone()) else {
            continue;
        };
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let curve = match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(p) => Some(p.curve.clone()),
            AlgorithmParameters::RSA(_) | AlgorithmParameters::OctetKeyPair(_) => None,
            _ => continue,
        };
        let alg = match jwk.common.key_algorithm {
            Some(a) => match Algorithm::from_str(&a.to_string()) {
                Ok(a) if ACCEPTED_ALGORITHMS.contains(&a) => Some(a),
                _ => continue,
            },
            None => None,
        };
        let Ok(decoding) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        let family = decoding.family();
        if family == AlgorithmFamily::Hmac {
            continue;
        }
        // The first key with an id wins, as a lookup by id in the published list would find.
        keys.entry(kid).or_insert(Key {
            decoding,
            family,
            alg,
            curve,
        });
    }
    if keys.is_empty() {
        return Err("no usable public key with a key id (kid) in the set".into());
    }
    Ok(KeySet { keys })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_ids_have_four_plain_parts() {
        assert!(is_application_id("EE/GOV/70000001/payments"));
        assert!(is_application_id("EE/GOV/7%2F1/pay-ments_v1.2~x"));
        for bad in [
            "",
            "EE/GOV/70000001",
            "EE/GOV/70000001/payments/extra",
            "EE//70000001/payments",
            "EE/GOV/70000001/pay ments",
            "EE/GOV/70000001/päy",
        ] {
            assert!(!is_application_id(bad), "{bad:?}");
        }
        assert!(!is_application_id(&format!("EE/GOV/M/{}", "a".repeat(65))));
    }

    #[test]
    fn symmetric_and_id_less_keys_are_left_out() {
        let set = br#"{"keys": [
            {"kty": "oct", "kid": "shared", "k": "c2VjcmV0"},
            {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"},
            {"kty": "weird", "kid": "w"}
        ]}"#;
        let e = parse_key_set(set).err().unwrap_or_default();
        assert!(e.contains("no usable public key"), "{e}");
        assert!(parse_key_set(b"[]").is_err());
        assert!(parse_key_set(b"nope").is_err());
    }
}
