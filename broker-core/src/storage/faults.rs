//! Injected storage faults, for tests and simulations: make commits fail on demand, the way a
//! full disk or an I/O error does, so that what the broker does while its writes are refused can
//! be tested deterministically. [`FaultyKv`] wraps any backend and asks
//! [`StorageFaults::commit_fails`] right before it would commit a batch; when told to fail, it
//! writes nothing of the batch and returns a storage error, exactly as a failed commit does.
//!
//! Tests reach it through `Broker::storage_faults`, which exists only in the crate's own tests and
//! with the `fault-injection` feature: a production build has no way to set a fault, and the
//! check costs one atomic load per commit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::kv::{Batch, KvStore, Snapshot};
use crate::error::{Error, Result};

/// A backend whose commits fail when its [`StorageFaults`] say so.
pub(crate) struct FaultyKv {
    inner: Arc<dyn KvStore>,
    faults: Arc<StorageFaults>,
}

impl FaultyKv {
    /// Wraps `inner` with existing switches.
    pub(crate) fn with(inner: Arc<dyn KvStore>, faults: Arc<StorageFaults>) -> FaultyKv {
        FaultyKv { inner, faults }
    }
}

impl KvStore for FaultyKv {
    fn snapshot(&self) -> Result<Arc<dyn Snapshot>> {
        self.inner.snapshot()
    }

    fn commit(&self, batch: Batch) -> Result<()> {
        if self.faults.commit_fails() {
            return Err(Error::Storage(
                "injected storage fault: the commit failed".into(),
            ));
        }
        self.inner.commit(batch)
    }

    fn sync(&self) -> Result<()> {
        if self.faults.commit_fails() {
            return Err(Error::Storage(
                "injected storage fault: the sync failed".into(),
            ));
        }
        self.inner.sync()
    }

    fn recover(&self) -> Result<()> {
        self.inner.recover()
    }

    fn reads_block(&self) -> bool {
        self.inner.reads_block()
    }

    fn shared(&self) -> bool {
        self.inner.shared()
    }

    fn take_notices(&self) -> Option<tokio::sync::mpsc::Receiver<String>> {
        self.inner.take_notices()
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

/// `fail_commits` value meaning "until cleared".
const UNTIL_CLEARED: u64 = u64::MAX;

/// Switches that make a storage backend fail. Every switch starts off.
#[derive(Debug, Default)]
pub struct StorageFaults {
    /// Commits still to fail; [`UNTIL_CLEARED`] fails every commit until [`Self::clear`].
    fail_commits: AtomicU64,
    /// Commits failed by this injection so far.
    failed: AtomicU64,
    /// Read by a fillable file backend (`RedbKv::open_fillable`): while set, its writes fail
    /// with "no space left on device", as a real full disk's do.
    disk_full: Arc<AtomicBool>,
}

#[cfg_attr(not(any(test, feature = "fault-injection")), allow(dead_code))]
impl StorageFaults {
    /// Fails the next `n` commits (replacing any fault set before).
    pub fn fail_next_commits(&self, n: u64) {
        self.fail_commits
            .store(n.min(UNTIL_CLEARED - 1), Ordering::SeqCst);
    }

    /// Fails every commit until [`Self::clear`] is called.
    pub fn fail_commits(&self) {
        self.fail_commits.store(UNTIL_CLEARED, Ordering::SeqCst);
    }

    /// Makes the disk full: every write of a fillable file backend fails with an I/O error
    /// (only a broker opened with `Broker::open_with_fillable_disk` has one).
    pub fn fill_disk(&self) {
        self.disk_full.store(true, Ordering::SeqCst);
    }

    /// Frees the disk again.
    pub fn free_disk(&self) {
        self.disk_full.store(false, Ordering::SeqCst);
    }

    /// The flag a fillable backend reads.
    pub(crate) fn disk_flag(&self) -> Arc<AtomicBool> {
        self.disk_full.clone()
    }

    /// Lets commits succeed again.
    pub fn clear(&self) {
        self.fail_commits.store(0, Ordering::SeqCst);
    }

    /// How many commits these faults have failed so far.
    pub fn commits_failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    /// Asked by the backend right before a commit: true means fail this one.
    pub(crate) fn commit_fails(&self) -> bool {
        let fail = self
            .fail_commits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| match left {
                0 => None,
                UNTIL_CLEARED => Some(UNTIL_CLEARED),
                n => Some(n - 1),
            })
            .is_ok();
        if fail {
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
        fail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_down_holds_until_cleared_and_counts_failures() {
        let f = StorageFaults::default();
        assert!(!f.commit_fails());
        f.fail_next_commits(2);
        assert!(f.commit_fails());
        assert!(f.commit_fails());
        assert!(!f.commit_fails());
        f.fail_commits();
        for _ in 0..5 {
            assert!(f.commit_fails());
        }
        f.clear();
        assert!(!f.commit_fails());
        assert_eq!(f.commits_failed(), 7);
    }
}
