//! The administrators' API: members, applications, API clients and their secrets, rights, the
//! audit log, and the host's state. Every route here needs the admin role. Secrets appear only
//! in the answer that creates them.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use broker_core::{AuditFilter, EventTypeName, Principal, Role, RoomName};
use serde::Deserialize;
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::schemas::{BadRequest, Conflict, CoreObject, NotFound, Unprocessable};
use super::{parse, reply, ApiJson, AppState};
use crate::auth::Identity;
use crate::error::ApiError;

/// The routes, relative to `/v1`.
pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_member, list_members))
        .routes(routes!(delete_member))
        .routes(routes!(create_application, list_applications))
        .routes(routes!(delete_application))
        .routes(routes!(create_client, list_clients))
        .routes(routes!(read_client, delete_client))
        .routes(routes!(add_secret))
        .routes(routes!(revoke_secret))
        .routes(routes!(create_grant, list_grants))
        .routes(routes!(revoke_grant))
        .routes(routes!(audit))
        .routes(routes!(system))
}

pub(super) fn admin(id: &Identity) -> Result<(), ApiError> {
    id.require(id.rights.is_admin(), "use the administrators' API")
}

fn principal(raw: &str) -> Result<Principal, ApiError> {
    parse("application", raw, Principal::new)
}

/// A new member organisation.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewMemberBody {
    /// `INSTANCE/CLASS/CODE`, e.g. `UK/GOV/HO`.
    id: String,
    /// A name for people.
    #[serde(default)]
    name: String,
}

/// Registers a member organisation.
#[utoipa::path(post, path = "/admin/members", operation_id = "createMember", tag = "admin",
    request_body = NewMemberBody,
    responses((status = 201, description = "The member.", body = CoreObject),
        (status = 409, response = Conflict), (status = 422, response = Unprocessable)))]
async fn create_member(
    State(s): State<AppState>,
    id: Identity,
    ApiJson(b): ApiJson<NewMemberBody>,
) -> Result<Response, ApiError> {
    admin(&id)?;
    Ok(reply(
        StatusCode::CREATED,
        &s.broker.create_member(&b.id, &b.name).await?,
    ))
}

/// Lists the members.
#[utoipa::path(get, path = "/admin/members", operation_id = "listMembers", tag = "admin",
    responses((status = 200, description = "`{items}`.", body = CoreObject)))]
async fn list_members(State(s): State<AppState>, id: Identity) -> Result<Response, ApiError> {
    admin(&id)?;
    Ok(reply(
        StatusCode::OK,
        &json!({"items": s.broker.members()?}),
    ))
}

/// Removes a member without applications.
#[utoipa::path(delete, path = "/admin/members/{member}", operation_id = "deleteMember",
    tag = "admin",
    params(("member" = String, Path, description = "`INSTANCE/CLASS/CODE`, with each `/` as `%2F`.")),
    responses((status = 204, description = "Removed."), (status = 404, response = NotFound),
        (status = 422, response = Unprocessable)))]
async fn delete_member(
    State(s): State<AppState>,
    id: Identity,
    Path(member): Path<String>,
) -> Result<StatusCode, ApiError> {
    admin(&id)?;
    s.broker.delete_member(&member).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A new application of a member.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewApplicationBody {
    /// The member, `INSTANCE/CLASS/CODE`.
    member: String,
    /// The application's code; its id becomes `MEMBER/code`.
    code: String,
    /// A name for people.
    #[serde(default)]
    name: String,
}

/// Registers an application of a member.
#[utoipa::path(post, path = "/admin/applications", operation_id = "createApplication",
    tag = "admin", request_body = NewApplicationBody,
    responses((status = 201, description = "The application.", body = CoreObject),
        (status = 404, response = NotFound), (status = 409, response = Conflict),
        (status = 422, response = Unprocessable)))]
async fn create_application(
    State(s): State<AppState>,
    id: Identity,
    ApiJson(b): ApiJson<NewApplicationBody>,
) -> Result<Response, ApiError> {
    admin(&id)?;
    Ok(reply(
        StatusCode::CREATED,
        &s.broker
            .create_application(&b.member, &b.code, &b.name)
            .await?,
    ))
}

