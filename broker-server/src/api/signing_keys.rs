//! The token signing keys, for administrators: which keys sign and verify now, and their
//! rotation. A rotation is the answer to a key that may have been read (a copy of the database
//! in the wrong hands): a new key signs from then on, and the previous one verifies only the
//! tokens it signed before, until they have expired, or not at all with `drop_previous`.
//! Secrets never appear in an answer. Rotations are recorded by the audit layer, with the new
//! key id.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::schemas::{CoreObject, Unprocessable};
use super::{optional_json, reply, AppState, RawBody};
use crate::auth::Identity;
use crate::error::ApiError;
use crate::middleware::AuditDetail;

/// The routes, relative to `/v1`.
pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(rotate))
}

/// `{signing_kid, items}`: the key that signs and every key in use, without secrets.
fn view(ring: &broker_core::KeyRing, now: broker_core::Timestamp) -> serde_json::Value {
    json!({
        "signing_kid": ring.signer().kid(),
        "items": ring.keys(now),
    })
}

/// Lists the token signing keys in use: the one that signs and the retired ones that still
/// verify the tokens they signed (never the keys themselves).
#[utoipa::path(get, path = "/admin/signing-keys", operation_id = "listSigningKeys",
    tag = "admin",
    responses((status = 200, description = "`{signing_kid, items}`, newest first; each item \
        `{kid, created_at, retired_at, verify_until, signing}`.", body = CoreObject)))]
async fn list(State(s): State<AppState>, id: Identity) -> Result<Response, ApiError> {
    super::admin::admin(&id)?;
    let ring = s.auth.signing_keys().await?;
    Ok(reply(StatusCode::OK, &view(&ring, s.broker.now())))
}

/// How to rotate.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// Stop accepting every earlier key at once instead of letting it verify its tokens until
    /// they expire (`auth.token_ttl_secs`): for a key that was stolen. Every token issued
    /// before is refused from the next request, and clients must get new ones.
    #[serde(default)]
    drop_previous: bool,
}

/// Rotates the token signing key: a new key (with a new key id) signs every token from now on;
/// the previous key keeps verifying the tokens it signed until they have expired
/// (`auth.token_ttl_secs`), then is dropped. Refused (422, `signing_keys_max`) when too many
/// earlier keys are still in their grace; `drop_previous` drops them.
#[utoipa::path(post, path = "/admin/signing-keys/rotate", operation_id = "rotateSigningKey",
    tag = "admin", request_body(content = RotateBody, description = "Optional."),
    responses((status = 200, description = "The keys after: `{signing_kid, items}`.",
        body = CoreObject), (status = 422, response = Unprocessable)))]
async fn rotate(
    State(s): State<AppState>,
    id: Identity,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    super::admin::admin(&id)?;
    let b: RotateBody = optional_json(&headers, &body)?;
    let ring = s.auth.rotate_signing_key(b.drop_previous).await?;
    let kid = ring.signer().kid().to_string();
    tracing::info!(
        kid,
        drop_previous = b.drop_previous,
        by = %id.principal,
        "token signing key rotated"
    );
    let mut resp = reply(StatusCode::OK, &view(&ring, s.broker.now()));
    resp.extensions_mut().insert(AuditDetail(
        json!({"signing_kid": kid, "drop_previous": b.drop_previous}),
    ));
    Ok(resp)
}
