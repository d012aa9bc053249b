//! A write transaction the core builds over a backend's [`Snapshot`]: writes stay in memory,
//! reads see them over the snapshot, and at the end the writes become one [`Batch`]. Savepoints
//! let one operation of a group commit be undone alone, so that one failing operation (a record
//! that does not decode, a logical refusal) never fails the others in its batch.
//!
//! The core's record code reads and writes through typed [`Table`] handles, whose keys and
//! values encode as `encoding.rs` says.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::rc::Rc;
use std::sync::Arc;

pub(crate) use super::encoding::{key_bytes, key_from, Key, KeyArg, Value, ValueArg};
use super::kv::{Batch, Entry, Expect, Order, Put, Snapshot, Space};
use crate::error::{Error, Result};

/// Entries fetched from the snapshot by a range's first page; each later page is four times
/// larger, up to [`PAGE_MAX`]. Most ranges the engine reads stop after a few entries (the due
/// heads of a queue, the last attempt of a delivery), so a small first page saves copying what
/// is never looked at, and long walks still go in large pages.
const PAGE_FIRST: usize = 16;
/// The largest page.
const PAGE_MAX: usize = 1024;

type Pending = BTreeMap<(Space, Vec<u8>), Option<Vec<u8>>>;
/// A key of a transaction: its space and bytes.
type SpaceKey = (Space, Vec<u8>);
/// What `pending` held for a key before a write (`None`: nothing pending).
type Before = Option<Option<Vec<u8>>>;

struct Inner {
    snapshot: Arc<dyn Snapshot>,
    pending: Pending,
    /// (key, what `pending` held for it before) for every write, oldest first.
    undo: Vec<(SpaceKey, Before)>,
    /// Keys read (not written) that the commit must still find as the snapshot held them
    /// (see [`Txn::guard`]).
    guarded: Vec<SpaceKey>,
    read_only: bool,
}

/// A transaction: a snapshot plus pending writes. Cheap to clone (a shared handle).
#[derive(Clone)]
pub(crate) struct Txn(Rc<RefCell<Inner>>);

/// A point [`Txn::rollback_to`] can return to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Savepoint(usize);

impl Txn {
    /// A transaction that may write.
    pub(crate) fn new(snapshot: Arc<dyn Snapshot>) -> Txn {
        Self::build(snapshot, false)
    }

    /// A read-only view (a write is a bug and fails).
    pub(crate) fn reader(snapshot: Arc<dyn Snapshot>) -> Txn {
        Self::build(snapshot, true)
    }

    fn build(snapshot: Arc<dyn Snapshot>, read_only: bool) -> Txn {
        Txn(Rc::new(RefCell::new(Inner {
            snapshot,
            pending: BTreeMap::new(),
            undo: Vec::new(),
            guarded: Vec::new(),
            read_only,
        })))
    }