/// Filters for listings by member or application.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct OwnerQuery {
    /// Only this member's applications.
    member: Option<String>,
    /// Only this application's clients or rights.
    application: Option<String>,
}

/// Lists applications.
#[utoipa::path(get, path = "/admin/applications", operation_id = "listApplications",
    tag = "admin", params(OwnerQuery),
    responses((status = 200, description = "`{items}`.", body = CoreObject)))]
async fn list_applications(
    State(s): State<AppState>,
    id: Identity,
    Query(q): Query<OwnerQuery>,
) -> Result<Response, ApiError> {
    admin(&id)?;
    Ok(reply(
        StatusCode::OK,
        &json!({"items": s.broker.applications(q.member.as_deref())?}),
    ))
}

/// Removes an application with its clients and rights.
#[utoipa::path(delete, path = "/admin/applications/{application}",
    operation_id = "deleteApplication", tag = "admin",
    params(("application" = String, Path, description = "`INSTANCE/CLASS/CODE/APPLICATION`, `/` as `%2F`.")),
    responses((status = 204, description = "Removed."), (status = 404, response = NotFound)))]
async fn delete_application(
    State(s): State<AppState>,
    id: Identity,
    Path(app): Path<String>,
) -> Result<StatusCode, ApiError> {
    admin(&id)?;
    s.broker.delete_application(&principal(&app)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A new API client.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewClientBody {
    /// The application it acts for.
    application: String,
    /// Its id (generated when absent).
    client_id: Option<String>,
    /// Its secret, at least 16 bytes (generated when absent).
    client_secret: Option<String>,
}

/// Creates an API client; the answer shows its secret, once.
#[utoipa::path(post, path = "/admin/clients", operation_id = "createClient", tag = "admin",
    request_body = NewClientBody,
    responses((status = 201, description = "`{client, client_secret}`.", body = CoreObject),
        (status = 404, response = NotFound), (status = 409, response = Conflict),
        (status = 422, response = Unprocessable)))]
async fn create_client(
    State(s): State<AppState>,
    id: Identity,
    ApiJson(b): ApiJson<NewClientBody>,
) -> Result<Response, ApiError> {
    admin(&id)?;
    let (client, secret) = s
        .broker
        .create_client(&principal(&b.application)?, b.client_id, b.client_secret)
        .await?;
    Ok(reply(
        StatusCode::CREATED,
        &json!({"client": client, "client_secret": secret}),
    ))
}

/// Lists API clients (never their secrets).
#[utoipa::path(get, path = "/admin/clients", operation_id = "listClients", tag = "admin",
    params(OwnerQuery),
    responses((status = 200, description = "`{items}`.", body = CoreObject)))]
async fn list_clients(
    State(s): State<AppState>,
    id: Identity,
    Query(q): Query<OwnerQuery>,
) -> Result<Response, ApiError> {
    admin(&id)?;
    let app = q.application.as_deref().map(principal).transpose()?;
    Ok(reply(
        StatusCode::OK,
        &json!({"items": s.broker.clients(app.as_ref())?}),
    ))
}

/// Reads an API client.
#[utoipa::path(get, path = "/admin/clients/{client_id}", operation_id = "getClient",
    tag = "admin", params(("client_id" = String, Path, description = "The client id.")),
    responses((status = 200, description = "The client.", body = CoreObject),
        (status = 404, response = NotFound)))]
async fn read_client(
    State(s): State<AppState>,
    id: Identity,
    Path(client): Path<String>,
) -> Result<Response, ApiError> {
    admin(&id)?;
    Ok(reply(StatusCode::OK, &s.broker.client(&client)?))
}

/// Removes an API client: its tokens stop working at once.
#[utoipa::path(delete, path = "/admin/clients/{client_id}", operation_id = "deleteClient",
    tag = "admin", params(("client_id" = String, Path, description = "The client id.")),
    responses((status = 204, description = "Removed."), (status = 404, response = NotFound)))]
