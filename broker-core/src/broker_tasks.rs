//! The broker's background tasks: waking what other nodes' commits changed, finding the push
//! subscriptions other nodes created (and sharing them out, and adopting their configuration
//! changes), and the retention sweep. Each holds the broker only weakly, so that dropping the
//! last handle ends them; `broker.rs` starts them when the broker opens.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::broker::{Broker, Inner};
use crate::dispatch::ensure_dispatcher;
use crate::error::Error;

/// Wakes what other nodes' commits changed (`remote_wake.rs`): their notices come from the
/// store as they arrive, and each wakes the same dispatchers and long-polls a commit of this
/// node would. Ends with the broker or when the store stops delivering notices.
pub(crate) fn spawn_remote_wakes(
    inner: Weak<Inner>,
    mut notices: tokio::sync::mpsc::Receiver<String>,
) {
    tokio::spawn(async move {
        while let Some(notice) = notices.recv().await {
            let Some(inner) = inner.upgrade() else { return };
            if let Some(wake) = crate::remote_wake::decode(&notice, inner.node) {
                inner.signals.wake_remote(&wake);
            }
        }
    });
}

/// On a store other nodes write too: every half `dispatch_lease_ms`, adopts the configuration
/// another node changed at run time (`runtime.rs`) and looks for push subscriptions without a
/// dispatcher here (created on another node), so that each is ready to take the subscription
/// over when the node pushing it dies. A dispatcher that does not hold the lease
/// reads it once per tick, and writes nothing while another node's runs.
pub(crate) fn spawn_discovery(inner: Weak<Inner>) {
    tokio::spawn(async move {
        loop {
            let every = {
                let Some(inner) = inner.upgrade() else { return };
                let lease_ms =
                    crate::ownership::lease_ms(inner.config_now().delivery.dispatch_lease_ms);
                Duration::from_millis(lease_ms / 2)
            };
            tokio::time::sleep(every).await;
            let Some(inner) = inner.upgrade() else { return };
            if inner.closing.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let broker = Broker::from_inner(inner);
            // A refusal is logged once per version where it is decided.
            if let Err(e) = broker.adopt_runtime_config().await {
                tracing::debug!(error = %e, "configuration changed on another node not adopted");
            }
            let ids = {
                let store = broker.inner().store.clone();
                tokio::task::spawn_blocking(move || store.push_subscriptions()).await
            };
            match ids {
                Ok(Ok(ids)) => {
                    for id in &ids {
                        ensure_dispatcher(&broker, *id);
                    }
                    crate::dispatch_owner::balance(&broker, &ids).await;
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "cannot list push subscriptions"),
                Err(e) => tracing::debug!(error = %e, "push subscription listing failed"),
            }
        }
    });
}

/// Sweeps on an interval until the broker is dropped, a batch at a time: when a sweep reports
/// more work it runs again at once, so a large backlog drains without one long transaction.
/// The broker is held only while `turn` is, and not once it is closing (see
/// [`Inner::retention_turn`]).
pub(crate) fn spawn_retention(
    inner: Weak<Inner>,
    turn: Arc<tokio::sync::Mutex<()>>,
    every: Duration,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            loop {
                let held = turn.lock().await;
                let Some(inner) = inner.upgrade() else { return };
                if inner.closing.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let broker = Broker::from_inner(inner);
                let swept = broker.sweep_retention().await;
                drop(broker);
                drop(held);
                match swept {
                    Ok(r) if r.more => continue,
                    Ok(_) => break,
                    Err(Error::ShuttingDown) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "retention sweep failed; will retry next interval");
                        break;
                    }
                }
            }
        }
    });
}
