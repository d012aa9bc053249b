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
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::broker::{unexpected, Broker};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::ids::Principal;
use crate::rights::Rights;
use crate::storage::{RecordKind, RecordOp, RecordTxn, WriteOp, WriteOutput};

/// The identity reads that every authenticated request makes (the token's client, then the
/// application's rights), kept between writes. Each answer is cached under the write
/// generation it was read at; every committed write other than a publish or a delivery outcome
/// moves the generation on before its caller hears back (see `Broker::write`), so a revoked
/// grant or a deleted client stops working exactly when it did without the cache: at the
/// commit. In the profile of the authenticated publish (BENCHMARKS.md, issue 8) these two
/// reads were 10% of all samples.
///
/// On a store shared with other brokers (`Storage::shared`) the cache is off: another node's
/// revocation commits without this broker's writer, so nothing here would move the generation
/// on, and a revoked client would stay valid on this node. Every check then reads storage.
#[derive(Default)]
pub(crate) struct IdentityCache {
    generation: std::sync::atomic::AtomicU64,
    entries: std::sync::Mutex<IdentityEntries>,
    off: bool,
}

#[derive(Default)]
pub(crate) struct IdentityEntries {
    /// The generation every entry was read at; older entries are dropped together.
    generation: u64,
    pub(crate) clients: std::collections::HashMap<String, ApiClient>,
    pub(crate) rights: std::collections::HashMap<Principal, Rights>,
}

impl IdentityCache {
    /// Most entries of each kind kept at once; the cache starts again empty when full.
    const ENTRIES_MAX: usize = 10_000;

    /// A cache that keeps nothing (a store shared with other brokers).
    pub(crate) fn off() -> IdentityCache {
        IdentityCache {
            off: true,
            ..IdentityCache::default()
        }
    }

    /// Called after a write that may change identities has committed.
    pub(crate) fn invalidate(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    pub(crate) fn now(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, IdentityEntries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached answer of `pick`, if it was read at the current generation.
    pub(crate) fn get<T: Clone>(
        &self,
        pick: impl FnOnce(&IdentityEntries) -> Option<&T>,
    ) -> Option<T> {
        if self.off {
            return None;
        }
        let generation = self.now();
        let e = self.entries();
        if e.generation != generation {
            return None;
        }
        pick(&e).cloned()
    }

    /// Keeps an answer read at `generation`, unless a write has moved the generation on since
    /// (the answer may then be stale, and the next read fetches it again).
    pub(crate) fn put(&self, generation: u64, put: impl FnOnce(&mut IdentityEntries)) {
        if self.off {
            return;
        }
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
pub(crate) const LIST_MAX: usize = 1000;

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

pub(crate) fn not_found(kind: RecordKind, id: &str) -> Error {
    Error::IdentityNotFound {
        kind: kind.as_str(),
        id: id.to_string(),
    }
}

pub(crate) fn to_bytes<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::Storage(format!("encode record: {e}")))
}

pub(crate) fn from_bytes<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| Error::Storage(format!("decode record: {e}")))
}

pub(crate) fn get<T: for<'de> Deserialize<'de>>(
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

/// How many client secret checks may run at once: `limits.secret_checks_max`, or one per
/// available core when it is zero.
pub(crate) fn secret_checks(limits: &crate::config::Limits) -> usize {
    match limits.secret_checks_max {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        n => n,
    }
}

/// The delay suggested to a caller refused with [`Error::AuthenticationBusy`]: one check takes
/// tens of milliseconds, and HTTP's `Retry-After` counts whole seconds.
const AUTHENTICATION_BUSY_RETRY_MS: u64 = 1000;

/// A hash of no secret anyone has, so that an unknown client id costs as much as a wrong
/// secret and the two cannot be told apart by timing.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$\
    Z0Q0c1ZxRnpmS0hFT1ZUQ0J3d1l0Zz09ZG9ub3R1c2U";

impl Broker {
    /// One of the `limits.secret_checks_max` slots for a secret check, waiting at most
    /// `limits.secret_check_wait_ms` for it. Waiters queue in order (tokio's semaphore is fair)
    /// and are bounded by that wait and by however many requests the caller lets in at once.
    async fn secret_check_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        let slots = self.inner().secret_checks.clone();
        let busy = Error::AuthenticationBusy {
            retry_after_ms: AUTHENTICATION_BUSY_RETRY_MS,
        };
        let wait_ms = self.inner().config_now().limits.secret_check_wait_ms;
        if let Ok(permit) = slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if wait_ms == 0 {
            return Err(busy);
        }
        match tokio::time::timeout(Duration::from_millis(wait_ms), slots.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // Timed out, or the semaphore was closed (it never is).
            _ => Err(busy),
        }
    }

    /// Runs `f` in the writer's transaction as one record operation and returns its output.
    pub(crate) async fn record_op(
        &self,
        f: impl FnOnce(&mut dyn RecordTxn, Timestamp) -> Result<Vec<u8>> + Send + 'static,
    ) -> Result<Vec<u8>> {
        self.record_write(f, true).await
    }

    /// [`Broker::record_op`] for a change that cannot change who may do what (the audit log),
    /// so the identity cache stays as it is.
    pub(crate) async fn record_op_quiet(
        &self,
        f: impl FnOnce(&mut dyn RecordTxn, Timestamp) -> Result<Vec<u8>> + Send + 'static,
    ) -> Result<Vec<u8>> {
        self.record_write(f, false).await
    }

    async fn record_write(
        &self,
        f: impl FnOnce(&mut dyn RecordTxn, Timestamp) -> Result<Vec<u8>> + Send + 'static,
        rights: bool,
    ) -> Result<Vec<u8>> {
        let op = RecordOp(
            Box::new(move |tx, now| f(tx, now).map(WriteOutput::Record)),
            rights,
        );
        match self.write_op(WriteOp::Records(op)).await? {
            WriteOutput::Record(b) => Ok(b),
            other => Err(unexpected(other)),
        }
    }

    pub(crate) fn list<T: for<'de> Deserialize<'de>>(
        &self,
        kind: RecordKind,
        prefix: &str,
    ) -> Result<Vec<T>> {
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

    /// Removes an application with its clients and grants; its subscriptions are paused
    /// (reason [`crate::SUBSCRIBER_REVOKED`]) and receive nothing more.
    pub async fn delete_application(&self, id: &Principal) -> Result<()> {
        let id = id.clone();
        let app = id.clone();
        self.record_op(move |tx, _| {
            let id = app;
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
        .await?;
        // Its subscriptions stop receiving before the caller hears back.
        self.pause_revoked(Some(&id), None).await?;
        Ok(())
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
    ///
    /// At most `limits.secret_checks_max` checks run at once; a call that finds every slot
    /// taken for `limits.secret_check_wait_ms` gets [`Error::AuthenticationBusy`] without
    /// checking anything. Limiting failures per client or caller is the caller's business (the
    /// server limits them per client id and source address, which the core does not know).
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
        let permit = self.secret_check_slot().await?;
        let matched = tokio::task::spawn_blocking(move || {
            // Held until the check ends, not until the caller stops waiting for it: a caller
            // that gives up (a closed connection) must not free a slot while Argon2 still runs.
            let _permit = permit;
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
}
