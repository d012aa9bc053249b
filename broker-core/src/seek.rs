//! Seek: moving a subscription to a point in its Room's log. It is several writes (clear the
//! queue below the end, queue again from the point, let the subscription go), so it runs on a
//! task of its own, one seek of a subscription at a time, and lets the subscription go whatever
//! happens to its caller.

use std::time::Duration;

use crate::broker::{unexpected, Broker};
use crate::clock::Timestamp;
use crate::delivery_api::{count, BULK_STEP_MAX};
use crate::error::{Error, Result};
use crate::ids::SubscriptionId;
use crate::storage::{DeliveryOp, WriteOutput};
use crate::subscription::SeekTarget;

impl Broker {
    /// Moves a subscription to a point in its Room's log: undelivered events before it are
    /// dropped from its queue, and every retained event from it on is queued again (delivered
    /// once more, with the same ids, so receivers that drop repeats by id see no change).
    /// Returns how many events were queued.
    ///
    /// A seek is several writes (the subscription holds its deliveries meanwhile). They run on a
    /// task of their own, one seek of a subscription at a time, so that a caller that stops
    /// waiting (a request timeout, a closed connection) does not leave the subscription held,
    /// and two seeks never interleave. A step the writer refuses for now (overloaded, storage
    /// failing) is retried with a bounded backoff; whatever happens, the subscription is let go
    /// at the end.
    pub async fn seek(&self, id: SubscriptionId, target: SeekTarget) -> Result<u64> {
        let sub = self.subscription(id)?;
        self.check_subscriber(&sub).await?;
        let at: Option<Timestamp> = match target {
            SeekTarget::Oldest => None,
            SeekTarget::Time(t) => Some(t),
        };
        let (from, end) = self.inner().store.seek_offsets(&sub.room, at)?;
        let signals = self.inner().signals.get(id);
        let broker = self.clone();
        tokio::spawn(async move {
            let _one_at_a_time = signals.seek.lock().await;
            let steps = broker.seek_steps(id, from, end).await;
            let done = broker
                .seek_step(|| DeliveryOp::SeekDone { id })
                .await
                .and_then(|out| match out {
                    WriteOutput::Subscription(..) => Ok(()),
                    other => Err(unexpected(other)),
                });
            let queued = steps?;
            done.map(|()| queued)
        })
        .await
        .map_err(|e| Error::Storage(format!("seek task: {e}")))?
    }

    /// The clearing and queueing steps of a seek; see [`Broker::seek`].
    async fn seek_steps(&self, id: SubscriptionId, from: u64, end: u64) -> Result<u64> {
        loop {
            let (_, more) = count(
                self.seek_step(|| DeliveryOp::SeekClear {
                    id,
                    below: end,
                    limit: BULK_STEP_MAX,
                })
                .await?,
            )?;
            if !more {
                break;
            }
        }
        let mut queued = 0;
        let mut next = Some(from);
        while let Some(f) = next {
            match self
                .seek_step(|| DeliveryOp::SeekEnqueue {
                    id,
                    from: f,
                    to: end,
                    limit: BULK_STEP_MAX,
                })
                .await?
            {
                WriteOutput::Seeked { n, next: nx } => {
                    queued += n;
                    next = nx;
                }
                other => return Err(unexpected(other)),
            }
        }
        Ok(queued)
    }

    /// One write of a seek, retried while the writer refuses it for now (overloaded, the
    /// storage failing, or its batch lost a race with another broker sharing the store), at
    /// most [`SEEK_STEP_TRIES`] times with a doubling delay, and not once the broker is closing.
    async fn seek_step(&self, op: impl Fn() -> DeliveryOp) -> Result<WriteOutput> {
        let mut delay = Duration::from_millis(50);
        let mut tries = 1;
        loop {
            match self.delivery(op()).await {
                Err(
                    Error::Overloaded { .. }
                    | Error::StorageUnavailable { .. }
                    | Error::StorageConflict { .. },
                ) if tries < SEEK_STEP_TRIES
                    && !self
                        .inner()
                        .closing
                        .load(std::sync::atomic::Ordering::SeqCst) =>
                {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    tries += 1;
                }
                other => return other,
            }
        }
    }
}

/// Most tries of one seek step the writer refuses for now (about a minute of backoff).
const SEEK_STEP_TRIES: u32 = 36;
