//! The PostgreSQL backend's ear for the other nodes (issue 16, item 3): one connection of its
//! own, outside the pools, that `LISTEN`s on the notices channel (`remote_wake.rs`) and hands
//! each notice to the broker as it arrives. Commits send their notice with `pg_notify` inside
//! their own transaction, so a notice arrives only for a commit that happened. When the
//! connection breaks (a database restart, a failover) it reconnects with a pause of a second,
//! and after reconnecting hands over a notice that wakes everything, since notices sent
//! meanwhile were lost; a ping every 5 s (and TCP keepalives) finds a connection whose server
//! vanished without closing it.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::remote_wake::everything;

/// Notices waiting for the broker; more are dropped (the dispatchers' tick makes up for a lost
/// wake-up).
pub(super) const NOTICES_QUEUED_MAX: usize = 4096;

/// How often the listening connection is checked with a ping, and how long its answer may
/// take before the connection is given up (a vanished server is noticed within about 8 s).
const PING_EVERY: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// The pause before connecting again.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// Listens until the receiving side is dropped (the broker closed) or the runtime stops.
pub(super) async fn listen(
    mut pg: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    tx: mpsc::Sender<String>,
    channel: String,
) {
    // Named, so that operators (and the tests) tell the listening connections apart.
    pg.application_name(format!("postroom-listen {channel}"));
    pg.keepalives(true)
        .keepalives_idle(Duration::from_secs(15))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3);
    let mut first = true;
    while !tx.is_closed() {
        match pg.connect(tls.clone()).await {
            Ok((client, mut conn)) => {
                let (err_tx, mut broke) = mpsc::channel::<Option<tokio_postgres::Error>>(1);
                let notices = tx.clone();
                // The connection's messages: notices go to the broker; the end (or an error)
                // ends the wait below. A notice dropped because the broker's queue was full
                // is made up by a wake-all notice as soon as there is room again.
                let driver = tokio::spawn(async move {
                    let mut dropped = false;
                    let end = loop {
                        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                            Some(Ok(AsyncMessage::Notification(n))) => {
                                if dropped && notices.try_send(everything(0)).is_ok() {
                                    dropped = false;
                                }
                                if notices.try_send(n.payload().to_string()).is_err() {
                                    dropped = true;
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => break Some(e),
                            None => break None,
                        }
                    };
                    let _ = err_tx.send(end).await;
                });
                match client.batch_execute(&format!("LISTEN {channel}")).await {
                    Ok(()) => {
                        if !first {
                            tracing::info!("listening to the other nodes again");
                        }
                        first = false;
                        // Notices sent before this LISTEN (at open, or while disconnected)
                        // were not heard: wake everything once.
                        let _ = tx.try_send(everything(0));
                        // A server that vanished without closing the connection (a machine
                        // lost, a failover behind a network that drops packets) sends no
                        // error: a ping every few seconds, answered within the timeout or the
                        // connection is given up, finds it long before TCP keepalives would.
                        let mut ping = tokio::time::interval(PING_EVERY);
                        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        ping.tick().await;
                        loop {
                            tokio::select! {
                                end = broke.recv() => {
                                    if let Some(Some(e)) = end {
                                        tracing::warn!(error = %e, "the connection listening to the other nodes broke; reconnecting");
                                    }
                                    break;
                                }
                                _ = tx.closed() => break,
                                _ = ping.tick() => {
                                    let answered = tokio::time::timeout(
                                        PING_TIMEOUT,
                                        client.simple_query("SELECT 1"),
                                    )
                                    .await;
                                    if !matches!(answered, Ok(Ok(_))) {
                                        tracing::warn!("the connection listening to the other nodes stopped answering; reconnecting");
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen to the other nodes; trying again");
                    }
                }
                drop(client);
                driver.abort();
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot connect to listen to the other nodes");
            }
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}
