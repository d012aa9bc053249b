//! The backend conformance suite: one set of checks, written against [`KvStore`] only, that every
//! backend must pass. It runs here against redb on a file, redb in memory and the in-memory
//! backend; a new backend (PostgreSQL) calls [`check_backend`] with its own factory and runs the
//! same checks unchanged.
//!
//! Each check states one invariant of `kv.rs`; the randomized one compares every read with the
//! reference semantics (`apply_to_map` over a `BTreeMap`) after every commit, with a printed seed.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::kv::{apply_to_map, Batch, Expect, KvStore, Order, Put, Space};

/// Drops a store and opens its committed data again.
pub(crate) type Reopen<'a> = dyn Fn(Arc<dyn KvStore>) -> Arc<dyn KvStore> + 'a;

/// One named check.
type Check = (&'static str, fn(&Factory<'_>));

/// Makes a fresh, empty backend; `reopen` (when given) opens the same data again, as a restart
/// does.
pub(crate) struct Factory<'a> {
    /// A new empty store.
    pub fresh: &'a dyn Fn() -> Arc<dyn KvStore>,
    /// Drops `store` and opens what it had committed again (`None`: the backend keeps nothing
    /// across a restart, so durability is not checked).
    pub reopen: Option<&'a Reopen<'a>>,
}

/// Runs every check against the backend `f` makes. Panics naming the failed check.
pub(crate) fn check_backend(name: &str, f: &Factory<'_>) {
    let checks: [Check; 11] = [
        ("put_get_delete", put_get_delete),
        ("get_many_answers_like_get", get_many_answers_like_get),
        ("batch_is_atomic_under_expect", batch_is_atomic_under_expect),
        ("last_write_in_a_batch_wins", last_write_in_a_batch_wins),
        (
            "ranges_keep_order_bounds_and_limits",
            ranges_keep_order_bounds_and_limits,
        ),
        ("spaces_are_independent", spaces_are_independent),
        ("snapshots_do_not_change", snapshots_do_not_change),
        ("odd_keys_and_large_values", odd_keys_and_large_values),
        ("committed_survives_reopen", committed_survives_reopen),
        (
            "volatile_batches_apply_in_order",
            volatile_batches_apply_in_order,
        ),
        (
            "random_batches_match_the_reference",
            random_batches_match_the_reference,
        ),
    ];
    for (check, run) in checks {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(f)));
        if let Err(e) = result {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("backend {name} fails conformance check {check}: {msg}");
        }
    }
}

fn put(space: Space, key: &[u8], value: Option<&[u8]>) -> Put {
    Put {
        space,
        key: key.to_vec(),
        value: value.map(<[u8]>::to_vec),
    }
}

fn batch(writes: Vec<Put>) -> Batch {
    Batch {
        writes,
        ..Batch::default()
    }
}

fn all(kv: &dyn KvStore, space: Space, order: Order) -> Vec<(Vec<u8>, Vec<u8>)> {
    kv.snapshot()
        .unwrap()
        .range(space, Bound::Unbounded, Bound::Unbounded, order, usize::MAX)
        .unwrap()
}

fn put_get_delete(f: &Factory<'_>) {
    let kv = (f.fresh)();
    let s = kv.snapshot().unwrap();
    assert_eq!(s.get(Space::Rooms, b"a").unwrap(), None);
    kv.commit(batch(vec![put(Space::Rooms, b"a", Some(b"1"))]))
        .unwrap();
    assert_eq!(
        kv.snapshot().unwrap().get(Space::Rooms, b"a").unwrap(),
        Some(b"1".to_vec())
    );
    kv.commit(batch(vec![put(Space::Rooms, b"a", Some(b"2"))]))
        .unwrap();
    assert_eq!(
        kv.snapshot().unwrap().get(Space::Rooms, b"a").unwrap(),
        Some(b"2".to_vec()),
        "a put replaces"
    );
    kv.commit(batch(vec![put(Space::Rooms, b"a", None)]))
        .unwrap();
    assert_eq!(
        kv.snapshot().unwrap().get(Space::Rooms, b"a").unwrap(),
        None
    );
    // Removing what is absent is not an error.
    kv.commit(batch(vec![put(Space::Rooms, b"zz", None)]))
        .unwrap();
    kv.commit(Batch::default()).unwrap();
}

