//! Rights: the roles given to applications (administrator, or manager, publisher or
//! subscriber of one Room), what they allow, and what happens to things already running when
//! a right is taken away.
//!
//! A right on a Room is bound to the Room's **incarnation**: a Room deleted and created again
//! under the same name starts with no rights but its creator's, and a right given on the old
//! Room never applies to the new one, even if its record was not yet removed. Rights are checked
//! on every use, not only when a thing is created: a subscription whose subscriber no longer
//! holds the right to receive it is paused with the reason [`SUBSCRIBER_REVOKED`], and neither
//! pushes, pulls, seeks nor resumes until the right is given back.

use serde::{Deserialize, Serialize};

use crate::broker::Broker;
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::identity::{from_bytes, get, not_found, to_bytes};
use crate::ids::{EventTypeName, Principal, RoomName, SubscriptionId};
use crate::storage::{DeliveryOp, RecordKind, WriteOp};
use crate::subscription::{Subscription, SubscriptionStatus};

/// The reason given to a subscription paused because its subscriber lost the right to receive
/// it (a revoked grant, a deleted application).
pub const SUBSCRIBER_REVOKED: &str = "subscriber_revoked";

/// Most grant records read when looking for the grants of one Room (all of a broker's grants;
/// a broker has a few per application).
const GRANTS_SCAN_MAX: usize = 1_000_000;

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
    /// The incarnation of the Room the right was given on. A Room deleted and created again
    /// under the same name is a new incarnation, and the rights given on the old one do not
    /// apply to it. `None` only in grants stored before incarnations were recorded; those
    /// apply only to a Room created no later than the grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_id: Option<u64>,
    /// For publishers and subscribers: only these event types (`None` for all).
    pub event_types: Option<Vec<EventTypeName>>,
    /// For publishers: only events whose ordering key is one of these (`None` for any key).
    /// This is what binds an IRC centre to its client: the `irc` pack keys every event type
    /// by `/centre`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
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

    /// The Room named in a grant's key, without reading the grant (`""` for the admin role).
    fn room_of_key(key: &str) -> Option<&str> {
        key.split('\u{0}').nth(1)
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
                room_id: None,
                event_types: None,
                keys: None,
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

    /// True when the principal may publish `ty` to `room` (managers may too), with some
    /// ordering key at least (see [`Rights::publish_keys`]).
    pub fn can_publish(&self, room: &RoomName, ty: &EventTypeName) -> bool {
        self.typed(room, Role::Publisher, Some(ty))
    }

    /// The ordering keys the principal may publish `ty` to `room` with: `None` for any key (an
    /// administrator, a manager of the Room, or a publisher right without keys), or the keys
    /// its publisher right is limited to. Meaningful only where [`Rights::can_publish`] holds;
    /// the broker checks it with [`crate::PublishRequest::keys_allowed`].
    pub fn publish_keys(&self, room: &RoomName, ty: &EventTypeName) -> Option<Vec<String>> {
        if self.manages(room) {
            return None;
        }
        let mut keys: Vec<String> = Vec::new();
        for g in self.on(room, Role::Publisher).filter(|g| {
            g.event_types
                .as_ref()
                .is_none_or(|types| types.contains(ty))
        }) {
            match &g.keys {
                None => return None,
                Some(k) => keys.extend(k.iter().cloned()),
            }
        }
        Some(keys)
    }

    /// True when the principal may publish `ty` to `room` with ordering key `key`.
    pub fn can_publish_key(&self, room: &RoomName, ty: &EventTypeName, key: &str) -> bool {
        self.can_publish(room, ty)
            && self
                .publish_keys(room, ty)
                .is_none_or(|keys| keys.iter().any(|k| k == key))
    }

    /// True when `caller` (whose rights these are) may read or stop `event`: a manager of its
    /// Room, or its publisher while it still holds the right to publish that event type.
    pub fn may_follow_event(&self, caller: &Principal, event: &crate::model::Event) -> bool {
        self.manages(&event.room)
            || (event.publisher == *caller && self.can_publish(&event.room, &event.event_type))
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

impl Broker {
    /// Gives a right. A Room role needs the Room to exist, and is bound to its current
    /// incarnation; the administrator role takes no Room; event types limit only publishers
    /// and subscribers. Giving a right that exists replaces it (so its event types can be
    /// changed, and narrowing them pauses subscriptions they no longer cover).
    pub async fn grant(
        &self,
        principal: &Principal,
        role: Role,
        room: Option<RoomName>,
        event_types: Option<Vec<EventTypeName>>,
    ) -> Result<Grant> {
        self.grant_limited(principal, role, room, event_types, None)
            .await
    }

    /// [`Broker::grant`], and for a publisher right, limited to the ordering keys `keys` (at
    /// least one; each a valid ordering key): events with any other key are refused with
    /// [`Error::KeyNotAllowed`]. Giving the right again replaces its keys.
    pub async fn grant_limited(
        &self,
        principal: &Principal,
        role: Role,
        room: Option<RoomName>,
        event_types: Option<Vec<EventTypeName>>,
        keys: Option<Vec<String>>,
    ) -> Result<Grant> {
        if let Some(keys) = &keys {
            if role != Role::Publisher {
                return Err(Error::invalid(
                    "keys",
                    "only publisher rights are limited to ordering keys",
                ));
            }
            if keys.is_empty() {
                return Err(Error::invalid(
                    "keys",
                    "name at least one ordering key, or give no list for any key",
                ));
            }
            let max = self.config().limits.key_bytes_max;
            for k in keys {
                crate::ids::OrderingKey::new(k.clone(), max)?;
            }
        }
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
        let who = principal.clone();
        let out = self
            .record_op(move |tx, now| {
                if tx.get(RecordKind::Application, who.as_str())?.is_none() {
                    return Err(not_found(RecordKind::Application, who.as_str()));
                }
                let room_id = match &room {
                    Some(r) => Some(tx.room_id(r)?.ok_or_else(|| Error::RoomNotFound {
                        room: r.to_string(),
                    })?),
                    None => None,
                };
                let g = Grant {
                    principal: who,
                    role,
                    room,
                    room_id,
                    event_types,
                    keys,
                    created_at: now,
                };
                let key = Grant::key(&g.principal, g.role, g.room.as_ref());
                let replaced = tx.get(RecordKind::Grant, &key)?.is_some();
                tx.put(RecordKind::Grant, &key, &to_bytes(&g)?)?;
                to_bytes(&(g, replaced))
            })
            .await?;
        let (g, replaced): (Grant, bool) = from_bytes(&out)?;
        // A replaced grant may cover fewer event types than before.
        if replaced {
            self.pause_revoked(Some(principal), g.room.as_ref()).await?;
        }
        Ok(g)
    }

    /// Takes a right away. The principal's subscriptions that it no longer covers are paused
    /// (reason [`SUBSCRIBER_REVOKED`]) before this returns, so that nothing more is delivered
    /// to them; its tokens lose the right on their next request.
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
        .await?;
        // A Room role reaches only that Room's subscriptions; the admin role reaches every one.
        let scope = if role == Role::Admin { None } else { room };
        self.pause_revoked(Some(principal), scope).await?;
        Ok(())
    }

    /// Grants in force, of one principal or all (rights left over from a deleted incarnation
    /// of their Room are not shown, and never apply).
    pub fn grants(&self, principal: Option<&Principal>) -> Result<Vec<Grant>> {
        let prefix = principal
            .map(|p| format!("{}\u{0}", p.as_str()))
            .unwrap_or_default();
        let mut grants: Vec<Grant> = self.list(RecordKind::Grant, &prefix)?;
        let mut current = Vec::with_capacity(grants.len());
        for g in grants.drain(..) {
            if self.grant_in_force(&g)? {
                current.push(g);
            }
        }
        Ok(current)
    }

    /// Whether a grant applies to the Room as it stands: the Room exists and is the
    /// incarnation the grant was given on.
    fn grant_in_force(&self, g: &Grant) -> Result<bool> {
        let Some(room) = &g.room else {
            return Ok(true);
        };
        let store = &self.inner().store;
        let Some(current) = store.room(room)? else {
            return Ok(false);
        };
        Ok(match g.room_id {
            Some(id) => store.room_id(room)? == id,
            // Stored before incarnations were recorded: it can only be the current Room's if
            // it was given after that Room was created.
            None => g.created_at >= current.created_at,
        })
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

    /// Removes the rights given on earlier incarnations of `room` (after it was deleted, or
    /// created again). They no longer apply either way (see [`Grant::room_id`]); this keeps
    /// them out of storage.
    pub(crate) async fn forget_room_grants(&self, room: &RoomName) -> Result<()> {
        let room = room.clone();
        self.record_op(move |tx, _| {
            let current = tx.room_id(&room)?;
            for key in tx.ids(RecordKind::Grant, "", GRANTS_SCAN_MAX)? {
                if Grant::room_of_key(&key) != Some(room.as_str()) {
                    continue;
                }
                let stale = match get::<Grant>(tx, RecordKind::Grant, &key)? {
                    Some(g) => current.is_none() || g.room_id != current,
                    None => false,
                };
                if stale {
                    tx.delete(RecordKind::Grant, &key)?;
                }
            }
            Ok(Vec::new())
        })
        .await
        .map(|_| ())
    }

    /// Turns on the check of subscribers' rights on every delivery (pushes, pulls, seeks,
    /// resumes). A server with access control turns it on; an embedding program that does
    /// not use identities leaves it off, so that its subscriptions need no grants.
    pub fn enforce_subscriber_rights(&self, on: bool) {
        self.inner()
            .enforce_rights
            .store(on, std::sync::atomic::Ordering::Release);
    }

    fn enforcing_rights(&self) -> bool {
        self.inner()
            .enforce_rights
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the subscriber of `sub` may receive it now: it holds the right to subscribe to
    /// its event types on its Room (always true while [`Broker::enforce_subscriber_rights`] is
    /// off). Read through the identity cache, so it costs nothing between writes.
    pub fn subscriber_may_receive(&self, sub: &Subscription) -> Result<bool> {
        if !self.enforcing_rights() {
            return Ok(true);
        }
        Ok(self
            .rights(&sub.subscriber)?
            .can_subscribe(&sub.room, sub.event_types.as_deref()))
    }

    /// Refuses a use of `sub` whose subscriber lost its right, and pauses the subscription
    /// (reason [`SUBSCRIBER_REVOKED`]) if it was still delivering.
    pub(crate) async fn check_subscriber(&self, sub: &Subscription) -> Result<()> {
        if self.subscriber_may_receive(sub)? {
            return Ok(());
        }
        if sub.status == SubscriptionStatus::Active {
            self.pause_for_revocation(sub).await?;
        }
        Err(Error::SubscriberRevoked {
            id: sub.id.to_string(),
            subscriber: sub.subscriber.to_string(),
        })
    }

    /// [`Broker::check_subscriber`] by subscription id; reads nothing unless subscribers'
    /// rights are enforced.
    pub(crate) async fn check_subscriber_of(&self, id: SubscriptionId) -> Result<()> {
        if !self.enforcing_rights() {
            return Ok(());
        }
        let sub = self.subscription(id)?;
        self.check_subscriber(&sub).await
    }

    async fn pause_for_revocation(&self, sub: &Subscription) -> Result<()> {
        let op = WriteOp::Delivery(DeliveryOp::SetStatus {
            id: sub.id,
            to: SubscriptionStatus::Paused,
            reason: Some(SUBSCRIBER_REVOKED.to_string()),
            from: &[SubscriptionStatus::Active, SubscriptionStatus::Paused],
        });
        match self.write_op(op).await {
            // Deleted, or changed meanwhile: nothing is delivered to it either way.
            Ok(_)
            | Err(Error::SubscriptionNotFound { .. })
            | Err(Error::SubscriptionState { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Pauses every subscription (of `principal`, or of anyone; in Room `only`, or in every
    /// Room) whose subscriber no longer holds the right to receive it. Called after a right is
    /// taken away or an application deleted, before the caller hears back; the dispatchers and
    /// pulls check again on every use, so a delivery racing with this one is refused there.
    /// Returns how many it paused.
    pub(crate) async fn pause_revoked(
        &self,
        principal: Option<&Principal>,
        only: Option<&RoomName>,
    ) -> Result<u64> {
        if !self.enforcing_rights() {
            return Ok(0);
        }
        let store = &self.inner().store;
        let mut paused = 0;
        let mut after: Option<RoomName> = None;
        loop {
            let rooms: Vec<RoomName> = match only {
                Some(r) if after.is_none() => vec![r.clone()],
                Some(_) => Vec::new(),
                None => store
                    .rooms(after.as_ref(), 1000)?
                    .into_iter()
                    .map(|r| r.name)
                    .collect(),
            };
            let Some(last) = rooms.last() else { break };
            after = Some(last.clone());
            for room in &rooms {
                let subs = match store.subscriptions(room) {
                    Ok(s) => s,
                    Err(Error::RoomNotFound { .. }) => continue,
                    Err(e) => return Err(e),
                };
                for sub in subs {
                    let delivering = matches!(
                        sub.status,
                        SubscriptionStatus::Active | SubscriptionStatus::Paused
                    ) && sub.status_reason.as_deref() != Some(SUBSCRIBER_REVOKED);
                    if !delivering || principal.is_some_and(|p| *p != sub.subscriber) {
                        continue;
                    }
                    if !self.subscriber_may_receive(&sub)? {
                        self.pause_for_revocation(&sub).await?;
                        paused += 1;
                    }
                }
            }
        }
        if paused > 0 {
            tracing::info!(paused, principal = ?principal.map(Principal::as_str), "subscriptions paused: their subscriber lost its right");
        }
        Ok(paused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(role: Role, room: Option<&str>, types: Option<&[&str]>) -> Grant {
        Grant {
            principal: Principal::new("a/B/c/d").unwrap(),
            role,
            room: room.map(|r| RoomName::new(r).unwrap()),
            room_id: Some(1),
            event_types: types
                .map(|ts| ts.iter().map(|t| EventTypeName::new(*t).unwrap()).collect()),
            keys: None,
            created_at: Timestamp(0),
        }
    }

    #[test]
    fn publisher_rights_limited_to_keys() {
        let irc = RoomName::new("irc").unwrap();
        let check_in = EventTypeName::new("check_in").unwrap();
        let mut bound = grant(Role::Publisher, Some("irc"), None);
        bound.keys = Some(vec!["brookhouse".into()]);
        let rights = Rights {
            grants: vec![bound],
        };
        assert!(rights.can_publish(&irc, &check_in));
        assert_eq!(
            rights.publish_keys(&irc, &check_in),
            Some(vec!["brookhouse".to_string()])
        );
        assert!(rights.can_publish_key(&irc, &check_in, "brookhouse"));
        assert!(!rights.can_publish_key(&irc, &check_in, "harmondsworth"));
        let open = Rights {
            grants: vec![grant(Role::Publisher, Some("irc"), None)],
        };
        assert_eq!(open.publish_keys(&irc, &check_in), None);
        assert!(open.can_publish_key(&irc, &check_in, "harmondsworth"));
        let manager = Rights {
            grants: vec![grant(Role::RoomManager, Some("irc"), None)],
        };
        assert!(manager.can_publish_key(&irc, &check_in, "harmondsworth"));
        assert!(!Rights::default().can_publish_key(&irc, &check_in, "brookhouse"));
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
