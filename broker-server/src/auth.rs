//! Authentication: the OAuth 2.0 token endpoint (client credentials grant, RFC 6749 section
//! 4.4) and the middleware that turns a bearer token back into an [`Identity`] for the handlers:
//! one of Postroom's own tokens (issued and checked in `tokens.rs`: signed with a rotatable key
//! the broker keeps in its database, bound to its client's incarnation and secret, its lifetime
//! capped), or one of the trusted external issuer's (`auth_external.rs`), which may not name a
//! `local/...` identity. Expiry is checked against the broker's clock, so tests can move time.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use broker_core::{Broker, KeyRing, Principal, Rights};
use serde_json::json;

use crate::config::AuthConfig;
use crate::error::{ApiError, TokenRefusal};
use crate::tokens::Tokens;

/// Who is calling and what they may do; put in the request by [`authenticate`].
#[derive(Clone, Debug)]
pub struct Identity {
    /// The application (`INSTANCE/CLASS/MEMBER/APPLICATION`), or the local administrator.
    pub principal: Principal,
    /// Its rights.
    pub rights: Rights,
}

impl<S: Send + Sync> FromRequestParts<S> for Identity {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Identity>()
            .cloned()
            .ok_or_else(|| ApiError::Unauthenticated("a bearer token is required".into()))
    }
}

impl Identity {
    /// Refuses with 403 unless `allowed`.
    pub fn require(&self, allowed: bool, what: &str) -> Result<(), ApiError> {
        if allowed {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "`{}` may not {what}",
                self.principal
            )))
        }
    }
}

/// Issues and checks tokens.
pub struct Auth {
    broker: Broker,
    /// Postroom's own tokens.
    tokens: Tokens,
    /// With authentication off, every caller is this administrator.
    insecure_admin: Option<Principal>,
    /// A trusted external issuer, if configured.
    external: Option<Arc<crate::auth_external::ExternalVerifier>>,
    /// The failure limits of the token endpoint.
    brakes: crate::brakes::Brakes,
}

/// The name of the ring of token signing keys in the broker's key store.
pub use crate::tokens::TOKEN_KEY;

/// The instance of the identities that belong to Postroom's own clients (the bootstrap
/// administrator is `local/ADMIN/postroom/admin`): no external issuer's token may name one.
pub const RESERVED_INSTANCE: &str = "local";

/// Whether `principal` is in the [`RESERVED_INSTANCE`] (compared without regard to case, so
/// that `LOCAL/...` cannot be mistaken for it by a person reading a log).
pub fn is_reserved(principal: &Principal) -> bool {
    principal
        .as_str()
        .split('/')
        .next()
        .is_some_and(|instance| instance.eq_ignore_ascii_case(RESERVED_INSTANCE))
}

impl Auth {
    /// The authenticator for `broker`; the signing keys are loaded (or on first start created)
    /// when first needed.
    pub fn new(
        broker: Broker,
        config: &AuthConfig,
        external: Option<Arc<crate::auth_external::ExternalVerifier>>,
    ) -> broker_core::Result<Auth> {
        let insecure_admin = if config.insecure_no_auth {
            Some(Principal::new(crate::LOCAL_ADMIN)?)
        } else {
            None
        };
        Ok(Auth {
            brakes: crate::brakes::Brakes::new(broker.clone(), config),
            tokens: Tokens::new(broker.clone(), config),
            broker,
            insecure_admin,
            external,
        })
    }

    /// The ring of token signing keys (from memory after the first use; the core keeps it up
    /// to date with every rotation, so there is nothing to cache here).
    pub async fn signing_keys(&self) -> Result<Arc<KeyRing>, ApiError> {
        self.tokens.signing_keys().await
    }

    /// Rotates the token signing key: a new key signs from now on; the previous one verifies
    /// the tokens it signed until they have expired (`auth.token_ttl_secs`), or, with
    /// `drop_previous`, not at all (every token issued before is refused from the next
    /// request).
    pub async fn rotate_signing_key(&self, drop_previous: bool) -> Result<Arc<KeyRing>, ApiError> {
        self.tokens.rotate(drop_previous).await
    }

