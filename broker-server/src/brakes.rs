//! The token endpoint's brake on guessing (issue 14, item 5): failed client authentications
//! are limited per client id and source address, and per source address, and a limited caller
//! is refused (429, `Retry-After`) before its secret is checked, so that guessing costs the
//! server no Argon2 work once the limit is reached. The other brake, the bound on secret checks
//! running at once, is the core's (`limits.secret_checks_max`), because it must hold the slot
//! for as long as the check runs, however the request ends.
//!
//! The limits are governor's GCRA keyed rate limiters on the broker's clock (so tests move time
//! instead of sleeping). governor counts a cell on every check and has no "look without
//! counting"; a failure limit has to look before the secret check and count only after a
//! failure, so the state store below answers a check marked `look` from the stored state
//! without storing the new one. Keys are bounded in size (a hash of the client id, an address)
//! and in number (`auth.failure_keys_max`).
//!
//! Why a pair and an address, not the client id: a limit per client id alone lets anyone lock a
//! client out by failing on purpose. Per (client id, address), an attacker locks out only
//! herself; per address (IPv6 per /64), cycling client ids does not help her. What is left is a
//! guess spread over many addresses, at most the pair limit per address: generated secrets are
//! 256 bits, so that is hopeless for them, and an operator who chooses a secret must choose a
//! long one. Callers behind one NAT or proxy share the address limit; the source address is the
//! TCP peer's (`X-Forwarded-For` is not read: anyone can send it).

use std::convert::Infallible;
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use broker_core::{Broker, NewAuditEntry, Principal};
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};

use crate::config::AuthConfig;
use crate::error::ApiError;

/// The audit action of a tripped limit.
pub const TRIP_ACTION: &str = "auth.failure_limit";

/// The remote address of the request's connection, when the server was started with connect
/// information (`postroom serve` is; a program that serves the router itself may not be).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

/// governor's time, read from the broker's clock.
#[derive(Clone)]
struct BrokerClock(Broker);

impl Clock for BrokerClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(Duration::from_millis(self.0.now().as_ms()))
    }
}

/// A key, and whether this check only looks.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Probe<K> {
    key: K,
    look: bool,
}

/// governor's keyed state in a `DashMap`, shared with the [`Limit`] that sweeps it. A check
/// marked `look` gets governor's own decision from the stored state but stores nothing, not
/// even a new key.
struct Store<K: Hash + Eq + Clone>(Arc<DashMapStateStore<K>>);

impl<K: Hash + Eq + Clone> StateStore for Store<K> {
    type Key = Probe<K>;