    /// The value of a key as this transaction sees it.
    pub(crate) fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let inner = self.0.borrow();
        if let Some(v) = inner.pending.get(&(space, key.to_vec())) {
            return Ok(v.clone());
        }
        let snapshot = inner.snapshot.clone();
        drop(inner);
        snapshot.get(space, key)
    }

    /// Sets (`Some`) or removes (`None`) a key.
    pub(crate) fn put(&self, space: Space, key: Vec<u8>, value: Option<Vec<u8>>) -> Result<()> {
        let mut inner = self.0.borrow_mut();
        if inner.read_only {
            return Err(Error::Storage(format!(
                "write to {} in a read-only view",
                space.name()
            )));
        }
        let before = inner.pending.insert((space, key.clone()), value);
        inner.undo.push(((space, key), before));
        Ok(())
    }

    /// Where [`Self::rollback_to`] returns to.
    pub(crate) fn savepoint(&self) -> Savepoint {
        Savepoint(self.0.borrow().undo.len())
    }

    /// Undoes every write made after `sp`.
    pub(crate) fn rollback_to(&self, sp: Savepoint) {
        let mut inner = self.0.borrow_mut();
        while inner.undo.len() > sp.0 {
            let Some((key, before)) = inner.undo.pop() else {
                break;
            };
            match before {
                Some(v) => {
                    inner.pending.insert(key, v);
                }
                None => {
                    inner.pending.remove(&key);
                }
            }
        }
    }

    /// Makes the commit depend on a key this transaction only reads: on a shared store,
    /// [`Self::fence`] then also requires it to hold what the snapshot held, as it does for
    /// every written key, so that a decision taken on it (a push lease still held) cannot
    /// commit after another writer changed it. A guard is kept even if the operation that set
    /// it is rolled back: at worst the batch conflicts once more than it had to.
    pub(crate) fn guard(&self, space: Space, key: Vec<u8>) {
        self.0.borrow_mut().guarded.push((space, key));
    }

    /// The pending writes as one batch (the transaction is left empty).
    pub(crate) fn take_batch(&self) -> Batch {
        let mut inner = self.0.borrow_mut();
        inner.undo.clear();
        let pending = std::mem::take(&mut inner.pending);
        Batch {
            writes: pending
                .into_iter()
                .map(|((space, key), value)| Put { space, key, value })
                .collect(),
            expect: Vec::new(),
            volatile: false,
            notify: None,
        }
    }

    /// Adds to `batch` the condition that each key it writes (and each key it guards, see
    /// [`Self::guard`]) still holds what this transaction's snapshot held (see [`super::kv::KvStore::shared`]): a write-write conflict
    /// with a batch another writer committed since the snapshot then fails the commit.
    pub(crate) fn fence(&self, batch: &mut Batch) -> Result<()> {
        let (snapshot, guarded) = {
            let mut inner = self.0.borrow_mut();
            (inner.snapshot.clone(), std::mem::take(&mut inner.guarded))
        };
        let mut keys: Vec<(Space, Vec<u8>)> = batch
            .writes
            .iter()
            .map(|w| (w.space, w.key.clone()))
            .collect();
        // Guards are rare (a push outcome's lease): most batches skip this.
        if !guarded.is_empty() {
            let written: std::collections::BTreeSet<&SpaceKey> = keys.iter().collect();
            let mut only_read: Vec<SpaceKey> = guarded
                .into_iter()
                .filter(|k| !written.contains(k))
                .collect();
            only_read.sort();
            only_read.dedup();
            keys.extend(only_read);
        }
        let values = snapshot.get_many(&keys)?;
        for ((space, key), value) in keys.into_iter().zip(values) {
            batch.expect.push(Expect { space, key, value });
        }
        Ok(())
    }

    /// Entries within the bounds, in `order`, pending writes included. The snapshot is read a
    /// page at a time as the iterator advances; pending writes are taken as of this call.
    pub(crate) fn range(
        &self,
        space: Space,
        start: Bound<Vec<u8>>,
        end: Bound<Vec<u8>>,
        order: Order,
    ) -> RawRange {
        let inner = self.0.borrow();
        // Only the pending writes within the bounds are visited: a large batch (a group commit
        // of many operations) has many pending writes per space, and walking all of them on
        // every range read made the writer quadratic in its batch.
        let mut overlay: Vec<(Vec<u8>, Option<Vec<u8>>)> = if empty_bounds(&start, &end) {
            Vec::new()
        } else {
            let lo = match &start {
                Bound::Included(s) => Bound::Included((space, s.clone())),
                Bound::Excluded(s) => Bound::Excluded((space, s.clone())),
                Bound::Unbounded => Bound::Included((space, Vec::new())),
            };
            let hi = match &end {
                Bound::Included(e) => Bound::Included((space, e.clone())),
                Bound::Excluded(e) => Bound::Excluded((space, e.clone())),
                Bound::Unbounded => Bound::Unbounded,
            };
            inner
                .pending
                .range((lo, hi))
                .take_while(|((s, _), _)| *s == space)
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect()
        };
        if order == Order::Descending {
            overlay.reverse();
        }
        RawRange {
            snapshot: inner.snapshot.clone(),
            space,
            start,
            end,
            order,
            page: VecDeque::new(),
            page_len: PAGE_FIRST,
            snapshot_done: false,
            overlay: overlay.into(),
        }
    }
}

/// Whether no key can lie within the bounds (a `BTreeMap` range over them would panic).
fn empty_bounds(start: &Bound<Vec<u8>>, end: &Bound<Vec<u8>>) -> bool {
    match (start, end) {
        (Bound::Included(s), Bound::Included(e)) => s > e,
        (Bound::Included(s), Bound::Excluded(e))
        | (Bound::Excluded(s), Bound::Included(e))
        | (Bound::Excluded(s), Bound::Excluded(e)) => s >= e,
        _ => false,
    }
}

