//! Postroom's own access tokens: what they say, how they are signed, and what makes one valid.
//! Kept apart from `auth.rs` (the token endpoint and the middleware) because this is where the
//! token's security lives.
//!
//! A token is an HS256 JSON Web Token signed with the newest key of the broker's ring
//! ([`broker_core::KeyRing`]), which it names in its `kid` header. It names its client, the
//! client's incarnation and the secret it was issued for, so that deleting the client (even if
//! a client with its id is created again) or revoking the secret stops it at once. No token of
//! ours lives longer than `auth.token_ttl_secs` or says it was issued in the future, so that a
//! token forged with a stolen key cannot outlast a rotation: after one, the old key verifies
//! only what it signed before it retired, until the longest of those tokens has expired.
//!
//! Checking a signature and decoding JSON was the largest cost of authentication in the profile
//! (BENCHMARKS.md, issue 8), so tokens already verified are remembered; everything that can
//! change while a token lives (expiry, its key's retirement, the client, its incarnation and
//! secrets) is checked on every request, from memory: the ring is kept by the core, the client
//! comes from the core's identity cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use broker_core::{ApiClient, Broker, KeyRing, Rotation, Timestamp};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;
use crate::error::{ApiError, TokenRefusal};

/// The name of the ring of token signing keys in the broker's key store.
pub const TOKEN_KEY: &str = "oauth-token-hs256";

/// Most verified tokens remembered; the memory starts again empty when full.
const VERIFIED_TOKENS_MAX: usize = 10_000;

/// The claims of an access token.
#[derive(Clone, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    /// The client id.
    sub: String,
    /// The application the client acts for.
    app: String,
    iat: u64,
    exp: u64,
    jti: String,
    /// The client secret it was issued for ([`broker_core::SecretInfo::id`]).
    secret: u32,
    /// The incarnation of the client it was issued to ([`ApiClient::incarnation`]).
    incarnation: String,
}

/// A token of ours whose signature has been checked, as remembered: its claims and the key
/// that signed it.
#[derive(Clone)]
pub(crate) struct Verified {
    claims: Claims,
    kid: String,
}

/// Issues and checks Postroom's own tokens.
pub(crate) struct Tokens {
    broker: Broker,
    ttl_secs: u64,
    /// How far in the future a token's `iat` may be.
    skew_secs: u64,
    /// Most signing keys in use at once (`auth.signing_keys_max`).
    keys_max: usize,
    issuer: String,
    /// Tokens already verified, by token.
    verified: Mutex<HashMap<String, Verified>>,
}

fn unauth(message: &str) -> ApiError {
    ApiError::Unauthenticated(message.to_string())
}

fn refuse(reason: TokenRefusal, message: impl Into<String>) -> ApiError {
    ApiError::TokenRefused {
        reason,
        message: message.into(),
    }
}

impl Tokens {
    /// Tokens of `broker` with the lifetimes and bounds of `config`.
    pub(crate) fn new(broker: Broker, config: &AuthConfig) -> Tokens {
        Tokens {
            broker,
            ttl_secs: config.token_ttl_secs.max(1),
            skew_secs: config.token_clock_skew_secs,
            keys_max: config.signing_keys_max.max(1),
            issuer: config.token_issuer.clone(),
            verified: Mutex::default(),
        }
    }

    fn now_secs(&self) -> u64 {
        self.broker.now().as_ms() / 1000
    }

    /// The ring of signing keys, created on first use and kept up to date by the core.
    pub(crate) async fn signing_keys(&self) -> Result<Arc<KeyRing>, ApiError> {
        Ok(self.broker.signing_keys(TOKEN_KEY).await?)
    }