    fn measure_and_replace<T, F, E>(&self, probe: &Probe<K>, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if !probe.look {
            return self.0.measure_and_replace(&probe.key, f);
        }
        // The stored state, read by a replacement that always declines to replace.
        let stored = self.0.get(&probe.key).and_then(|entry| {
            let state: &InMemoryState = entry.value();
            state
                .measure_and_replace(&NotKeyed::NonKey, Err::<((), Nanos), _>)
                .err()
                .flatten()
        });
        f(stored).map(|(outcome, _)| outcome)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<Probe<K>> for Store<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&*self.0, drop_below);
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One failure limit: its failures per key, and its trips per key (one audit entry per key
/// per minute at most, however many requests it refuses).
struct Limit<K: Hash + Eq + Clone> {
    /// The label in metrics and the audit detail: `client_address` or `address`.
    name: &'static str,
    /// The setting that sets it, for messages.
    setting: &'static str,
    per_minute: u32,
    failures: RateLimiter<Probe<K>, Store<K>, BrokerClock, NoOpMiddleware<Nanos>>,
    /// The failure limiter's map, to ask whether a key is known.
    stored: Arc<DashMapStateStore<K>>,
    trips: RateLimiter<K, DashMapStateStore<K>, BrokerClock, NoOpMiddleware<Nanos>>,
    /// When stale keys were last dropped (broker milliseconds), so that a full table is swept
    /// at most once a second, not on every failure.
    swept_ms: AtomicU64,
}

impl<K: Hash + Eq + Clone> Limit<K> {
    fn new(
        name: &'static str,
        setting: &'static str,
        per_minute: u32,
        clock: &BrokerClock,
    ) -> Option<Self> {
        let n = NonZeroU32::new(per_minute)?;
        let stored = Arc::new(DashMapStateStore::<K>::default());
        Some(Limit {
            name,
            setting,
            per_minute,
            failures: RateLimiter::new(Quota::per_minute(n), Store(stored.clone()), clock.clone()),
            stored,
            trips: RateLimiter::dashmap_with_clock(
                Quota::per_minute(NonZeroU32::MIN),
                clock.clone(),
            ),
            swept_ms: AtomicU64::new(0),
        })
    }

    /// How long `key` must wait before its next attempt, or `None` when it may try now.
    fn wait(&self, key: &K, clock: &BrokerClock) -> Option<Duration> {
        let probe = Probe {
            key: key.clone(),
            look: true,
        };
        self.failures
            .check_key(&probe)
            .err()
            .map(|not_until| not_until.wait_time_from(clock.now()))
    }

    /// Counts a failure of `key`, unless the table is full of keys still being limited.
    fn fail(&self, key: K, keys_max: usize, now_ms: u64) -> bool {
        if self.stored.len() >= keys_max && !self.stored.contains_key(&key) {
            self.sweep(now_ms);
            if self.stored.len() >= keys_max {
                return false;
            }
        }
        // Refused only when another failure of the key took the last cell meanwhile.
        let _ = self.failures.check_key(&Probe { key, look: false });
        true
    }

    /// Whether a refusal of `key` is the first within a minute, so worth an audit entry.
    fn first_trip(&self, key: &K, keys_max: usize, now_ms: u64) -> bool {
        if self.trips.len() >= keys_max {
            self.sweep(now_ms);
            if self.trips.len() >= keys_max {
                return false;
            }
        }
        self.trips.check_key(key).is_ok()
    }

    /// Drops the keys whose state is that of a fresh key, at most once a second.
    fn sweep(&self, now_ms: u64) {
        let last = self.swept_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) < 1000
            || self
                .swept_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        self.failures.retain_recent();
        self.trips.retain_recent();
    }
}

/// A source address as the limits count it: IPv4 (an IPv4-mapped IPv6 address too) as is,
/// IPv6 by its /64, the block a single host or customer is usually given.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// An address key for people.
fn show_address(key: IpAddr) -> String {
    match key {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("{v6}/64"),
    }
}

/// The failure limits of the token endpoint.
pub(crate) struct Brakes {
    broker: Broker,
    clock: BrokerClock,
    /// Per (hash of the client id, address); `None` for the address when it is unknown, which
    /// makes this a limit per client id.
    pair: Option<Limit<(u64, Option<IpAddr>)>>,
    /// Per address; not applied when the address is unknown (every caller would share it).
    address: Option<Limit<IpAddr>>,
    /// Tokens issued per client id (its hash), counted on success.
    issued: Option<Limit<u64>>,
    /// Hashes client ids into fixed-size keys, with a key chosen at random per process so
    /// that nobody can aim collisions.
    hasher: RandomState,
    keys_max: usize,
}

/// A tripped limit, to be written to the audit log.
struct Trip {
    limit: &'static str,
    setting: &'static str,
    per_minute: u32,
    target: String,
    retry_after_secs: u64,
}

impl Brakes {
    /// The limits `config` sets, on `broker`'s clock.
    pub(crate) fn new(broker: Broker, config: &AuthConfig) -> Brakes {
        let clock = BrokerClock(broker.clone());
        Brakes {
            pair: Limit::new(
                "client_address",
                "auth.failures_per_client_address_per_minute",
                config.failures_per_client_address_per_minute,
                &clock,
            ),
            address: Limit::new(
                "address",
                "auth.failures_per_address_per_minute",
                config.failures_per_address_per_minute,
                &clock,
            ),
            issued: Limit::new(
                "client_tokens",
                "auth.tokens_per_client_per_minute",
                config.tokens_per_client_per_minute,
                &clock,
            ),
            broker,
            clock,
            hasher: RandomState::new(),
            keys_max: config.failure_keys_max.max(1),
        }
    }