fn batch_is_atomic_under_expect(f: &Factory<'_>) {
    let kv = (f.fresh)();
    kv.commit(batch(vec![put(Space::Meta, b"v", Some(b"1"))]))
        .unwrap();
    let stale = Batch {
        writes: vec![
            put(Space::Meta, b"v", Some(b"3")),
            put(Space::Rooms, b"x", Some(b"y")),
        ],
        expect: vec![Expect {
            space: Space::Meta,
            key: b"v".to_vec(),
            value: Some(b"2".to_vec()),
        }],
        ..Batch::default()
    };
    let err = kv.commit(stale).unwrap_err();
    assert_eq!(err.code(), "storage_conflict", "{err}");
    let s = kv.snapshot().unwrap();
    assert_eq!(s.get(Space::Meta, b"v").unwrap(), Some(b"1".to_vec()));
    assert_eq!(s.get(Space::Rooms, b"x").unwrap(), None, "nothing written");
    // Expecting absence, and the right value, both let the batch through.
    let fresh = Batch {
        writes: vec![put(Space::Meta, b"v", Some(b"2"))],
        expect: vec![
            Expect {
                space: Space::Meta,
                key: b"v".to_vec(),
                value: Some(b"1".to_vec()),
            },
            Expect {
                space: Space::Meta,
                key: b"w".to_vec(),
                value: None,
            },
        ],
        ..Batch::default()
    };
    kv.commit(fresh).unwrap();
    assert_eq!(
        kv.snapshot().unwrap().get(Space::Meta, b"v").unwrap(),
        Some(b"2".to_vec())
    );
}

fn last_write_in_a_batch_wins(f: &Factory<'_>) {
    let kv = (f.fresh)();
    kv.commit(batch(vec![
        put(Space::Events, b"k", Some(b"1")),
        put(Space::Events, b"k", None),
        put(Space::Events, b"j", None),
        put(Space::Events, b"j", Some(b"2")),
    ]))
    .unwrap();
    let s = kv.snapshot().unwrap();
    assert_eq!(s.get(Space::Events, b"k").unwrap(), None);
    assert_eq!(s.get(Space::Events, b"j").unwrap(), Some(b"2".to_vec()));
}

fn ranges_keep_order_bounds_and_limits(f: &Factory<'_>) {
    let kv = (f.fresh)();
    // More entries than any page size a backend might use internally.
    let n = 1_500u32;
    let writes = (0..n)
        .map(|i| put(Space::Deliveries, &i.to_be_bytes(), Some(&i.to_le_bytes())))
        .collect();
    kv.commit(batch(writes)).unwrap();
    let s = kv.snapshot().unwrap();
    let asc = s
        .range(
            Space::Deliveries,
            Bound::Unbounded,
            Bound::Unbounded,
            Order::Ascending,
            usize::MAX,
        )
        .unwrap();
    assert_eq!(asc.len(), n as usize, "no early stop");
    assert!(asc.windows(2).all(|w| w[0].0 < w[1].0), "ascending");
    let desc = s
        .range(
            Space::Deliveries,
            Bound::Unbounded,
            Bound::Unbounded,
            Order::Descending,
            usize::MAX,
        )
        .unwrap();
    assert!(
        desc.iter().rev().eq(asc.iter()),
        "descending is the reverse"
    );
    let k = |i: u32| i.to_be_bytes().to_vec();
    let page = |start: Bound<&[u8]>, end: Bound<&[u8]>, order, limit| {
        s.range(Space::Deliveries, start, end, order, limit)
            .unwrap()
            .into_iter()
            .map(|(key, _)| u32::from_be_bytes(key.try_into().unwrap()))
            .collect::<Vec<u32>>()
    };
    let (k10, k20) = (k(10), k(20));
    assert_eq!(
        page(
            Bound::Included(&k10),
            Bound::Excluded(&k20),
            Order::Ascending,
            100
        ),
        (10..20).collect::<Vec<_>>()
    );
    assert_eq!(
        page(
            Bound::Excluded(&k10),
            Bound::Included(&k20),
            Order::Ascending,
            100
        ),
        (11..=20).collect::<Vec<_>>()
    );
    assert_eq!(
        page(
            Bound::Included(&k10),
            Bound::Included(&k20),
            Order::Descending,
            3
        ),
        vec![20, 19, 18],
        "a limit takes from the right end"
    );
    assert_eq!(
        page(Bound::Included(&k10), Bound::Unbounded, Order::Ascending, 0),
        Vec::<u32>::new()
    );
    // An empty or inverted range is empty, not an error.
    assert!(page(
        Bound::Included(&k20),
        Bound::Excluded(&k10),
        Order::Ascending,
        10
    )
    .is_empty());
    assert!(page(
        Bound::Excluded(&k10),
        Bound::Excluded(&k10),
        Order::Ascending,
        10
    )
    .is_empty());
    assert_eq!(
        page(
            Bound::Included(&k10),
            Bound::Included(&k10),
            Order::Ascending,
            10
        ),
        vec![10]
    );
}