    /// Rotates the signing key: see [`crate::auth::Auth::rotate_signing_key`].
    pub(crate) async fn rotate(&self, drop_previous: bool) -> Result<Arc<KeyRing>, ApiError> {
        let ring = self
            .broker
            .rotate_signing_key(
                TOKEN_KEY,
                Rotation {
                    // The longest a token signed until now can live.
                    grace_ms: self.ttl_secs.saturating_mul(1000),
                    keys_max: self.keys_max,
                    drop_previous,
                },
            )
            .await?;
        if drop_previous {
            // Every remembered token is dead; free the memory now.
            self.verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        Ok(ring)
    }

    /// A signed token for `client`, verified with its secret `secret_id`, and its lifetime in
    /// seconds.
    pub(crate) async fn issue(
        &self,
        client: &ApiClient,
        secret_id: u32,
    ) -> Result<(String, u64), ApiError> {
        let now = self.now_secs();
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: self.issuer.clone(),
            sub: client.client_id.clone(),
            app: client.application.to_string(),
            iat: now,
            exp: now + self.ttl_secs,
            jti: uuid::Uuid::new_v4().to_string(),
            secret: secret_id,
            incarnation: client.incarnation.clone(),
        };
        let ring = self.signing_keys().await?;
        let signer = ring.signer();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(signer.kid().to_string());
        let token =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(signer.secret()))
                .map_err(|e| {
                    ApiError::Core(broker_core::Error::Storage(format!("sign token: {e}")))
                })?;
        Ok((token, self.ttl_secs))
    }

    /// The token, if it is one of ours, remembered or verified now (signature, issuer,
    /// audience, key, lifetime and issue time); `None` when it is not one of ours (not HS256,
    /// no key id of our ring, or a signature that does not check).
    pub(crate) async fn verified(&self, token: &str) -> Result<Option<Verified>, ApiError> {
        let remembered = self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned();
        match remembered {
            Some(v) => Ok(Some(v)),
            None => self.verify(token).await,
        }
    }

    async fn verify(&self, token: &str) -> Result<Option<Verified>, ApiError> {
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return Ok(None);
        };
        let Some(kid) = header.kid.filter(|_| header.alg == Algorithm::HS256) else {
            return Ok(None);
        };
        let ring = self.signing_keys().await?;
        let Some(key) = ring.key(&kid) else {
            return Ok(None);
        };
        let mut v = Validation::new(Algorithm::HS256);
        // Expiry is checked on every request against the broker's clock, not the system's.
        v.validate_exp = false;
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.issuer]);
        v.set_required_spec_claims(&["iss", "aud", "sub", "exp", "iat"]);
        let Ok(data) =
            jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(key.secret()), &v)
        else {
            return Ok(None);
        };
        let claims = data.claims;
        // Signed with our key: from here on a refusal can say why.
        if claims.iat > self.now_secs().saturating_add(self.skew_secs) {
            return Err(refuse(
                TokenRefusal::IssuedInFuture,
                "the token says it was issued in the future",
            ));
        }
        if claims
            .exp
            .checked_sub(claims.iat)
            .is_none_or(|lifetime| lifetime > self.ttl_secs)
        {
            return Err(refuse(
                TokenRefusal::LifetimeExceeded,
                format!(
                    "the token's lifetime is longer than this server gives any token ({} s, \
                     auth.token_ttl_secs)",
                    self.ttl_secs
                ),
            ));
        }
        let verified = Verified { claims, kid };
        let mut memory = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if memory.len() >= VERIFIED_TOKENS_MAX {
            memory.clear();
        }
        memory.insert(token.to_string(), verified.clone());
        Ok(Some(verified))
    }

    /// The client a verified token acts for, after what can change while it lives is checked:
    /// expiry, its key (a rotation may have retired it), and the client itself (deleted,
    /// created again, or the token's secret revoked). Every read is from memory.
    pub(crate) async fn client_of(&self, token: &Verified) -> Result<ApiClient, ApiError> {
        let claims = &token.claims;
        let now = self.broker.now();
        if claims.exp <= now.as_ms() / 1000 {
            return Err(unauth("the token has expired"));
        }
        let ring = self.signing_keys().await?;
        if ring
            .verifier(&token.kid, Timestamp(claims.iat.saturating_mul(1000)), now)
            .is_none()
        {
            return Err(unauth(
                "the token's signing key is no longer accepted; get a new token",
            ));
        }
        let client = match self.broker.client(&claims.sub) {
            Ok(c) => c,
            Err(broker_core::Error::IdentityNotFound { .. }) => {
                return Err(unauth("the token's client no longer exists"))
            }
            Err(e) => return Err(e.into()),
        };
        if client.application.as_str() != claims.app {
            return Err(unauth("the token is not valid"));
        }
        // Before the secret: a client created again has a secret 1 of its own.
        if client.incarnation != claims.incarnation {
            return Err(refuse(
                TokenRefusal::ClientReplaced,
                "the token's client was deleted; the client with its id now is another one",
            ));
        }
        if !client.secrets.iter().any(|s| s.id == claims.secret) {
            return Err(refuse(
                TokenRefusal::SecretRevoked,
                format!(
                    "the client secret {} the token was issued for has been revoked",
                    claims.secret
                ),
            ));
        }
        Ok(client)
    }
}