    fn pair_key(&self, client_id: &str, peer: Option<SocketAddr>) -> (u64, Option<IpAddr>) {
        (
            self.hasher.hash_one(client_id),
            peer.map(|p| address_key(p.ip())),
        )
    }

    /// Refuses (429, [`ApiError::TooManyFailures`]) a caller over a failure limit, before its
    /// secret is checked; writes an audit entry for each limit that trips.
    pub(crate) async fn admit(
        &self,
        client_id: &str,
        peer: Option<SocketAddr>,
    ) -> Result<(), ApiError> {
        let now_ms = self.broker.now().as_ms();
        let secs = |d: Duration| d.as_millis().div_ceil(1000).max(1) as u64;
        let mut wait = None::<u64>;
        let mut trips = Vec::new();
        if let Some(limit) = &self.pair {
            let key = self.pair_key(client_id, peer);
            if let Some(d) = limit.wait(&key, &self.clock) {
                wait = Some(wait.unwrap_or(0).max(secs(d)));
                if limit.first_trip(&key, self.keys_max, now_ms) {
                    let short: String = client_id.chars().take(64).collect();
                    let from = key.1.map_or("an unknown address".into(), show_address);
                    trips.push(Trip {
                        limit: limit.name,
                        setting: limit.setting,
                        per_minute: limit.per_minute,
                        target: format!("client {:?} from {from}", short),
                        retry_after_secs: secs(d),
                    });
                }
            }
        }
        if let (Some(limit), Some(peer)) = (&self.address, peer) {
            let key = address_key(peer.ip());
            if let Some(d) = limit.wait(&key, &self.clock) {
                wait = Some(wait.unwrap_or(0).max(secs(d)));
                if limit.first_trip(&key, self.keys_max, now_ms) {
                    trips.push(Trip {
                        limit: limit.name,
                        setting: limit.setting,
                        per_minute: limit.per_minute,
                        target: format!("address {}", show_address(key)),
                        retry_after_secs: secs(d),
                    });
                }
            }
        }
        let Some(retry_after_secs) = wait else {
            if let Some(limit) = &self.issued {
                if let Some(d) = limit.wait(&self.hasher.hash_one(client_id), &self.clock) {
                    metrics::counter!(
                        crate::observe::AUTH_REFUSED_TOTAL,
                        "reason" => "too_many_tokens"
                    )
                    .increment(1);
                    return Err(ApiError::TooManyTokens {
                        retry_after_secs: secs(d),
                    });
                }
            }
            return Ok(());
        };
        metrics::counter!(crate::observe::AUTH_REFUSED_TOTAL, "reason" => "too_many_failures")
            .increment(1);
        for trip in trips {
            self.record_trip(trip).await;
        }
        Err(ApiError::TooManyFailures { retry_after_secs })
    }

    /// Counts a token issued to `client_id` against its limit.
    pub(crate) fn issued(&self, client_id: &str) {
        if let Some(limit) = &self.issued {
            let now_ms = self.broker.now().as_ms();
            if !limit.fail(self.hasher.hash_one(client_id), self.keys_max, now_ms) {
                metrics::counter!(crate::observe::AUTH_FAILURES_UNCOUNTED_TOTAL).increment(1);
            }
        }
    }

    /// Counts a failed authentication against every limit.
    pub(crate) fn failed(&self, client_id: &str, peer: Option<SocketAddr>) {
        let now_ms = self.broker.now().as_ms();
        let mut counted = true;
        if let Some(limit) = &self.pair {
            counted &= limit.fail(self.pair_key(client_id, peer), self.keys_max, now_ms);
        }
        if let (Some(limit), Some(peer)) = (&self.address, peer) {
            counted &= limit.fail(address_key(peer.ip()), self.keys_max, now_ms);
        }
        if !counted {
            metrics::counter!(crate::observe::AUTH_FAILURES_UNCOUNTED_TOTAL).increment(1);
        }
    }

