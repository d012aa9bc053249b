//! Who may do what: members, their applications, the API clients that act for an application,
//! the rights granted to applications, and the audit log of administrative changes.
//!
//! The model follows the GovStack Information Mediator: a **member** is an organisation
//! (`INSTANCE/CLASS/CODE`, class such as GOV, COM or PRI), an **application** belongs to a member
//! and is the identity that publishes and subscribes (`INSTANCE/CLASS/CODE/APPLICATION`, the form
//! of the `X-GovStack-Client` header, and the [`Principal`] the rest of the core records), and an
//! **API client** (client id and one or two secrets) authenticates as an application. Secrets are
//! stored only as Argon2id hashes and shown once. Rights are **grants** to an application: the
//! administrator role, or a role on one Room (manager, publisher, subscriber), the last two
//! optionally limited to some event types.
//!
//! Tokens and HTTP are not here: a server turns a verified client into a token and a token back
//! into a principal, then asks [`Rights`] what that principal may do.

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::broker::{unexpected, Broker};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::ids::{EventTypeName, Principal, RoomName};
use crate::model::Page;
use crate::storage::{RecordKind, RecordOp, RecordTxn, WriteOp, WriteOutput};

/// The identity reads that every authenticated request makes (the token's client, then the
/// application's rights), kept between writes. Each answer is cached under the write
/// generation it was read at; every committed write other than a publish or a delivery outcome
/// moves the generation on before its caller hears back (see `Broker::write`), so a revoked
/// grant or a deleted client stops working exactly when it did without the cache: at the
/// commit. In the profile of the authenticated publish (BENCHMARKS.md, issue 8) these two
/// reads were 10% of all samples.
#[derive(Default)]
pub(crate) struct IdentityCache {
    generation: std::sync::atomic::AtomicU64,
    entries: std::sync::Mutex<IdentityEntries>,
}

#[derive(Default)]
struct IdentityEntries {
    /// The generation every entry was read at; older entries are dropped together.
    generation: u64,
    clients: std::collections::HashMap<String, ApiClient>,
    rights: std::collections::HashMap<Principal, Rights>,
}

impl IdentityCache {
    /// Most entries of each kind kept at once; the cache starts again empty when full.
    const ENTRIES_MAX: usize = 10_000;

    /// Called after a write that may change identities has committed.
    pub(crate) fn invalidate(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    fn now(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, IdentityEntries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached answer of `pick`, if it was read at the current generation.
    fn get<T: Clone>(&self, pick: impl FnOnce(&IdentityEntries) -> Option<&T>) -> Option<T> {
        let generation = self.now();
        let e = self.entries();
        if e.generation != generation {
            return None;
        }
        pick(&e).cloned()
    }

    /// Keeps an answer read at `generation`, unless a write has moved the generation on since
    /// (the answer may then be stale, and the next read fetches it again).
    fn put(&self, generation: u64, put: impl FnOnce(&mut IdentityEntries)) {
        let mut e = self.entries();
        if generation != self.now() || generation < e.generation {
            return;
        }
        if e.generation != generation
            || e.clients.len() >= Self::ENTRIES_MAX
            || e.rights.len() >= Self::ENTRIES_MAX
        {
            e.clients.clear();
            e.rights.clear();
            e.generation = generation;
        }
        put(&mut e);
    }
}

/// Most secrets a client holds at once: two, so that one can be rotated without downtime.
pub const CLIENT_SECRETS_MAX: usize = 2;
/// Shortest secret accepted from a caller, in bytes.
pub const CLIENT_SECRET_BYTES_MIN: usize = 16;
/// Longest part of a member or application identifier, in bytes.
pub const ID_PART_BYTES_MAX: usize = 64;
/// Most records one listing returns.
const LIST_MAX: usize = 1000;

/// An organisation in the ecosystem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `INSTANCE/CLASS/CODE`.
    pub id: String,
    /// A human-readable name.
    pub name: String,
    /// When it was registered.
    pub created_at: Timestamp,
}

/// An application of a member: the identity that publishes, subscribes and manages Rooms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Application {
    /// `INSTANCE/CLASS/CODE/APPLICATION`.
    pub id: Principal,
    /// The member, `INSTANCE/CLASS/CODE`.
    pub member: String,
    /// A human-readable name.
    pub name: String,
    /// When it was registered.
    pub created_at: Timestamp,
}