fn spaces_are_independent(f: &Factory<'_>) {
    let kv = (f.fresh)();
    kv.commit(batch(vec![
        put(Space::Rooms, b"same", Some(b"room")),
        put(Space::Events, b"same", Some(b"event")),
        put(Space::Ready, b"\xff\xff", Some(b"last space")),
        put(Space::Meta, b"", Some(b"empty key")),
    ]))
    .unwrap();
    let s = kv.snapshot().unwrap();
    assert_eq!(
        s.get(Space::Rooms, b"same").unwrap(),
        Some(b"room".to_vec())
    );
    assert_eq!(
        s.get(Space::Events, b"same").unwrap(),
        Some(b"event".to_vec())
    );
    assert_eq!(all(kv.as_ref(), Space::Rooms, Order::Ascending).len(), 1);
    assert_eq!(all(kv.as_ref(), Space::Ready, Order::Descending).len(), 1);
    assert_eq!(
        all(kv.as_ref(), Space::Meta, Order::Ascending),
        vec![(Vec::new(), b"empty key".to_vec())]
    );
    assert!(all(kv.as_ref(), Space::Schemas, Order::Ascending).is_empty());
}

fn snapshots_do_not_change(f: &Factory<'_>) {
    let kv = (f.fresh)();
    kv.commit(batch(vec![put(Space::Audit, b"1", Some(b"a"))]))
        .unwrap();
    let before = kv.snapshot().unwrap();
    kv.commit(batch(vec![
        put(Space::Audit, b"1", None),
        put(Space::Audit, b"2", Some(b"b")),
    ]))
    .unwrap();
    assert_eq!(before.get(Space::Audit, b"1").unwrap(), Some(b"a".to_vec()));
    assert_eq!(before.get(Space::Audit, b"2").unwrap(), None);
    let listed = before
        .range(
            Space::Audit,
            Bound::Unbounded,
            Bound::Unbounded,
            Order::Ascending,
            10,
        )
        .unwrap();
    assert_eq!(listed, vec![(b"1".to_vec(), b"a".to_vec())]);
    let after = kv.snapshot().unwrap();
    assert_eq!(after.get(Space::Audit, b"1").unwrap(), None);
    assert_eq!(after.get(Space::Audit, b"2").unwrap(), Some(b"b".to_vec()));
}

fn odd_keys_and_large_values(f: &Factory<'_>) {
    let kv = (f.fresh)();
    let big = vec![0xAB; 3 << 20];
    let keys: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0, 0],
        vec![0, 0xFF],
        vec![0xFF],
        vec![0xFF; 300],
    ];
    let mut writes: Vec<Put> = keys
        .iter()
        .map(|k| put(Space::Records, k, Some(k)))
        .collect();
    writes.push(put(Space::Events, b"big", Some(&big)));
    writes.push(put(Space::Events, b"empty", Some(b"")));
    kv.commit(batch(writes)).unwrap();
    let s = kv.snapshot().unwrap();
    let got: Vec<Vec<u8>> = all(kv.as_ref(), Space::Records, Order::Ascending)
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(k, v);
            k
        })
        .collect();
    assert_eq!(got, keys, "byte order, with 0x00 and 0xFF keys");
    assert_eq!(s.get(Space::Events, b"big").unwrap(), Some(big));
    assert_eq!(
        s.get(Space::Events, b"empty").unwrap(),
        Some(Vec::new()),
        "an empty value is present, not absent"
    );
}

fn committed_survives_reopen(f: &Factory<'_>) {
    let Some(reopen) = f.reopen else { return };
    let kv = (f.fresh)();
    kv.commit(batch(vec![
        put(Space::Rooms, b"kept", Some(b"1")),
        put(Space::Events, b"gone", Some(b"2")),
    ]))
    .unwrap();
    kv.commit(batch(vec![put(Space::Events, b"gone", None)]))
        .unwrap();
    let kv = reopen(kv);
    let s = kv.snapshot().unwrap();
    assert_eq!(s.get(Space::Rooms, b"kept").unwrap(), Some(b"1".to_vec()));
    assert_eq!(s.get(Space::Events, b"gone").unwrap(), None);
    kv.commit(batch(vec![put(Space::Rooms, b"after", Some(b"3"))]))
        .unwrap();
}