/// An iterator over a range of raw entries; see [`Txn::range`].
pub(crate) struct RawRange {
    snapshot: Arc<dyn Snapshot>,
    space: Space,
    start: Bound<Vec<u8>>,
    end: Bound<Vec<u8>>,
    order: Order,
    page: VecDeque<Entry>,
    /// How many entries the next page fetches.
    page_len: usize,
    snapshot_done: bool,
    overlay: VecDeque<(Vec<u8>, Option<Vec<u8>>)>,
}

impl RawRange {
    fn fill(&mut self) -> Result<()> {
        if !self.page.is_empty() || self.snapshot_done {
            return Ok(());
        }
        let got = self.snapshot.range(
            self.space,
            bound_ref(&self.start),
            bound_ref(&self.end),
            self.order,
            self.page_len,
        )?;
        if got.len() < self.page_len {
            self.snapshot_done = true;
        }
        self.page_len = (self.page_len * 4).min(PAGE_MAX);
        if let Some((last, _)) = got.last() {
            // The next page starts after the last key seen.
            match self.order {
                Order::Ascending => self.start = Bound::Excluded(last.clone()),
                Order::Descending => self.end = Bound::Excluded(last.clone()),
            }
        }
        self.page.extend(got);
        Ok(())
    }

    fn before(&self, a: &[u8], b: &[u8]) -> bool {
        match self.order {
            Order::Ascending => a < b,
            Order::Descending => a > b,
        }
    }
}

