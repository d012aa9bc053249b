//! Signing keys the broker keeps for its host, in rings that can be rotated (a server signs its
//! access tokens with one). A single key cannot be replaced without cutting off everyone who
//! holds something it signed; a ring can: after a rotation the newest key signs, and each older
//! key keeps verifying what it signed *before it was retired*, until a grace the caller chooses
//! (the longest lifetime of anything it signed) has passed; then it is dropped.
//!
//! The core knows nothing of tokens: it keeps the keys, says which one signs, and whether a key
//! still verifies something signed at a given time. The keys are in the database, so anyone who
//! can read the database file can read them (the server keeps that file private).
//!
//! A ring is read on every authenticated request, so it is kept in memory. Only the two
//! functions here write a ring, and redb locks the database file to one process, so the memory
//! is brought up to date by those writes themselves (the newer version wins) and needs no
//! storage read after the first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::broker::Broker;
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::storage::{RecordKind, RecordTxn};

/// One key of a ring.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    secret: Vec<u8>,
    created_at: Timestamp,
    retired_at: Option<Timestamp>,
    verify_until: Option<Timestamp>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret: a key in a log line is a key anyone reading logs can sign with.
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .field("verify_until", &self.verify_until)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Its key id, unique within the ring (a token names it in its `kid` header).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The key itself: 32 random bytes.
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// What may be shown of it: everything but the secret.
    pub fn info(&self) -> SigningKeyInfo {
        SigningKeyInfo {
            kid: self.kid.clone(),
            created_at: self.created_at,
            retired_at: self.retired_at,
            verify_until: self.verify_until,
            signing: self.retired_at.is_none(),
        }
    }
}

/// A key of a ring without its secret, for operators.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SigningKeyInfo {
    /// Its key id.
    pub kid: String,
    /// When it was made.
    pub created_at: Timestamp,
    /// When a newer key took over signing (`None` for the key that signs).
    pub retired_at: Option<Timestamp>,
    /// Until when it verifies what it signed before it retired (`None` for the key that signs).
    pub verify_until: Option<Timestamp>,
    /// Whether it is the key that signs now.
    pub signing: bool,
}

/// A ring of signing keys: the newest signs, older ones only verify, for a while.
#[derive(Clone, Debug)]
pub struct KeyRing {
    version: u64,
    /// Newest first; never empty.
    keys: Vec<SigningKey>,
}

impl KeyRing {
    /// Moves on with every rotation, so that a newer ring can be told from an older one.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The key that signs now.
    pub fn signer(&self) -> &SigningKey {
        &self.keys[0]
    }

    /// The key `kid`, whether or not it still verifies anything (see [`KeyRing::verifier`]).
    pub fn key(&self, kid: &str) -> Option<&SigningKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// The key `kid`, if it may verify something signed at `signed_at`, at `now`: the signing
    /// key always; a retired key only for what it signed before it retired, and only until its
    /// grace is over. A key stolen before a rotation can therefore not sign anything new that
    /// the ring accepts.
    pub fn verifier(&self, kid: &str, signed_at: Timestamp, now: Timestamp) -> Option<&SigningKey> {
        let key = self.key(kid)?;
        match (key.retired_at, key.verify_until) {
            (None, _) => Some(key),
            (Some(retired), Some(until)) => (signed_at <= retired && now < until).then_some(key),
            (Some(_), None) => None,
        }
    }

    /// The keys that still sign or verify at `now`, newest first, without their secrets.
    pub fn keys(&self, now: Timestamp) -> Vec<SigningKeyInfo> {
        self.keys
            .iter()
            .filter(|k| k.verify_until.is_none_or(|u| now < u))
            .map(SigningKey::info)
            .collect()
    }
}

/// How to rotate a ring: see [`Broker::rotate_signing_key`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// How long the key that signed until now keeps verifying what it signed, in milliseconds:
    /// the longest lifetime of anything it signed.
    pub grace_ms: u64,
    /// Most keys the ring may hold after the rotation (the new one included); a rotation that
    /// would need more, because earlier keys are still in their grace, is refused.
    pub keys_max: usize,
    /// Drop every earlier key at once instead of giving it a grace: for a key that was stolen.
    /// Everything the earlier keys signed stops verifying.
    pub drop_previous: bool,
}