    async fn record_trip(&self, trip: Trip) {
        metrics::counter!(crate::observe::AUTH_LIMIT_TRIPS_TOTAL, "limit" => trip.limit)
            .increment(1);
        tracing::warn!(
            limit = trip.setting,
            target = %trip.target,
            "failed authentications over the limit; refusing until {} s have passed",
            trip.retry_after_secs
        );
        let Ok(actor) = Principal::new("anonymous") else {
            return;
        };
        let entry = NewAuditEntry {
            actor,
            action: TRIP_ACTION.into(),
            target: trip.target,
            error: Some("too_many_failures".into()),
            detail: Some(serde_json::json!({
                "limit": trip.setting,
                "failures_per_minute": trip.per_minute,
                "retry_after_secs": trip.retry_after_secs,
            })),
        };
        if let Err(e) = self.broker.record_audit(entry).await {
            tracing::error!(error = %e, "could not write the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_core::{ManualClock, Timestamp};

    async fn broker() -> (Broker, ManualClock) {
        let clock = ManualClock::new(Timestamp(1_767_225_600_000));
        let broker = Broker::open_in_memory(Default::default(), Arc::new(clock.clone()))
            .await
            .unwrap();
        (broker, clock)
    }

    #[test]
    fn addresses_count_per_host() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(address_key(ip("192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(address_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(
            address_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(show_address(ip("2001:db8:1:2::")), "2001:db8:1:2::/64");
    }

    /// A look neither counts nor stores a key; a failure does both.
    #[tokio::test]
    async fn looking_counts_nothing() {
        let (broker, _clock) = broker().await;
        let clock = BrokerClock(broker);
        let limit = Limit::<u32>::new("t", "t", 2, &clock).unwrap();
        for _ in 0..10 {
            assert_eq!(limit.wait(&7, &clock), None);
        }
        assert_eq!(limit.stored.len(), 0);
        assert!(limit.fail(7, 10, 0));
        assert!(limit.fail(7, 10, 0));
        assert_eq!(limit.wait(&7, &clock), Some(Duration::from_secs(30)));
        assert_eq!(limit.wait(&8, &clock), None);
    }

    /// Cycling keys never grows a table past `keys_max`: refilled keys are swept, and while
    /// every key is still limited, new ones are not counted.
    #[tokio::test]
    async fn tables_stay_bounded() {
        let (broker, clock) = broker().await;
        let bclock = BrokerClock(broker.clone());
        let limit = Limit::<u32>::new("t", "t", 10, &bclock).unwrap();
        for k in 0..100 {
            assert!(limit.fail(k, 100, broker.now().as_ms()));
        }
        assert!(!limit.fail(1000, 100, broker.now().as_ms()), "full");
        assert!(
            limit.fail(5, 100, broker.now().as_ms()),
            "known keys still count"
        );
        assert_eq!(limit.stored.len(), 100);
        // Once refilled, the old keys are swept for new ones.
        clock.advance_ms(20_000);
        assert!(limit.fail(1000, 100, broker.now().as_ms()));
        assert!(limit.stored.len() <= 100, "{}", limit.stored.len());
        for k in 2000..2099 {
            limit.fail(k, 100, broker.now().as_ms());
        }
        assert!(limit.stored.len() <= 100, "{}", limit.stored.len());
    }

    /// Without a known address, failures count per client id and the address limit is not
    /// applied (every such caller would share one address).
    #[tokio::test]
    async fn unknown_addresses_count_per_client() {
        let (broker, _clock) = broker().await;
        let config = AuthConfig {
            failures_per_client_address_per_minute: 2,
            failures_per_address_per_minute: 1,
            ..AuthConfig::default()
        };
        let brakes = Brakes::new(broker, &config);
        brakes.failed("a", None);
        brakes.failed("a", None);
        assert!(brakes.admit("a", None).await.is_err());
        assert!(brakes.admit("b", None).await.is_ok());
        assert_eq!(brakes.address.as_ref().unwrap().stored.len(), 0);
    }
}