    fn now_secs(&self) -> u64 {
        self.broker.now().as_ms() / 1000
    }

    /// The caller of a request, from its `Authorization: Bearer` token.
    async fn identify(&self, headers: &HeaderMap) -> Result<Identity, ApiError> {
        if let Some(admin) = &self.insecure_admin {
            return Ok(Identity {
                principal: admin.clone(),
                rights: Rights::all(admin.clone()),
            });
        }
        let unauth = |m: &str| ApiError::Unauthenticated(m.to_string());
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauth("a bearer token is required (POST /oauth/token to get one)"))?
            .to_str()
            .map_err(|_| unauth("the Authorization header is not valid"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| unauth("the Authorization header must be `Bearer <token>`"))?
            .trim();
        let Some(verified) = self.tokens.verified(token).await? else {
            // Not one of ours: perhaps the trusted external issuer's.
            return self.identify_external(token).await;
        };
        let client = self.tokens.client_of(&verified).await?;
        let rights = self.broker.rights(&client.application)?;
        Ok(Identity {
            principal: client.application,
            rights,
        })
    }

    /// A token that is not ours, checked against the trusted external issuer if there is one.
    async fn identify_external(&self, token: &str) -> Result<Identity, ApiError> {
        let unauth = |m: &str| ApiError::Unauthenticated(m.to_string());
        let Some(ext) = &self.external else {
            return Err(unauth("the token is not valid"));
        };
        let principal = ext
            .verify_or_refresh(token, self.now_secs())
            .await
            .map_err(|why| unauth(&format!("the token is not valid: {why}")))?;
        if is_reserved(&principal) {
            return Err(ApiError::TokenRefused {
                reason: TokenRefusal::ReservedIdentity,
                message: format!(
                    "`{principal}` is reserved for Postroom's own clients; an external issuer's \
                     token cannot name it"
                ),
            });
        }
        let rights = self.broker.rights(&principal)?;
        Ok(Identity { principal, rights })
    }
}

/// The member and application of the first administrator, in the [`RESERVED_INSTANCE`].
pub const BOOTSTRAP_MEMBER: &str = "local/ADMIN/postroom";
/// See [`BOOTSTRAP_MEMBER`].
pub const BOOTSTRAP_APPLICATION: &str = "admin";

/// On first start (no administrator yet, authentication on), creates the administrator:
/// member [`BOOTSTRAP_MEMBER`], its application `admin` with the admin role, and an API client
/// with the configured id and secret, or generated ones. Returns the client id and, when it
/// was generated, the secret, for the caller to show once.
pub async fn bootstrap(
    broker: &Broker,
    config: &AuthConfig,
) -> broker_core::Result<Option<(String, Option<String>)>> {
    // Nodes sharing one database may start together: a step that lost a race to another
    // node's (`storage_conflict`) is tried again from the start, which then finds what the
    // other node made.
    let mut tries = 0;
    loop {
        match bootstrap_once(broker, config).await {
            Err(broker_core::Error::StorageConflict { .. }) if tries < 16 => tries += 1,
            other => return other,
        }
    }
}