/// `get_many` answers each key as `get` does, in the order asked, present or absent, repeated
/// or in several spaces, and a snapshot taken before a commit keeps answering as before it.
fn get_many_answers_like_get(f: &Factory<'_>) {
    let kv = (f.fresh)();
    kv.commit(batch(vec![
        put(Space::Deliveries, b"a", Some(b"1")),
        put(Space::Deliveries, b"c", Some(b"3")),
        put(Space::Attempts, b"a", Some(b"x")),
    ]))
    .unwrap();
    let before = kv.snapshot().unwrap();
    kv.commit(batch(vec![put(Space::Deliveries, b"a", Some(b"2"))]))
        .unwrap();
    let keys = vec![
        (Space::Deliveries, b"c".to_vec()),
        (Space::Deliveries, b"b".to_vec()),
        (Space::Attempts, b"a".to_vec()),
        (Space::Deliveries, b"a".to_vec()),
        (Space::Deliveries, b"c".to_vec()),
    ];
    let want = |v: &[Option<&[u8]>]| -> Vec<Option<Vec<u8>>> {
        v.iter().map(|x| x.map(<[u8]>::to_vec)).collect()
    };
    assert_eq!(
        before.get_many(&keys).unwrap(),
        want(&[Some(b"3"), None, Some(b"x"), Some(b"1"), Some(b"3")])
    );
    let after = kv.snapshot().unwrap();
    // A key read alone first, then among others.
    assert_eq!(
        after.get(Space::Deliveries, b"a").unwrap(),
        Some(b"2".to_vec())
    );
    assert_eq!(
        after.get_many(&keys).unwrap(),
        want(&[Some(b"3"), None, Some(b"x"), Some(b"2"), Some(b"3")])
    );
    assert!(after.get_many(&[]).unwrap().is_empty());
}

/// A volatile batch is applied and read like any other, in commit order with durable ones; a
/// durable batch after it keeps both, across a restart (a clean close keeps a volatile one too).
fn volatile_batches_apply_in_order(f: &Factory<'_>) {
    let kv = (f.fresh)();
    let volatile = |writes| Batch {
        writes,
        volatile: true,
        notify: None,
        ..Batch::default()
    };
    kv.commit(volatile(vec![put(
        Space::Deliveries,
        b"d",
        Some(b"leased"),
    )]))
    .unwrap();
    assert_eq!(
        kv.snapshot().unwrap().get(Space::Deliveries, b"d").unwrap(),
        Some(b"leased".to_vec()),
        "a volatile batch is read at once"
    );
    kv.commit(batch(vec![put(Space::Attempts, b"a", Some(b"1"))]))
        .unwrap();
    kv.commit(volatile(vec![
        put(Space::Deliveries, b"d", None),
        put(Space::Deliveries, b"e", Some(b"2")),
    ]))
    .unwrap();
    let s = kv.snapshot().unwrap();
    assert_eq!(s.get(Space::Deliveries, b"d").unwrap(), None);
    assert_eq!(s.get(Space::Deliveries, b"e").unwrap(), Some(b"2".to_vec()));
    let Some(reopen) = f.reopen else { return };
    let kv = reopen(kv);
    let s = kv.snapshot().unwrap();
    assert_eq!(s.get(Space::Attempts, b"a").unwrap(), Some(b"1".to_vec()));
    assert_eq!(
        s.get(Space::Deliveries, b"d").unwrap(),
        None,
        "the durable batch made the volatile one before it durable"
    );
}