/// One secret of a client, without the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretInfo {
    /// Its number within the client, from 1, never reused.
    pub id: u32,
    /// When it was created.
    pub created_at: Timestamp,
}

/// An API client: credentials that authenticate as an application.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiClient {
    /// The client id.
    pub client_id: String,
    /// The application it acts for.
    pub application: Principal,
    /// Its active secrets (one or two).
    pub secrets: Vec<SecretInfo>,
    /// When it was created.
    pub created_at: Timestamp,
    /// A random id given to the client when it is created, so that a client deleted and
    /// created again under the same id is told apart from the first (a token names the
    /// incarnation it was issued to). Empty for a client created before incarnations existed;
    /// a client created since never has an empty one.
    #[serde(default)]
    pub incarnation: String,
}

/// A client as stored: with the hashes.
#[derive(Serialize, Deserialize)]
struct ClientRecord {
    client: ApiClient,
    /// Argon2id PHC strings, by secret id.
    hashes: Vec<(u32, String)>,
    next_secret: u32,
}

/// A role, global or on one Room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, everywhere: approves Rooms, manages identities and rights.
    Admin,
    /// Manages one Room: its settings, event types, subscriptions and their approval.
    RoomManager,
    /// Publishes to one Room (optionally only some event types).
    Publisher,
    /// Subscribes to one Room (optionally only some event types).
    Subscriber,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::RoomManager => "room_manager",
            Role::Publisher => "publisher",
            Role::Subscriber => "subscriber",
        }
    }
}

/// A right given to an application.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Who holds it.
    pub principal: Principal,
    /// The role.
    pub role: Role,
    /// The Room (`None` only for [`Role::Admin`]).
    pub room: Option<RoomName>,
    /// For publishers and subscribers: only these event types (`None` for all).
    pub event_types: Option<Vec<EventTypeName>>,
    /// When it was given.
    pub created_at: Timestamp,
}

impl Grant {
    fn key(principal: &Principal, role: Role, room: Option<&RoomName>) -> String {
        format!(
            "{}\u{0}{}\u{0}{}",
            principal.as_str(),
            room.map(RoomName::as_str).unwrap_or(""),
            role.as_str()
        )
    }
}

/// What one principal may do, from its grants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rights {
    grants: Vec<Grant>,
}

impl Rights {
    /// Rights that allow everything (the local administrator of an unauthenticated server).
    pub fn all(principal: Principal) -> Rights {
        Rights {
            grants: vec![Grant {
                principal,
                role: Role::Admin,
                room: None,
                event_types: None,
                created_at: Timestamp(0),
            }],
        }
    }

    /// The grants these rights come from.
    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// True for an administrator.
    pub fn is_admin(&self) -> bool {
        self.grants.iter().any(|g| g.role == Role::Admin)
    }

    fn on<'a>(&'a self, room: &'a RoomName, role: Role) -> impl Iterator<Item = &'a Grant> {
        self.grants
            .iter()
            .filter(move |g| g.role == role && g.room.as_ref() == Some(room))
    }

    /// True for an administrator or a manager of `room`.
    pub fn manages(&self, room: &RoomName) -> bool {
        self.is_admin() || self.on(room, Role::RoomManager).next().is_some()
    }

    /// True when the principal holds any right on `room` (or is an administrator).
    pub fn any_on(&self, room: &RoomName) -> bool {
        self.is_admin() || self.grants.iter().any(|g| g.room.as_ref() == Some(room))
    }

    fn typed(&self, room: &RoomName, role: Role, ty: Option<&EventTypeName>) -> bool {
        self.manages(room)
            || self.on(room, role).any(|g| match (&g.event_types, ty) {
                (None, _) => true,
                (Some(list), Some(t)) => list.contains(t),
                (Some(_), None) => false,
            })
    }

    /// True when the principal may publish `ty` to `room` (managers may too).
    pub fn can_publish(&self, room: &RoomName, ty: &EventTypeName) -> bool {
        self.typed(room, Role::Publisher, Some(ty))
    }