fn bound_ref(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match b {
        Bound::Included(v) => Bound::Included(v.as_slice()),
        Bound::Excluded(v) => Bound::Excluded(v.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl Iterator for RawRange {
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Result<Entry>> {
        loop {
            if let Err(e) = self.fill() {
                self.snapshot_done = true;
                self.page.clear();
                self.overlay.clear();
                return Some(Err(e));
            }
            let take_overlay = match (self.page.front(), self.overlay.front()) {
                (None, None) => return None,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((pk, _)), Some((ok, _))) => {
                    if pk == ok {
                        // The pending write replaces the committed entry.
                        self.page.pop_front();
                        true
                    } else {
                        self.before(ok, pk)
                    }
                }
            };
            if take_overlay {
                let (k, v) = self.overlay.pop_front()?;
                match v {
                    Some(v) => return Some(Ok((k, v))),
                    None => continue,
                }
            }
            return self.page.pop_front().map(Ok);
        }
    }
}

/// A typed key space: which space, with which key and value types.
pub(crate) struct Def<K, V> {
    space: Space,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Def<K, V> {
    /// The definition of `space`.
    pub(crate) const fn new(space: Space) -> Self {
        Def {
            space,
            _types: PhantomData,
        }
    }
}

impl<K, V> Clone for Def<K, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K, V> Copy for Def<K, V> {}

impl Txn {
    /// The typed table `def` within this transaction.
    pub(crate) fn open_table<K: Key, V: Value>(&self, def: Def<K, V>) -> Result<Table<K, V>> {
        Ok(Table::open(self, def.space))
    }
}

/// A typed view of one key space within a transaction.
pub(crate) struct Table<K, V> {
    space: Space,
    txn: Txn,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K: Key, V: Value> Table<K, V> {
    /// The table of `space` in `txn`.
    pub(crate) fn open(txn: &Txn, space: Space) -> Self {
        Table {
            space,
            txn: txn.clone(),
            _types: PhantomData,
        }
    }

    /// The value under a key.
    pub(crate) fn get(&self, k: impl KeyArg<K>) -> Result<Option<V>> {
        match self.txn.get(self.space, &key_bytes(&k))? {
            Some(b) => V::from_bytes(b).map(Some),
            None => Ok(None),
        }
    }

    /// True when the key is present (tests).
    #[cfg(test)]
    pub(crate) fn contains_key(&self, k: impl KeyArg<K>) -> Result<bool> {
        Ok(self.txn.get(self.space, &key_bytes(&k))?.is_some())
    }

    /// Sets a key's value.
    pub(crate) fn insert(&self, k: impl KeyArg<K>, v: impl ValueArg<V>) -> Result<()> {
        self.txn.put(self.space, key_bytes(&k), Some(v.to_bytes()))
    }

    /// Removes a key, returning what it held.
    pub(crate) fn remove(&self, k: impl KeyArg<K>) -> Result<Option<V>> {
        let key = key_bytes(&k);
        let old = self.txn.get(self.space, &key)?;
        if old.is_some() {
            self.txn.put(self.space, key, None)?;
        }
        old.map(V::from_bytes).transpose()
    }

    /// Entries with keys in `r`, ascending.
    pub(crate) fn range<A: KeyArg<K>>(&self, r: impl RangeBounds<A>) -> Result<Range<K, V>> {
        Ok(self.range_in(r, Order::Ascending))
    }

    /// Entries with keys in `r`, descending.
    pub(crate) fn range_rev<A: KeyArg<K>>(&self, r: impl RangeBounds<A>) -> Result<Range<K, V>> {
        Ok(self.range_in(r, Order::Descending))
    }

    fn range_in<A: KeyArg<K>>(&self, r: impl RangeBounds<A>, order: Order) -> Range<K, V> {
        let map = |b: Bound<&A>| match b {
            Bound::Included(a) => Bound::Included(key_bytes(a)),
            Bound::Excluded(a) => Bound::Excluded(key_bytes(a)),
            Bound::Unbounded => Bound::Unbounded,
        };
        self.raw_range(map(r.start_bound()), map(r.end_bound()), order)
    }

    fn raw_range(&self, start: Bound<Vec<u8>>, end: Bound<Vec<u8>>, order: Order) -> Range<K, V> {
        Range {
            raw: self.txn.range(self.space, start, end, order),
            _types: PhantomData,
        }
    }

    /// The first entry with a key in `r`, ascending (fetches one entry, not a page).
    pub(crate) fn first<A: KeyArg<K>>(&self, r: impl RangeBounds<A>) -> Result<Option<(K, V)>> {
        let mut range = self.range_in(r, Order::Ascending);
        range.raw.page_len = 1;
        range.next().transpose()
    }

    /// The last entry with a key in `r` (fetches one entry, not a page).
    pub(crate) fn first_rev<A: KeyArg<K>>(&self, r: impl RangeBounds<A>) -> Result<Option<(K, V)>> {
        let mut range = self.range_in(r, Order::Descending);
        range.raw.page_len = 1;
        range.next().transpose()
    }

    /// Every entry, ascending.
    pub(crate) fn iter(&self) -> Result<Range<K, V>> {
        Ok(self.raw_range(Bound::Unbounded, Bound::Unbounded, Order::Ascending))
    }

    /// The entry with the greatest key.
    pub(crate) fn last(&self) -> Result<Option<(K, V)>> {
        let mut range = self.raw_range(Bound::Unbounded, Bound::Unbounded, Order::Descending);
        range.raw.page_len = 1;
        range.next().transpose()
    }
}

/// A typed range; see [`Table::range`].
pub(crate) struct Range<K, V> {
    raw: RawRange,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K: Key, V: Value> Iterator for Range<K, V> {
    type Item = Result<(K, V)>;

    fn next(&mut self) -> Option<Self::Item> {
        let (k, v) = match self.raw.next()? {
            Ok(e) => e,
            Err(e) => return Some(Err(e)),
        };
        Some(key_from::<K>(&k).and_then(|k| Ok((k, V::from_bytes(v)?))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::kv::KvStore;
    use crate::storage::MemKv;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A transaction reads its own pending writes merged into the snapshot, in order, across
    /// page boundaries, and a rollback to a savepoint restores exactly what was pending then.
    #[test]
    fn pending_writes_merge_with_the_snapshot_and_roll_back() {
        for seed in 0..40u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let kv = MemKv::new();
            let mut committed = BTreeMap::new();
            let mut b = Batch::default();
            // Enough committed keys for several pages.
            for _ in 0..rng.random_range(0..700) {
                let k: u16 = rng.random_range(0..1000);
                let v = vec![rng.random::<u8>()];
                committed.insert(k.to_be_bytes().to_vec(), v.clone());
                b.writes.push(Put {
                    space: Space::Deliveries,
                    key: k.to_be_bytes().to_vec(),
                    value: Some(v),
                });
            }
            kv.commit(b).unwrap();
            let txn = Txn::new(kv.snapshot().unwrap());
            let mut model = committed.clone();
            type Model = BTreeMap<Vec<u8>, Vec<u8>>;
            let mut saved: Vec<(Savepoint, Model)> = Vec::new();
            for step in 0..300 {
                let ctx = format!("seed {seed}, step {step}");
                match rng.random_range(0..10) {
                    0 => saved.push((txn.savepoint(), model.clone())),
                    1 if !saved.is_empty() => {
                        let i = rng.random_range(0..saved.len());
                        let (sp, m) = saved[i].clone();
                        saved.truncate(i);
                        txn.rollback_to(sp);
                        model = m;
                    }
                    2..=5 => {
                        let k = rng.random_range(0u16..1000).to_be_bytes().to_vec();
                        let v = vec![rng.random::<u8>(), 7];
                        txn.put(Space::Deliveries, k.clone(), Some(v.clone()))
                            .unwrap();
                        model.insert(k, v);
                    }
                    _ => {
                        let k = rng.random_range(0u16..1000).to_be_bytes().to_vec();
                        txn.put(Space::Deliveries, k.clone(), None).unwrap();
                        model.remove(&k);
                    }
                }
                // A pending write in the spaces on either side must never show.
                for other in [Space::DeadLetters, Space::SubStats] {
                    let k = rng.random_range(0u16..1000).to_be_bytes().to_vec();
                    txn.put(other, k, Some(vec![9])).unwrap();
                }
                let lo = rng.random_range(0u16..1000).to_be_bytes().to_vec();
                let hi = rng.random_range(0u16..1000).to_be_bytes().to_vec();
                let bound = |rng: &mut StdRng, k: &Vec<u8>| match rng.random_range(0..3) {
                    0 => Bound::Included(k.clone()),
                    1 => Bound::Excluded(k.clone()),
                    _ => Bound::Unbounded,
                };
                let (start, end) = (bound(&mut rng, &lo), bound(&mut rng, &hi));
                let order = if rng.random_bool(0.5) {
                    Order::Ascending
                } else {
                    Order::Descending
                };
                let got: Vec<Entry> = txn
                    .range(Space::Deliveries, start.clone(), end.clone(), order)
                    .collect::<Result<_>>()
                    .unwrap();
                let mut want: Vec<Entry> = model
                    .iter()
                    .filter(|(k, _)| {
                        let after = match &start {
                            Bound::Included(s) => *k >= s,
                            Bound::Excluded(s) => *k > s,
                            Bound::Unbounded => true,
                        };
                        let before = match &end {
                            Bound::Included(e) => *k <= e,
                            Bound::Excluded(e) => *k < e,
                            Bound::Unbounded => true,
                        };
                        after && before
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if order == Order::Descending {
                    want.reverse();
                }
                assert_eq!(got, want, "{ctx}: range {start:?}..{end:?}");
                assert_eq!(
                    txn.get(Space::Deliveries, &lo).unwrap(),
                    model.get(&lo).cloned(),
                    "{ctx}: get"
                );
            }
            // The batch turns the snapshot into the model.
            kv.commit(txn.take_batch()).unwrap();
            let after = Txn::reader(kv.snapshot().unwrap());
            let all: BTreeMap<Vec<u8>, Vec<u8>> = after
                .range(
                    Space::Deliveries,
                    Bound::Unbounded,
                    Bound::Unbounded,
                    Order::Ascending,
                )
                .collect::<Result<_>>()
                .unwrap();
            assert_eq!(all, model, "seed {seed}: committed batch");
            assert!(
                after.put(Space::Deliveries, vec![1], None).is_err(),
                "read-only"
            );
        }
    }

    #[test]
    fn key_order_is_natural_order() {
        let keys: Vec<(u64, String)> = vec![
            (1, "".into()),
            (1, "a".into()),
            (1, "a\0".into()),
            (1, "a\0b".into()),
            (1, "ab".into()),
            (1, "b".into()),
            (2, "".into()),
            (256, "a".into()),
        ];
        let enc: Vec<Vec<u8>> = keys.iter().map(key_bytes).collect();
        let mut sorted = enc.clone();
        sorted.sort();
        assert_eq!(sorted, enc, "encoded keys sort as the keys do");
        for (k, e) in keys.iter().zip(&enc) {
            assert_eq!(&key_from::<(u64, String)>(e).unwrap(), k);
        }
        assert!(key_from::<(u64, String)>(&enc[1][..9]).is_err());
    }
}
