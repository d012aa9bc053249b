//! At most so many pushes in flight to one receiving host (`host:port`), across every
//! subscription that pushes there. Without it, 100 subscriptions with 64 slots each pointed at
//! one endpoint opened up to 6,400 connections to it, more than the push client keeps idle per
//! host, so connections were closed after each burst and opened again (9,060 TCP connections for
//! 50,000 pushes in the delivery benchmark, against 69 for one subscription). A receiver shared
//! by many subscriptions (a supplier's single webhook endpoint) also should not see more
//! concurrent requests than one subscription could ever send.
//!
//! Waiting pushes queue in arrival order (tokio's semaphore is fair). The map holds a host only
//! while one of its permits is out, so it is bounded by the pushes in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Per-host limits of concurrent pushes.
pub(crate) struct HostLimits {
    per_host: usize,
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// The `host:port` a push to `url` goes to, or `None` when the URL does not parse (the push
/// then fails on its own).
pub(crate) fn host_of(url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    let host = url.host_str()?;
    Some(format!(
        "{host}:{}",
        url.port_or_known_default().unwrap_or(0)
    ))
}

/// A push's place among its host's pushes in flight; dropping it frees the place.
pub(crate) struct HostPermit {
    limits: Arc<HostLimits>,
    host: String,
    permit: Option<OwnedSemaphorePermit>,
}

impl HostLimits {
    /// At most `per_host` (at least 1) pushes in flight per host.
    pub(crate) fn new(per_host: usize) -> Arc<HostLimits> {
        Arc::new(HostLimits {
            per_host: per_host.max(1),
            hosts: Mutex::new(HashMap::new()),
        })
    }

    fn semaphore(&self, host: &str) -> Arc<Semaphore> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        hosts
            .entry(host.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_host)))
            .clone()
    }

    /// Waits for a place among `host`'s pushes in flight. Cancelling the wait leaves nothing
    /// behind: the place (without a permit yet) is dropped after the wait, and drops the
    /// host's entry if nothing else uses it.
    pub(crate) async fn acquire(self: &Arc<Self>, host: &str) -> HostPermit {
        let mut place = HostPermit {
            limits: self.clone(),
            host: host.to_string(),
            permit: None,
        };
        // Declared after `place`, so dropped before it when the wait is cancelled. Never
        // closed, so the wait ends with a permit.
        let wait = self.semaphore(host).acquire_owned();
        place.permit = wait.await.ok();
        place
    }

    /// A place among `host`'s pushes in flight if one is free now (tests).
    #[cfg(test)]
    pub(crate) fn try_acquire(self: &Arc<Self>, host: &str) -> Option<HostPermit> {
        let permit = self.semaphore(host).try_acquire_owned().ok()?;
        Some(HostPermit {
            limits: self.clone(),
            host: host.to_string(),
            permit: Some(permit),
        })
    }

    /// Hosts with an entry (tests).
    #[cfg(test)]
    fn hosts(&self) -> usize {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for HostPermit {
    fn drop(&mut self) {
        let mut hosts = self.limits.hosts.lock().unwrap_or_else(|p| p.into_inner());
        drop(self.permit.take());
        // The last push in flight to the host takes its entry along (the map's own reference
        // is then the only one left, and no waiter holds a clone).
        if let Some(s) = hosts.get(&self.host) {
            if Arc::strong_count(s) == 1 && s.available_permits() == self.limits.per_host {
                hosts.remove(&self.host);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_has_at_most_its_limit_in_flight_and_others_are_not_held() {
        let limits = HostLimits::new(3);
        let mut held: Vec<HostPermit> = (0..3)
            .map(|_| limits.try_acquire("a:80").expect("a place"))
            .collect();
        assert!(
            limits.try_acquire("a:80").is_none(),
            "a fourth push to a:80"
        );
        let other = limits
            .try_acquire("b:80")
            .expect("another host is not held");
        held.pop();
        let again = limits.try_acquire("a:80").expect("a place freed");
        assert!(limits.try_acquire("a:80").is_none());
        drop(other);
        assert_eq!(limits.hosts(), 1, "b:80 has nothing in flight: forgotten");
        drop((held, again));
        assert_eq!(limits.hosts(), 0);
    }

    #[test]
    fn a_host_is_its_name_and_port() {
        assert_eq!(
            host_of("https://a.example/x").as_deref(),
            Some("a.example:443")
        );
        assert_eq!(
            host_of("http://a.example:8080/x?y").as_deref(),
            Some("a.example:8080")
        );
        assert_eq!(host_of("http://[::1]/x").as_deref(), Some("[::1]:80"));
        assert_eq!(host_of("not a url"), None);
    }

    /// A wait given up (a push timing out while queued for its host) after the last holder
    /// let go leaves no entry behind.
    #[tokio::test]
    async fn a_cancelled_wait_leaves_nothing_behind() {
        use std::future::Future;
        let limits = HostLimits::new(1);
        let first = limits.acquire("a:80").await;
        let mut waiting = Box::pin(limits.acquire("a:80"));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        drop(first);
        assert_eq!(limits.hosts(), 1, "the waiter still uses it");
        drop(waiting);
        assert_eq!(limits.hosts(), 0);
    }

    #[tokio::test]
    async fn a_waiting_push_gets_the_place_freed_and_idle_hosts_are_forgotten() {
        let limits = HostLimits::new(1);
        let first = limits.acquire("a:80").await;
        let waiting = {
            let limits = limits.clone();
            tokio::spawn(async move { limits.acquire("a:80").await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(first);
        let second = waiting.await.expect("task");
        assert!(limits.try_acquire("a:80").is_none());
        drop(second);
        assert_eq!(limits.hosts(), 0);
    }
}