async fn bootstrap_once(
    broker: &Broker,
    config: &AuthConfig,
) -> broker_core::Result<Option<(String, Option<String>)>> {
    if config.insecure_no_auth
        || broker
            .grants(None)?
            .iter()
            .any(|g| g.role == broker_core::Role::Admin)
    {
        return Ok(None);
    }
    let tolerate = |r: broker_core::Result<()>| match r {
        Err(broker_core::Error::IdentityExists { .. }) => Ok(()),
        other => other,
    };
    tolerate(
        broker
            .create_member(BOOTSTRAP_MEMBER, "Postroom operators")
            .await
            .map(|_| ()),
    )?;
    tolerate(
        broker
            .create_application(BOOTSTRAP_MEMBER, BOOTSTRAP_APPLICATION, "Administrator")
            .await
            .map(|_| ()),
    )?;
    let app = Principal::new(format!("{BOOTSTRAP_MEMBER}/{BOOTSTRAP_APPLICATION}"))?;
    let id = config
        .admin_client_id
        .clone()
        .unwrap_or_else(|| "admin".to_string());
    let created = broker
        .create_client(&app, Some(id), config.admin_client_secret.clone())
        .await;
    let (client, secret) = match created {
        Ok(c) => c,
        // Made by another node starting at the same time (which shows its secret), or by a
        // start that stopped before the grant below: the grant is all that is missing.
        Err(broker_core::Error::IdentityExists { .. }) => {
            broker
                .grant(&app, broker_core::Role::Admin, None, None)
                .await?;
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    broker
        .grant(&app, broker_core::Role::Admin, None, None)
        .await?;
    let shown = config.admin_client_secret.is_none().then_some(secret);
    Ok(Some((client.client_id, shown)))
}

/// The token endpoint's second path, where an OpenID Connect client configured with a Keycloak
/// credentials file (the IRC ICD's) looks for it.
pub const ICD_TOKEN_PATH: &str = "/realms/{realm}/protocol/openid-connect/token";

/// Whether `path` is [`ICD_TOKEN_PATH`] for some realm.
pub(crate) fn is_icd_token_path(path: &str) -> bool {
    let s: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    matches!(
        s.as_slice(),
        ["realms", realm, "protocol", "openid-connect", "token"] if !realm.is_empty()
    )
}

/// Paths anyone may call: health, the API documents, and the token endpoint itself.
fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/healthz" | "/readyz" | "/metrics" | "/openapi.json" | "/oauth/token" | "/docs"
    ) || path.starts_with("/docs/")
        || is_icd_token_path(path)
}

/// Authenticates every request except the public ones; the handlers then find the
/// [`Identity`] in the request. `next` is the rest of the chain (see `middleware::gate`).
pub(crate) async fn authenticate<F, Fut>(auth: &Auth, mut req: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    if is_public(req.uri().path()) {
        return next(req).await;
    }
    match auth.identify(req.headers()).await {
        Ok(identity) => {
            req.extensions_mut().insert(identity.clone());
            let mut resp = next(req).await;
            // Layers outside this one (the audit log) learn the caller from the response.
            resp.extensions_mut().insert(identity);
            resp
        }
        Err(e) => e.into_response(),
    }
}

// ----- The token endpoint -----

/// An RFC 6749 error answer: `{"error": ...}` (not problem+json: OAuth clients expect this).
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut resp = (
        status,
        axum::Json(json!({"error": error, "error_description": description})),
    )
        .into_response();
    no_store(&mut resp);
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"postroom\""),
        );
    }
    resp
}

fn no_store(resp: &mut Response) {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut()
        .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

/// Decodes `application/x-www-form-urlencoded` text (`+` is a space).
fn form_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Client id and secret from `Authorization: Basic` (each part form-encoded, RFC 6749 2.3.1).
fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, ()> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| ())?;
    let Some(b64) = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))
    else {
        return Err(());
    };
    let raw = B64.decode(b64.trim()).map_err(|_| ())?;
    let raw = String::from_utf8(raw).map_err(|_| ())?;
    let (id, secret) = raw.split_once(':').ok_or(())?;
    Ok(Some((
        form_decode(id).ok_or(())?,
        form_decode(secret).ok_or(())?,
    )))
}