async fn delete_client(
    State(s): State<AppState>,
    id: Identity,
    Path(client): Path<String>,
) -> Result<StatusCode, ApiError> {
    admin(&id)?;
    s.broker.delete_client(&client).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A new secret for rotation.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct NewSecretBody {
    /// The secret, at least 16 bytes (generated when absent).
    client_secret: Option<String>,
}

/// Adds a second secret to a client, for rotation; the answer shows it, once.
#[utoipa::path(post, path = "/admin/clients/{client_id}/secrets", operation_id = "addClientSecret",
    tag = "admin", params(("client_id" = String, Path, description = "The client id.")),
    request_body = NewSecretBody,
    responses((status = 201, description = "`{secret, client_secret}`.", body = CoreObject),
        (status = 404, response = NotFound), (status = 422, response = Unprocessable)))]
async fn add_secret(
    State(s): State<AppState>,
    id: Identity,
    Path(client): Path<String>,
    headers: axum::http::HeaderMap,
    super::RawBody(body): super::RawBody,
) -> Result<Response, ApiError> {
    admin(&id)?;
    let b: NewSecretBody = super::optional_json(&headers, &body)?;
    let (info, secret) = s.broker.add_client_secret(&client, b.client_secret).await?;
    Ok(reply(
        StatusCode::CREATED,
        &json!({"secret": info, "client_secret": secret}),
    ))
}

/// Revokes one secret of a client (not its last).
#[utoipa::path(delete, path = "/admin/clients/{client_id}/secrets/{secret_id}",
    operation_id = "revokeClientSecret", tag = "admin",
    params(("client_id" = String, Path, description = "The client id."),
        ("secret_id" = u32, Path, description = "The secret's number.")),
    responses((status = 200, description = "The client after.", body = CoreObject),
        (status = 404, response = NotFound), (status = 422, response = Unprocessable)))]
async fn revoke_secret(
    State(s): State<AppState>,
    id: Identity,
    Path((client, secret_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    admin(&id)?;
    let n: u32 = secret_id
        .parse()
        .map_err(|_| ApiError::param("secret_id", "must be a number"))?;
    Ok(reply(
        StatusCode::OK,
        &s.broker.revoke_client_secret(&client, n).await?,
    ))
}

/// A right to give or take.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    /// The application, `INSTANCE/CLASS/MEMBER/APPLICATION`.
    principal: String,
    /// `admin`, `room_manager`, `publisher` or `subscriber`.
    #[schema(value_type = String)]
    role: Role,
    /// The Room (all roles but `admin`).
    room: Option<String>,
    /// Publisher and subscriber only: just these event types.
    event_types: Option<Vec<String>>,
    /// Publisher only: just events with these ordering keys (on the `irc` Room, the centres
    /// the application posts for).
    keys: Option<Vec<String>>,
}

impl GrantBody {
    fn parts(&self) -> Result<(Principal, Option<RoomName>), ApiError> {
        Ok((
            principal(&self.principal)?,
            self.room
                .as_deref()
                .map(|r| parse("room", r, RoomName::new))
                .transpose()?,
        ))
    }
}

/// Gives a right (giving one that exists replaces it).
#[utoipa::path(post, path = "/admin/grants", operation_id = "createGrant", tag = "admin",
    request_body = GrantBody,
    responses((status = 201, description = "The right.", body = CoreObject),
        (status = 404, response = NotFound), (status = 422, response = Unprocessable)))]
async fn create_grant(
    State(s): State<AppState>,
    id: Identity,
    ApiJson(b): ApiJson<GrantBody>,
) -> Result<Response, ApiError> {
    admin(&id)?;
    let (p, room) = b.parts()?;
    let types = b
        .event_types
        .as_ref()
        .map(|ts| {
            ts.iter()
                .map(|t| parse("event_types", t, EventTypeName::new))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    Ok(reply(
        StatusCode::CREATED,
        &s.broker
            .grant_limited(&p, b.role, room, types, b.keys)
            .await?,
    ))
}

/// Lists rights.
#[utoipa::path(get, path = "/admin/grants", operation_id = "listGrants", tag = "admin",
    params(OwnerQuery),
    responses((status = 200, description = "`{items}`.", body = CoreObject)))]