    /// True when the principal may subscribe to `types` of `room` (`None`: every type, which
    /// needs an unrestricted subscriber grant). Managers may too.
    pub fn can_subscribe(&self, room: &RoomName, types: Option<&[EventTypeName]>) -> bool {
        match types {
            None => self.typed(room, Role::Subscriber, None),
            Some(ts) => ts
                .iter()
                .all(|t| self.typed(room, Role::Subscriber, Some(t))),
        }
    }
}

/// One administrative change, as the audit log keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Its position in the log, from 1.
    pub seq: u64,
    /// When it happened.
    pub at: Timestamp,
    /// Who did it.
    pub actor: Principal,
    /// What was done, e.g. `POST /v1/rooms`.
    pub action: String,
    /// What it was done to, e.g. `/v1/rooms/irc`.
    pub target: String,
    /// `success` or `failure`.
    pub outcome: String,
    /// For a failure, the error code.
    pub error: Option<String>,
    /// What was changed, when the action records it (e.g. a configuration patch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// What to record in the audit log (the broker adds the sequence number and time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewAuditEntry {
    /// Who did it.
    pub actor: Principal,
    /// What was done.
    pub action: String,
    /// What it was done to.
    pub target: String,
    /// `None` for success, else the error code.
    pub error: Option<String>,
    /// What was changed, when the action records it.
    pub detail: Option<serde_json::Value>,
}

/// Which audit entries to list. Every filter is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only this actor.
    pub actor: Option<Principal>,
    /// Only actions starting with this.
    pub action: Option<String>,
    /// Only targets starting with this.
    pub target: Option<String>,
    /// Only `success` or `failure`.
    pub outcome: Option<String>,
    /// Only entries at or after this time.
    pub since: Option<Timestamp>,
    /// Only entries before this time.
    pub until: Option<Timestamp>,
    /// Page size (default 100, at most 1000).
    pub limit: Option<usize>,
    /// A cursor from a previous page.
    pub cursor: Option<String>,
}

/// Checks one part of a member or application identifier: 1 to 64 bytes of letters, digits,
/// `-`, `.`, `_`, `~` or `%` (the percent-encoded form of anything else, as in the
/// `X-GovStack-Client` header).
fn check_part(field: &str, part: &str) -> Result<()> {
    let ok = !part.is_empty()
        && part.len() <= ID_PART_BYTES_MAX
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "`{part}` must be 1 to {ID_PART_BYTES_MAX} letters, digits or -._~% (percent-encode anything else)"
            ),
        ))
    }
}

/// Checks `INSTANCE/CLASS/CODE`.
fn check_member_id(id: &str) -> Result<()> {
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() != 3 {
        return Err(Error::invalid(
            "member",
            format!("`{id}` is not INSTANCE/CLASS/CODE"),
        ));
    }
    parts.iter().try_for_each(|p| check_part("member", p))
}

fn exists(kind: RecordKind, id: &str) -> Error {
    Error::IdentityExists {
        kind: kind.as_str(),
        id: id.to_string(),
    }
}

fn not_found(kind: RecordKind, id: &str) -> Error {
    Error::IdentityNotFound {
        kind: kind.as_str(),
        id: id.to_string(),
    }
}

fn to_bytes<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::Storage(format!("encode record: {e}")))
}

fn from_bytes<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| Error::Storage(format!("decode record: {e}")))
}

fn get<T: for<'de> Deserialize<'de>>(
    tx: &dyn RecordTxn,
    kind: RecordKind,
    id: &str,
) -> Result<Option<T>> {
    tx.get(kind, id)?.map(|b| from_bytes(&b)).transpose()
}

/// A new random secret: 32 bytes, URL-safe base64.
fn random_secret() -> String {
    let mut key = Vec::with_capacity(32);
    key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    B64.encode(key)
}

