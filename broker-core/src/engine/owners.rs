//! The engine's side of push leases on a shared store (`ownership.rs` holds the rules): claiming
//! and releasing a subscription's lease inside a write transaction, checking an outcome's
//! lease in the outcome's own transaction, and reading the lease. Kept apart from the queue
//! code because a store only one broker writes never calls it.

use uuid::Uuid;

use super::spaces::DISPATCH_LEASES;
use super::{Engine, Tables};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::ids::SubscriptionId;
use crate::ownership::{self, Claim, DispatchLease};
use crate::storage::kv::Space;
use crate::storage::txn::key_bytes;

fn lease_of(row: (u128, u64, u64)) -> DispatchLease {
    DispatchLease {
        node: row.0,
        epoch: row.1,
        until: Timestamp(row.2),
    }
}

fn row_of(l: &DispatchLease) -> (u128, u64, u64) {
    (l.node, l.epoch, l.until.as_ms())
}

impl Tables<'_> {
    fn dispatch_lease(&self, sub: u128) -> Result<Option<DispatchLease>> {
        Ok(self.dispatch_leases.get(sub)?.map(lease_of))
    }

    /// `node` asks for the push lease of `sub` (see [`ownership::claim`]). The lease row is
    /// written when granted, so two nodes claiming at once are fenced like any other write;
    /// a subscription that is gone is refused as not found (a pull subscription may be
    /// claimed: its dispatcher ends at its next read of the subscription).
    pub(super) fn claim_dispatch(
        &mut self,
        now: Timestamp,
        sub: u128,
        node: u128,
        lease_ms: u64,
    ) -> Result<Claim> {
        self.sub_record(sub)?;
        let claim = ownership::claim(self.dispatch_lease(sub)?, node, now, lease_ms);
        if let Claim::Granted(l) = &claim {
            self.dispatch_leases.insert(sub, row_of(l))?;
        }
        Ok(claim)
    }

    /// Ends the leases `node` holds among `subs` (at shutdown), so that another node takes
    /// them at once; how many it released.
    pub(super) fn release_dispatch(&mut self, subs: &[SubscriptionId], node: u128) -> Result<u64> {
        let mut n = 0;
        for id in subs {
            let sub = id.0.as_u128();
            if let Some(l) = ownership::release(self.dispatch_lease(sub)?, node) {
                self.dispatch_leases.insert(sub, row_of(&l))?;
                self.released.push(sub);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Refuses an outcome pushed under a lease that is no longer the current one; otherwise
    /// makes the commit depend on the lease row as read, so that a takeover committed by
    /// another node meanwhile makes this commit conflict rather than record.
    pub(super) fn check_dispatch(&mut self, sub: u128, node: u128, epoch: u64) -> Result<()> {
        if !ownership::may_record(self.dispatch_lease(sub)?, node, epoch) {
            return Err(Error::DispatchLeaseLost {
                subscription: Uuid::from_u128(sub).to_string(),
            });
        }
        self.txn
            .guard(Space::DispatchLeases, key_bytes::<u128, _>(&sub));
        Ok(())
    }

    /// Removes a purged subscription's lease.
    pub(super) fn forget_dispatch(&mut self, sub: u128) -> Result<()> {
        self.dispatch_leases.remove(sub)?;
        Ok(())
    }
}

impl Engine {
    /// The stored push lease of a subscription, if any.
    pub(super) fn dispatch_lease_read(&self, id: SubscriptionId) -> Result<Option<DispatchLease>> {
        let txn = self.begin_read()?;
        Ok(txn
            .open_table(DISPATCH_LEASES)?
            .get(id.0.as_u128())?
            .map(lease_of))
    }
}