/// `POST /oauth/token`: the client credentials grant, with `client_secret_basic` or
/// `client_secret_post`.
///
/// Its errors are RFC 6749's (`{"error": ...}`) where OAuth defines one (400 and 401). Its
/// brakes are not OAuth errors, and OAuth defines none for them, so they answer as the server
/// does everywhere when it refuses for load: problem+json with `Retry-After`, 429
/// `too_many_failures` for a caller over a failure limit (see [`crate::brakes`]) and 503
/// `authentication_busy` when every secret check slot is taken (as load shedding answers 503
/// `overloaded`).
pub async fn token(
    State(auth): State<Arc<Auth>>,
    crate::brakes::Peer(peer): crate::brakes::Peer,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !form_type {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the body must be application/x-www-form-urlencoded",
        );
    }
    let Ok(text) = std::str::from_utf8(&body) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the body is not UTF-8",
        );
    };
    let mut fields = std::collections::HashMap::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(k), Some(v)) = (form_decode(k), form_decode(v)) else {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "malformed form body",
            );
        };
        // RFC 6749 3.2: parameters must not be repeated.
        if fields.insert(k.clone(), v).is_some() {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("`{k}` is repeated"),
            );
        }
    }
    let Some(grant) = fields.get("grant_type") else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "grant_type is required",
        );
    };
    if grant != "client_credentials" {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only client_credentials is supported",
        );
    }
    let basic = match basic_credentials(&headers) {
        Ok(b) => b,
        Err(()) => {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "the Authorization header is not valid Basic credentials",
            )
        }
    };
    let post = match (fields.get("client_id"), fields.get("client_secret")) {
        (Some(id), Some(secret)) => Some((id.clone(), secret.clone())),
        _ => None,
    };
    let (id, secret) = match (basic, post) {
        (Some(_), Some(_)) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "use one client authentication method, not both",
            )
        }
        (Some(c), None) | (None, Some(c)) => c,
        (None, None) => {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "client authentication is required",
            )
        }
    };
    // Before the secret check, so that a limited caller costs no Argon2 work.
    if let Err(e) = auth.brakes.admit(&id, peer).await {
        return e.into_response();
    }
    let (client, secret_id) = match auth.broker.authenticate_client(&id, &secret).await {
        Ok(c) => c,
        Err(e @ broker_core::Error::AuthenticationBusy { .. }) => {
            metrics::counter!(crate::observe::AUTH_REFUSED_TOTAL, "reason" => e.code())
                .increment(1);
            return ApiError::from(e).into_response();
        }
        Err(broker_core::Error::InvalidClient) => {
            auth.brakes.failed(&id, peer);
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "client authentication failed",
            );
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    auth.brakes.issued(&id);
    match auth.tokens.issue(&client, secret_id).await {
        Ok((token, ttl)) => {
            let mut resp = (
                StatusCode::OK,
                axum::Json(
                    json!({"access_token": token, "token_type": "bearer", "expires_in": ttl}),
                ),
            )
                .into_response();
            no_store(&mut resp);
            resp
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_decode() {
        assert_eq!(form_decode("a+b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(form_decode("%zz"), None);
        assert_eq!(form_decode("%4"), None);
    }

    #[test]
    fn basic_credentials_are_form_decoded() {
        let mut h = HeaderMap::new();
        let v = format!("Basic {}", B64.encode("my%3Aclient:s%2Bcret"));
        h.insert(header::AUTHORIZATION, v.parse().unwrap());
        assert_eq!(
            basic_credentials(&h),
            Ok(Some(("my:client".into(), "s+cret".into())))
        );
        h.insert(header::AUTHORIZATION, "Basic !!!".parse().unwrap());
        assert_eq!(basic_credentials(&h), Err(()));
        assert_eq!(basic_credentials(&HeaderMap::new()), Ok(None));
    }

    #[test]
    fn the_local_instance_is_reserved() {
        let p = |s: &str| Principal::new(s).unwrap();
        assert!(is_reserved(&p("local/ADMIN/postroom/admin")));
        assert!(is_reserved(&p("LOCAL/GOV/x/y")));
        assert!(!is_reserved(&p("UK/GOV/HO/visa")));
        assert!(!is_reserved(&p("localhost/GOV/x/y")));
    }

    #[test]
    fn public_paths() {
        assert!(is_public("/healthz"));
        assert!(is_public("/docs/swagger-ui.css"));
        assert!(!is_public("/v1/rooms"));
        assert!(!is_public("/docsx"));
        assert!(is_public("/realms/irc/protocol/openid-connect/token"));
        assert!(!is_public("/realms//protocol/openid-connect/token"));
        assert!(!is_public("/realms/irc/protocol/openid-connect/token/x"));
    }
}