fn check_secret(secret: &str) -> Result<()> {
    if secret.len() < CLIENT_SECRET_BYTES_MIN || secret.len() > 256 {
        return Err(Error::invalid(
            "client_secret",
            format!("must be {CLIENT_SECRET_BYTES_MIN} to 256 bytes"),
        ));
    }
    if secret.chars().any(char::is_control) {
        return Err(Error::invalid(
            "client_secret",
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Hashes a secret with Argon2id (slow by design: run it off the async workers).
async fn hash_secret(secret: String) -> Result<String> {
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .hash_password(secret.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| Error::Storage(format!("hash secret: {e}")))
    })
    .await
    .map_err(|e| Error::Storage(format!("hash task: {e}")))?
}

/// A hash of no secret anyone has, so that an unknown client id costs as much as a wrong
/// secret and the two cannot be told apart by timing.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$\
    Z0Q0c1ZxRnpmS0hFT1ZUQ0J3d1l0Zz09ZG9ub3R1c2U";

impl Broker {
    /// Runs `f` in the writer's transaction as one record operation and returns its output.
    pub(crate) async fn record_op(
        &self,
        f: impl FnOnce(&mut dyn RecordTxn, Timestamp) -> Result<Vec<u8>> + Send + 'static,
    ) -> Result<Vec<u8>> {
        let op = RecordOp(Box::new(move |tx, now| f(tx, now).map(WriteOutput::Record)));
        match self.write_op(WriteOp::Records(op)).await? {
            WriteOutput::Record(b) => Ok(b),
            other => Err(unexpected(other)),
        }
    }

    fn list<T: for<'de> Deserialize<'de>>(&self, kind: RecordKind, prefix: &str) -> Result<Vec<T>> {
        self.inner()
            .store
            .records(kind, prefix, None, LIST_MAX)?
            .iter()
            .map(|(_, b)| from_bytes(b))
            .collect()
    }

    // ----- Members and applications -----

    /// Registers a member organisation, `INSTANCE/CLASS/CODE`.
    pub async fn create_member(&self, id: &str, name: &str) -> Result<Member> {
        check_member_id(id)?;
        self.check_description(name)?;
        let (id, name) = (id.to_string(), name.to_string());
        let out = self
            .record_op(move |tx, now| {
                if tx.get(RecordKind::Member, &id)?.is_some() {
                    return Err(exists(RecordKind::Member, &id));
                }
                let m = Member {
                    id: id.clone(),
                    name,
                    created_at: now,
                };
                tx.put(RecordKind::Member, &id, &to_bytes(&m)?)?;
                to_bytes(&m)
            })
            .await?;
        from_bytes(&out)
    }

    /// Every member, in id order.
    pub fn members(&self) -> Result<Vec<Member>> {
        self.list(RecordKind::Member, "")
    }

    /// Removes a member; refused while it has applications.
    pub async fn delete_member(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.record_op(move |tx, _| {
            if !tx
                .ids(RecordKind::Application, &format!("{id}/"), 1)?
                .is_empty()
            {
                return Err(Error::invalid(
                    "member",
                    "it still has applications; delete them first",
                ));
            }
            if !tx.delete(RecordKind::Member, &id)? {
                return Err(not_found(RecordKind::Member, &id));
            }
            Ok(Vec::new())
        })
        .await
        .map(|_| ())
    }

    /// Registers an application `code` of member `member`; its id is `MEMBER/code`.
    pub async fn create_application(
        &self,
        member: &str,
        code: &str,
        name: &str,
    ) -> Result<Application> {
        check_member_id(member)?;
        check_part("application", code)?;
        self.check_description(name)?;
        let id = Principal::new(format!("{member}/{code}"))?;
        let (member, name) = (member.to_string(), name.to_string());
        let out = self
            .record_op(move |tx, now| {
                if tx.get(RecordKind::Member, &member)?.is_none() {
                    return Err(not_found(RecordKind::Member, &member));
                }
                if tx.get(RecordKind::Application, id.as_str())?.is_some() {
                    return Err(exists(RecordKind::Application, id.as_str()));
                }
                let a = Application {
                    id: id.clone(),
                    member,
                    name,
                    created_at: now,
                };
                tx.put(RecordKind::Application, id.as_str(), &to_bytes(&a)?)?;
                to_bytes(&a)
            })
            .await?;
        from_bytes(&out)
    }

    /// One application.
    pub fn application(&self, id: &Principal) -> Result<Application> {
        self.inner()
            .store
            .record(RecordKind::Application, id.as_str())?
            .map(|b| from_bytes(&b))
            .transpose()?
            .ok_or_else(|| not_found(RecordKind::Application, id.as_str()))
    }

    /// Applications, of one member or all.
    pub fn applications(&self, member: Option<&str>) -> Result<Vec<Application>> {
        let prefix = member.map(|m| format!("{m}/")).unwrap_or_default();
        self.list(RecordKind::Application, &prefix)
    }

    /// Removes an application with its clients and grants.
    pub async fn delete_application(&self, id: &Principal) -> Result<()> {
        let id = id.clone();
        self.record_op(move |tx, _| {
            if !tx.delete(RecordKind::Application, id.as_str())? {
                return Err(not_found(RecordKind::Application, id.as_str()));
            }
            for client in tx.ids(RecordKind::Client, "", LIST_MAX * 10)? {
                let rec: Option<ClientRecord> = get(tx, RecordKind::Client, &client)?;
                if rec.is_some_and(|r| r.client.application == id) {
                    tx.delete(RecordKind::Client, &client)?;
                }
            }
            for g in tx.ids(
                RecordKind::Grant,
                &format!("{}\u{0}", id.as_str()),
                LIST_MAX,
            )? {
                tx.delete(RecordKind::Grant, &g)?;
            }
            Ok(Vec::new())
        })
        .await
        .map(|_| ())
    }

    // ----- API clients -----

    /// Creates an API client for an application, with the given id and secret or generated
    /// ones. Returns the client and its secret, which is not kept and cannot be shown again.
    pub async fn create_client(
        &self,
        application: &Principal,
        client_id: Option<String>,
        secret: Option<String>,
    ) -> Result<(ApiClient, String)> {
        let client_id = client_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        check_part("client_id", &client_id)?;
        let secret = secret.unwrap_or_else(random_secret);
        check_secret(&secret)?;
        let hash = hash_secret(secret.clone()).await?;
        let application = application.clone();
        let out = self
            .record_op(move |tx, now| {
                if tx
                    .get(RecordKind::Application, application.as_str())?
                    .is_none()
                {
                    return Err(not_found(RecordKind::Application, application.as_str()));
                }
                if tx.get(RecordKind::Client, &client_id)?.is_some() {
                    return Err(exists(RecordKind::Client, &client_id));
                }
                let rec = ClientRecord {
                    client: ApiClient {
                        client_id: client_id.clone(),
                        application,
                        secrets: vec![SecretInfo {
                            id: 1,
                            created_at: now,
                        }],
                        created_at: now,
                        incarnation: uuid::Uuid::new_v4().simple().to_string(),
                    },
                    hashes: vec![(1, hash)],
                    next_secret: 2,
                };
                tx.put(RecordKind::Client, &client_id, &to_bytes(&rec)?)?;
                to_bytes(&rec.client)
            })
            .await?;
        Ok((from_bytes(&out)?, secret))
    }

    /// One client (without its secrets).
    pub fn client(&self, client_id: &str) -> Result<ApiClient> {
        let cache = &self.inner().identities;
        if let Some(c) = cache.get(|e| e.clients.get(client_id)) {
            return Ok(c);
        }
        let generation = cache.now();
        let client = self
            .inner()
            .store
            .record(RecordKind::Client, client_id)?
            .map(|b| from_bytes::<ClientRecord>(&b))
            .transpose()?
            .map(|r| r.client)
            .ok_or_else(|| not_found(RecordKind::Client, client_id))?;
        cache.put(generation, |e| {
            e.clients.insert(client_id.to_string(), client.clone());
        });
        Ok(client)
    }

    /// Clients, of one application or all.
    pub fn clients(&self, application: Option<&Principal>) -> Result<Vec<ApiClient>> {
        Ok(self
            .list::<ClientRecord>(RecordKind::Client, "")?
            .into_iter()
            .map(|r| r.client)
            .filter(|c| application.is_none_or(|a| &c.application == a))
            .collect())
    }

    /// Adds a second secret for rotation; refused when the client already has two. Returns the
    /// new secret's info and the secret, shown only this once.
    pub async fn add_client_secret(
        &self,
        client_id: &str,
        secret: Option<String>,
    ) -> Result<(SecretInfo, String)> {
        let secret = secret.unwrap_or_else(random_secret);
        check_secret(&secret)?;
        let hash = hash_secret(secret.clone()).await?;
        let client_id = client_id.to_string();
        let out = self
            .record_op(move |tx, now| {
                let mut rec: ClientRecord = get(tx, RecordKind::Client, &client_id)?
                    .ok_or_else(|| not_found(RecordKind::Client, &client_id))?;
                if rec.hashes.len() >= CLIENT_SECRETS_MAX {
                    return Err(Error::limit(
                        "client_secrets_max",
                        CLIENT_SECRETS_MAX as u64,
                        rec.hashes.len() as u64 + 1,
                    ));
                }
                let info = SecretInfo {
                    id: rec.next_secret,
                    created_at: now,
                };
                rec.next_secret += 1;
                rec.hashes.push((info.id, hash));
                rec.client.secrets.push(info.clone());
                tx.put(RecordKind::Client, &client_id, &to_bytes(&rec)?)?;
                to_bytes(&info)
            })
            .await?;
        Ok((from_bytes(&out)?, secret))
    }

    /// Revokes one secret of a client; refused for its last one (delete the client instead).
    pub async fn revoke_client_secret(&self, client_id: &str, secret_id: u32) -> Result<ApiClient> {
        let client_id = client_id.to_string();
        let out = self
            .record_op(move |tx, _| {
                let mut rec: ClientRecord = get(tx, RecordKind::Client, &client_id)?
                    .ok_or_else(|| not_found(RecordKind::Client, &client_id))?;
                if !rec.hashes.iter().any(|(id, _)| *id == secret_id) {
                    return Err(not_found(
                        RecordKind::Client,
                        &format!("{client_id} secret {secret_id}"),
                    ));
                }
                if rec.hashes.len() == 1 {
                    return Err(Error::invalid(
                        "secret",
                        "a client's last secret cannot be revoked; delete the client instead",
                    ));
                }
                rec.hashes.retain(|(id, _)| *id != secret_id);
                rec.client.secrets.retain(|s| s.id != secret_id);
                tx.put(RecordKind::Client, &client_id, &to_bytes(&rec)?)?;
                to_bytes(&rec.client)
            })
            .await?;
        from_bytes(&out)
    }

    /// Removes a client: its secrets stop working at once.
    pub async fn delete_client(&self, client_id: &str) -> Result<()> {
        let client_id = client_id.to_string();
        self.record_op(move |tx, _| {
            if tx.delete(RecordKind::Client, &client_id)? {
                Ok(Vec::new())
            } else {
                Err(not_found(RecordKind::Client, &client_id))
            }
        })
        .await
        .map(|_| ())
    }

    /// Checks a client's credentials and says which of its secrets matched (its
    /// [`SecretInfo::id`]), so that what is issued on the strength of that secret can be
    /// withdrawn with it. [`Error::InvalidClient`] for an unknown id or a wrong secret alike,
    /// after the same amount of work, so that neither can be told from the other.
    pub async fn authenticate_client(
        &self,
        client_id: &str,
        secret: &str,
    ) -> Result<(ApiClient, u32)> {
        let rec: Option<ClientRecord> = self
            .inner()
            .store
            .record(RecordKind::Client, client_id)?
            .map(|b| from_bytes(&b))
            .transpose()?;
        let hashes: Vec<(u32, String)> = match &rec {
            Some(r) => r.hashes.clone(),
            None => vec![(0, DUMMY_HASH.to_string())],
        };
        let secret = secret.to_string();
        let matched = tokio::task::spawn_blocking(move || {
            hashes.iter().find_map(|(id, h)| {
                PasswordHash::new(h)
                    .is_ok_and(|p| {
                        Argon2::default()
                            .verify_password(secret.as_bytes(), &p)
                            .is_ok()
                    })
                    .then_some(*id)
            })
        })
        .await
        .map_err(|e| Error::Storage(format!("verify task: {e}")))?;
        match (rec, matched) {
            (Some(r), Some(id)) => Ok((r.client, id)),
            _ => Err(Error::InvalidClient),
        }
    }

    // ----- Rights -----

    /// Gives a right. A Room role needs the Room to exist; the administrator role takes no
    /// Room; event types limit only publishers and subscribers. Giving a right that exists
    /// replaces it (so its event types can be changed).
    pub async fn grant(
        &self,
        principal: &Principal,
        role: Role,
        room: Option<RoomName>,
        event_types: Option<Vec<EventTypeName>>,
    ) -> Result<Grant> {
        match (role, &room) {
            (Role::Admin, Some(_)) => {
                return Err(Error::invalid(
                    "room",
                    "the admin role is global: give no room",
                ))
            }
            (Role::Admin, None) => {}
            (_, None) => return Err(Error::invalid("room", "this role needs a room")),
            _ => {}
        }
        if event_types.is_some() && !matches!(role, Role::Publisher | Role::Subscriber) {
            return Err(Error::invalid(
                "event_types",
                "only publisher and subscriber rights are limited to event types",
            ));
        }
        let principal = principal.clone();
        let out = self
            .record_op(move |tx, now| {
                if tx
                    .get(RecordKind::Application, principal.as_str())?
                    .is_none()
                {
                    return Err(not_found(RecordKind::Application, principal.as_str()));
                }
                if let Some(r) = &room {
                    if !tx.room_exists(r)? {
                        return Err(Error::RoomNotFound {
                            room: r.to_string(),
                        });
                    }
                }
                let g = Grant {
                    principal,
                    role,
                    room,
                    event_types,
                    created_at: now,
                };
                let key = Grant::key(&g.principal, g.role, g.room.as_ref());
                tx.put(RecordKind::Grant, &key, &to_bytes(&g)?)?;
                to_bytes(&g)
            })
            .await?;
        from_bytes(&out)
    }

    /// Takes a right away.
    pub async fn revoke(
        &self,
        principal: &Principal,
        role: Role,
        room: Option<&RoomName>,
    ) -> Result<()> {
        let key = Grant::key(principal, role, room);
        self.record_op(move |tx, _| {
            if tx.delete(RecordKind::Grant, &key)? {
                Ok(Vec::new())
            } else {
                Err(not_found(RecordKind::Grant, &key.replace('\u{0}', " ")))
            }
        })
        .await
        .map(|_| ())
    }

    /// Grants, of one principal or all.
    pub fn grants(&self, principal: Option<&Principal>) -> Result<Vec<Grant>> {
        let prefix = principal
            .map(|p| format!("{}\u{0}", p.as_str()))
            .unwrap_or_default();
        self.list(RecordKind::Grant, &prefix)
    }

    /// What `principal` may do.
    pub fn rights(&self, principal: &Principal) -> Result<Rights> {
        let cache = &self.inner().identities;
        if let Some(r) = cache.get(|e| e.rights.get(principal)) {
            return Ok(r);
        }
        let generation = cache.now();
        let rights = Rights {
            grants: self.grants(Some(principal))?,
        };
        cache.put(generation, |e| {
            e.rights.insert(principal.clone(), rights.clone());
        });
        Ok(rights)
    }

    // ----- Keys -----

    /// A random 32-byte key kept in the database under `name`, created on first use: for a
    /// host's secrets that must survive restarts and travel with the data (a server signs its
    /// access tokens with one). Anyone who can read the data folder can read it, as with a key
    /// file beside the database.
    pub async fn host_key(&self, name: &str) -> Result<Vec<u8>> {
        if let Some(k) = self.inner().store.record(RecordKind::Key, name)? {
            return Ok(k);
        }
        let fresh = {
            let mut k = Vec::with_capacity(32);
            k.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
            k.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
            k
        };
        let name = name.to_string();
        // The first writer wins; a concurrent caller gets the stored key, not its own.
        self.record_op(move |tx, _| match tx.get(RecordKind::Key, &name)? {
            Some(k) => Ok(k),
            None => {
                tx.put(RecordKind::Key, &name, &fresh)?;
                Ok(fresh)
            }
        })
        .await
    }

    // ----- Audit -----

    /// Appends an entry to the audit log.
    pub async fn record_audit(&self, entry: NewAuditEntry) -> Result<AuditEntry> {
        let out = self
            .record_op(move |tx, now| {
                let mut e = AuditEntry {
                    seq: 0,
                    at: now,
                    actor: entry.actor,
                    action: entry.action,
                    target: entry.target,
                    outcome: if entry.error.is_some() {
                        "failure".into()
                    } else {
                        "success".into()
                    },
                    error: entry.error,
                    detail: entry.detail,
                };
                // The sequence number is the key; storing it inside too keeps entries whole.
                let bytes = to_bytes(&e)?;
                e.seq = tx.append_audit(&bytes)?;
                to_bytes(&e)
            })
            .await?;
        from_bytes(&out)
    }

    /// A page of the audit log, oldest first.
    pub fn audit(&self, filter: AuditFilter) -> Result<Page<AuditEntry>> {
        let limit = filter.limit.unwrap_or(100).clamp(1, LIST_MAX);
        let mut after = match &filter.cursor {
            None => 0,
            Some(c) => c
                .parse::<u64>()
                .map_err(|_| Error::invalid("cursor", "not a cursor this listing returned"))?,
        };
        let scan_max = self.config().delivery.scan_records_max;
        let mut items = Vec::new();
        let mut scanned = 0;
        loop {
            let batch = self.inner().store.audit(after, 256)?;
            if batch.is_empty() {
                return Ok(Page {
                    items,
                    next_cursor: None,
                });
            }
            for (seq, bytes) in batch {
                if items.len() >= limit || scanned >= scan_max {
                    return Ok(Page {
                        items,
                        next_cursor: Some(after.to_string()),
                    });
                }
                scanned += 1;
                after = seq;
                let mut e: AuditEntry = from_bytes(&bytes)?;
                e.seq = seq;
                let keep = filter.actor.as_ref().is_none_or(|a| *a == e.actor)
                    && filter
                        .action
                        .as_deref()
                        .is_none_or(|a| e.action.starts_with(a))
                    && filter
                        .target
                        .as_deref()
                        .is_none_or(|t| e.target.starts_with(t))
                    && filter.outcome.as_deref().is_none_or(|o| e.outcome == o)
                    && filter.since.is_none_or(|s| e.at >= s)
                    && filter.until.is_none_or(|u| e.at < u);
                if keep {
                    items.push(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_checked() {
        assert!(check_member_id("UK/GOV/HO").is_ok());
        assert!(check_member_id("neverland/GOV/city%2Dhospital").is_ok());
        assert!(check_member_id("UK/GOV").is_err());
        assert!(check_member_id("UK/GOV/H O").is_err());
        assert!(check_member_id("UK//HO").is_err());
    }

    #[test]
    fn the_dummy_hash_parses_so_unknown_clients_cost_a_verification() {
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }

    fn grant(role: Role, room: Option<&str>, types: Option<&[&str]>) -> Grant {
        Grant {
            principal: Principal::new("a/B/c/d").unwrap(),
            role,
            room: room.map(|r| RoomName::new(r).unwrap()),
            event_types: types
                .map(|ts| ts.iter().map(|t| EventTypeName::new(*t).unwrap()).collect()),
            created_at: Timestamp(0),
        }
    }

    #[test]
    fn rights_follow_grants() {
        let r1 = RoomName::new("r1").unwrap();
        let r2 = RoomName::new("r2").unwrap();
        let a = EventTypeName::new("a").unwrap();
        let b = EventTypeName::new("b").unwrap();
        let rights = Rights {
            grants: vec![
                grant(Role::Publisher, Some("r1"), Some(&["a"])),
                grant(Role::Subscriber, Some("r1"), None),
                grant(Role::RoomManager, Some("r2"), None),
            ],
        };
        assert!(!rights.is_admin());
        assert!(rights.can_publish(&r1, &a));
        assert!(!rights.can_publish(&r1, &b));
        assert!(rights.can_subscribe(&r1, None));
        assert!(rights.can_subscribe(&r1, Some(&[a.clone(), b.clone()])));
        assert!(!rights.manages(&r1));
        assert!(rights.manages(&r2));
        assert!(rights.can_publish(&r2, &b), "managers publish");
        assert!(rights.any_on(&r1) && rights.any_on(&r2));
        assert!(!rights.any_on(&RoomName::new("r3").unwrap()));
        let narrow = Rights {
            grants: vec![grant(Role::Subscriber, Some("r1"), Some(&["a"]))],
        };
        assert!(
            !narrow.can_subscribe(&r1, None),
            "all types needs an unrestricted grant"
        );
        assert!(narrow.can_subscribe(&r1, Some(std::slice::from_ref(&a))));
        assert!(Rights::all(Principal::new("x").unwrap()).manages(&r1));
    }
}