fn random_batches_match_the_reference(f: &Factory<'_>) {
    let seed: u64 = std::env::var("POSTROOM_KV_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c0de);
    let mut rng = StdRng::seed_from_u64(seed);
    let kv = (f.fresh)();
    let mut model = BTreeMap::new();
    let spaces = [Space::Deliveries, Space::Ready, Space::Attempts];
    let key = |rng: &mut StdRng| -> Vec<u8> {
        let len = rng.random_range(0..4);
        (0..len).map(|_| rng.random_range(0u8..4) * 85).collect()
    };
    for round in 0..200 {
        let ctx = format!("seed {seed} (POSTROOM_KV_SEED={seed}), round {round}");
        let mut b = Batch::default();
        for _ in 0..rng.random_range(0..8) {
            let space = spaces[rng.random_range(0..spaces.len())];
            let value = rng
                .random_bool(0.7)
                .then(|| vec![rng.random::<u8>(); rng.random_range(0..3)]);
            b.writes.push(Put {
                space,
                key: key(&mut rng),
                value,
            });
        }
        if rng.random_bool(0.2) {
            let space = spaces[rng.random_range(0..spaces.len())];
            let k = key(&mut rng);
            let value = if rng.random_bool(0.5) {
                model.get(&(space, k.clone())).cloned()
            } else {
                Some(vec![9, 9, 9])
            };
            b.expect.push(Expect {
                space,
                key: k,
                value,
            });
        }
        let mut next = model.clone();
        let expected = apply_to_map(&mut next, b.clone());
        let got = kv.commit(b);
        assert_eq!(got.is_ok(), expected.is_ok(), "{ctx}: commit outcome");
        if expected.is_ok() {
            model = next;
        }
        let s = kv.snapshot().unwrap();
        for space in spaces {
            let start = key(&mut rng);
            let end = key(&mut rng);
            let (sb, eb) = (
                if rng.random_bool(0.5) {
                    Bound::Included(start.as_slice())
                } else {
                    Bound::Excluded(start.as_slice())
                },
                if rng.random_bool(0.3) {
                    Bound::Unbounded
                } else {
                    Bound::Included(end.as_slice())
                },
            );
            let order = if rng.random_bool(0.5) {
                Order::Ascending
            } else {
                Order::Descending
            };
            let limit = rng.random_range(0..6);
            let got = s.range(space, sb, eb, order, limit).unwrap();
            let within = |k: &Vec<u8>| {
                (match sb {
                    Bound::Included(a) => k.as_slice() >= a,
                    Bound::Excluded(a) => k.as_slice() > a,
                    Bound::Unbounded => true,
                }) && (match eb {
                    Bound::Included(b) => k.as_slice() <= b,
                    Bound::Excluded(b) => k.as_slice() < b,
                    Bound::Unbounded => true,
                })
            };
            let mut want: Vec<(Vec<u8>, Vec<u8>)> = model
                .iter()
                .filter(|((sp, k), _)| *sp == space && within(k))
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect();
            if order == Order::Descending {
                want.reverse();
            }
            want.truncate(limit);
            assert_eq!(got, want, "{ctx}: range of {}", space.name());
            let k = key(&mut rng);
            assert_eq!(
                s.get(space, &k).unwrap(),
                model.get(&(space, k.clone())).cloned(),
                "{ctx}: get"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemKv, RedbKv};

    #[test]
    fn memory_backend_conforms() {
        check_backend(
            "memory",
            &Factory {
                fresh: &|| Arc::new(MemKv::new()),
                reopen: None,
            },
        );
    }

    #[test]
    fn redb_in_memory_conforms() {
        check_backend(
            "redb (in memory)",
            &Factory {
                fresh: &|| Arc::new(RedbKv::in_memory(1 << 20).unwrap()),
                reopen: None,
            },
        );
    }

    #[test]
    fn redb_on_a_file_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let n = std::sync::atomic::AtomicU32::new(0);
        let path = |i: u32| dir.path().join(format!("kv-{i}.redb"));
        let fresh = || -> Arc<dyn KvStore> {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Arc::new(RedbKv::open(&path(i), 1 << 20).unwrap())
        };
        let reopen = |kv: Arc<dyn KvStore>| -> Arc<dyn KvStore> {
            drop(kv);
            let i = n.load(std::sync::atomic::Ordering::SeqCst) - 1;
            Arc::new(RedbKv::open(&path(i), 1 << 20).unwrap())
        };
        check_backend(
            "redb (file)",
            &Factory {
                fresh: &fresh,
                reopen: Some(&reopen),
            },
        );
    }

    /// The PostgreSQL backend, each store in a fresh schema of the tests' server.
    #[test]
    fn postgres_conforms() {
        let server = crate::storage::pg_cluster::test_postgres();
        let last = std::sync::Mutex::new(None);
        let fresh = || -> Arc<dyn KvStore> {
            let config = server.fresh();
            *last.lock().unwrap() = Some(config.clone());
            Arc::new(crate::storage::PgKv::open(&config).unwrap())
        };
        let reopen = |kv: Arc<dyn KvStore>| -> Arc<dyn KvStore> {
            drop(kv);
            let config = last.lock().unwrap().clone().unwrap();
            Arc::new(crate::storage::PgKv::open(&config).unwrap())
        };
        check_backend(
            "postgres",
            &Factory {
                fresh: &fresh,
                reopen: Some(&reopen),
            },
        );
    }
}