async fn list_grants(
    State(s): State<AppState>,
    id: Identity,
    Query(q): Query<OwnerQuery>,
) -> Result<Response, ApiError> {
    admin(&id)?;
    let app = q.application.as_deref().map(principal).transpose()?;
    Ok(reply(
        StatusCode::OK,
        &json!({"items": s.broker.grants(app.as_ref())?}),
    ))
}

/// Takes a right away (`event_types` and `keys` are ignored).
#[utoipa::path(post, path = "/admin/grants/revoke", operation_id = "revokeGrant", tag = "admin",
    request_body = GrantBody,
    responses((status = 204, description = "Taken away."), (status = 404, response = NotFound)))]
async fn revoke_grant(
    State(s): State<AppState>,
    id: Identity,
    ApiJson(b): ApiJson<GrantBody>,
) -> Result<StatusCode, ApiError> {
    admin(&id)?;
    let (p, room) = b.parts()?;
    s.broker.revoke(&p, b.role, room.as_ref()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Filters of the audit log.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// Only this actor.
    actor: Option<String>,
    /// Only actions starting with this (e.g. `DELETE` or `POST /v1/rooms`).
    action: Option<String>,
    /// Only targets starting with this.
    target: Option<String>,
    /// `success` or `failure`.
    outcome: Option<String>,
    /// RFC 3339: entries at or after.
    since: Option<String>,
    /// RFC 3339: entries before.
    until: Option<String>,
    /// Page size (default 100).
    limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// The audit log of administrative changes, oldest first.
#[utoipa::path(get, path = "/admin/audit", operation_id = "listAudit", tag = "admin",
    params(AuditQuery),
    responses((status = 200, description = "`{items, next_cursor}`.", body = CoreObject),
        (status = 400, response = BadRequest)))]
async fn audit(
    State(s): State<AppState>,
    id: Identity,
    Query(q): Query<AuditQuery>,
) -> Result<Response, ApiError> {
    admin(&id)?;
    let time = |name: &str, raw: &Option<String>| {
        raw.as_deref()
            .map(|t| {
                broker_core::Timestamp::parse_rfc3339(t)
                    .ok_or_else(|| ApiError::param(name, "not an RFC 3339 time"))
            })
            .transpose()
    };
    if let Some(o) = q.outcome.as_deref() {
        if o != "success" && o != "failure" {
            return Err(ApiError::param("outcome", "`success` or `failure`"));
        }
    }
    let filter = AuditFilter {
        actor: q.actor.as_deref().map(principal).transpose()?,
        action: q.action.clone(),
        target: q.target.clone(),
        outcome: q.outcome.clone(),
        since: time("since", &q.since)?,
        until: time("until", &q.until)?,
        limit: q.limit,
        cursor: q.cursor.clone(),
    };
    Ok(reply(StatusCode::OK, &s.broker.audit(filter)?))
}

/// The host's state: version, uptime, OS, CPUs, load, memory, free disk space of the data
/// folder and requests in flight. Values the platform does not offer are `null`.
#[utoipa::path(get, path = "/admin/system", operation_id = "systemInfo", tag = "admin",
    responses((status = 200, description = "The host's state.", body = crate::system::SystemInfo)))]
async fn system(State(s): State<AppState>, id: Identity) -> Result<Response, ApiError> {
    admin(&id)?;
    let dir = s
        .database_path
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    // Reading /proc and statvfs touches the file system: keep it off the async workers.
    let info = tokio::task::spawn_blocking(move || crate::system::read(&dir))
        .await
        .map_err(|e| {
            ApiError::Core(broker_core::Error::Storage(format!(
                "cannot read the system state: {e}"
            )))
        })?;
    Ok(reply(StatusCode::OK, &info))
}