/// A ring as stored: JSON, with the secrets in base64url.
#[derive(Serialize, Deserialize)]
struct StoredRing {
    version: u64,
    /// The number in the next key's id.
    next_kid: u64,
    keys: Vec<StoredKey>,
}

#[derive(Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    secret: String,
    created_at: Timestamp,
    retired_at: Option<Timestamp>,
    verify_until: Option<Timestamp>,
}

impl StoredRing {
    /// A ring with one new key.
    fn fresh(now: Timestamp) -> StoredRing {
        let mut ring = StoredRing {
            version: 1,
            next_kid: 1,
            keys: Vec::new(),
        };
        ring.add_key(now);
        ring
    }

    /// Puts a new random key in front; it signs from now on.
    fn add_key(&mut self, now: Timestamp) {
        let mut secret = Vec::with_capacity(32);
        // UUID v4s come from the operating system's random source: 2 x 16 bytes.
        secret.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        secret.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        self.keys.insert(
            0,
            StoredKey {
                kid: format!("k{}", self.next_kid),
                secret: B64.encode(secret),
                created_at: now,
                retired_at: None,
                verify_until: None,
            },
        );
        self.next_kid += 1;
    }

    fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::Storage(format!("encode key ring: {e}")))
    }

    fn decode(bytes: &[u8]) -> Result<StoredRing> {
        serde_json::from_slice(bytes).map_err(|e| Error::Storage(format!("decode key ring: {e}")))
    }

    fn to_ring(&self) -> Result<KeyRing> {
        let keys = self
            .keys
            .iter()
            .map(|k| {
                Ok(SigningKey {
                    kid: k.kid.clone(),
                    secret: B64
                        .decode(&k.secret)
                        .map_err(|e| Error::Storage(format!("decode signing key: {e}")))?,
                    created_at: k.created_at,
                    retired_at: k.retired_at,
                    verify_until: k.verify_until,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if keys.is_empty() {
            return Err(Error::Storage("a key ring without keys".into()));
        }
        Ok(KeyRing {
            version: self.version,
            keys,
        })
    }
}

/// The record id of the ring `name`.
fn ring_id(name: &str) -> String {
    format!("{name}#ring")
}

fn load(tx: &dyn RecordTxn, name: &str) -> Result<Option<StoredRing>> {
    tx.get(RecordKind::Key, &ring_id(name))?
        .map(|b| StoredRing::decode(&b))
        .transpose()
}

/// The rings read so far, by name: the newest version seen of each. Off on a store shared with
/// other brokers, whose rotations this broker would not see: every use reads storage.
#[derive(Default)]
pub(crate) struct KeyRingCache {
    rings: Mutex<HashMap<String, Arc<KeyRing>>>,
    off: bool,
}

impl KeyRingCache {
    /// A cache that keeps nothing (a store shared with other brokers).
    pub(crate) fn off() -> KeyRingCache {
        KeyRingCache {
            off: true,
            ..KeyRingCache::default()
        }
    }

    fn get(&self, name: &str) -> Option<Arc<KeyRing>> {
        if self.off {
            return None;
        }
        self.rings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Keeps `ring` unless a newer version is kept already (a reader that read storage before
    /// a rotation committed must not put the old ring back); returns the ring kept.
    fn offer(&self, name: &str, ring: KeyRing) -> Arc<KeyRing> {
        if self.off {
            return Arc::new(ring);
        }
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        match rings.get(name) {
            Some(kept) if kept.version >= ring.version => kept.clone(),
            _ => {
                let ring = Arc::new(ring);
                rings.insert(name.to_string(), ring.clone());
                ring
            }
        }
    }
}

impl Broker {
    /// The ring of signing keys `name`, created with one random key on first use. A ring
    /// replaces the single [`Broker::host_key`] of the same name, which is deleted when the
    /// ring is created. Served from memory after the first read.
    pub async fn signing_keys(&self, name: &str) -> Result<Arc<KeyRing>> {
        let cache = &self.inner().key_rings;
        if let Some(ring) = cache.get(name) {
            return Ok(ring);
        }
        let stored = match self.inner().store.record(RecordKind::Key, &ring_id(name))? {
            Some(bytes) => StoredRing::decode(&bytes)?,
            None => {
                let owned = name.to_string();
                // The first writer wins; a concurrent caller gets the stored ring, not its own.
                let bytes = self
                    .record_op(move |tx, now| {
                        if let Some(ring) = load(tx, &owned)? {
                            return ring.encode();
                        }
                        tx.delete(RecordKind::Key, &owned)?;
                        let ring = StoredRing::fresh(now);
                        let bytes = ring.encode()?;
                        tx.put(RecordKind::Key, &ring_id(&owned), &bytes)?;
                        Ok(bytes)
                    })
                    .await?;
                StoredRing::decode(&bytes)?
            }
        };
        Ok(cache.offer(name, stored.to_ring()?))
    }

    /// Rotates the ring `name` (creating it first if need be): a new key signs from now on; the
    /// key that signed until now verifies what it signed for `rotation.grace_ms` more (or
    /// stops at once with `drop_previous`); keys whose grace is over are dropped. Refused with
    /// [`Error::LimitExceeded`] (`signing_keys_max`) when more than `rotation.keys_max` keys
    /// would still be in use.
    pub async fn rotate_signing_key(&self, name: &str, rotation: Rotation) -> Result<Arc<KeyRing>> {
        let owned = name.to_string();
        let bytes = self
            .record_op(move |tx, now| {
                let mut ring = load(tx, &owned)?.unwrap_or_else(|| StoredRing::fresh(now));
                ring.keys
                    .retain(|k| k.verify_until.is_none_or(|until| now < until));
                if rotation.drop_previous {
                    ring.keys.clear();
                } else {
                    let wanted = ring.keys.len() + 1;
                    if wanted > rotation.keys_max.max(1) {
                        return Err(Error::limit(
                            "signing_keys_max",
                            rotation.keys_max as u64,
                            wanted as u64,
                        ));
                    }
                    for key in ring.keys.iter_mut().filter(|k| k.retired_at.is_none()) {
                        key.retired_at = Some(now);
                        key.verify_until = Some(now.plus_ms(rotation.grace_ms));
                    }
                }
                ring.add_key(now);
                ring.version += 1;
                tx.delete(RecordKind::Key, &owned)?;
                let bytes = ring.encode()?;
                tx.put(RecordKind::Key, &ring_id(&owned), &bytes)?;
                Ok(bytes)
            })
            .await?;
        let ring = StoredRing::decode(&bytes)?.to_ring()?;
        Ok(self.inner().key_rings.offer(name, ring))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_at(now: u64) -> StoredRing {
        StoredRing::fresh(Timestamp(now))
    }

    #[test]
    fn a_retired_key_verifies_only_what_it_signed_before_retiring_and_only_in_its_grace() {
        let mut stored = ring_at(1_000);
        stored.keys[0].retired_at = Some(Timestamp(5_000));
        stored.keys[0].verify_until = Some(Timestamp(9_000));
        stored.add_key(Timestamp(5_000));
        let ring = stored.to_ring().unwrap();
        assert_eq!(ring.signer().kid(), "k2");
        let at = Timestamp;
        assert!(ring.verifier("k1", at(4_000), at(6_000)).is_some());
        assert!(ring.verifier("k1", at(5_000), at(8_999)).is_some());
        assert!(
            ring.verifier("k1", at(5_001), at(6_000)).is_none(),
            "signed after it retired"
        );
        assert!(
            ring.verifier("k1", at(4_000), at(9_000)).is_none(),
            "grace over"
        );
        assert!(ring.verifier("k2", at(99_000), at(6_000)).is_some());
        assert!(ring.verifier("k3", at(4_000), at(6_000)).is_none());
        let kids: Vec<String> = ring.keys(at(6_000)).into_iter().map(|k| k.kid).collect();
        assert_eq!(kids, ["k2", "k1"]);
        assert_eq!(ring.keys(at(9_000)).len(), 1);
    }

    #[test]
    fn keys_are_random_and_never_printed() {
        let a = ring_at(0).to_ring().unwrap();
        let b = ring_at(0).to_ring().unwrap();
        assert_eq!(a.signer().secret().len(), 32);
        assert_ne!(a.signer().secret(), b.signer().secret());
        let shown = format!("{a:?}");
        assert!(!shown.contains(&format!("{:?}", a.signer().secret())));
        assert!(!shown.contains(&B64.encode(a.signer().secret())));
    }
}
