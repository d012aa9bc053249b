//! The checks on every hand-out as it happens (a push started, a lease granted): whether that
//! delivery may go out now ([`handout`]), whether one call handed out all it should
//! ([`handout_set`]), and whether the time it gives to look again is soon enough
//! ([`next_due`]). Each returns the first violation as text.

use crate::clock::Timestamp;
use crate::subscription::SubscriptionStatus;

use super::check::ev_name;
use super::model::{Avail, Ev, Model, Sub};
use super::STRICT_KEY_BLOCK_BY_ORPHANED_PUSH;

/// Checks one hand-out (a push started, a lease granted) against the model as it stood before
/// it: the delivery is owed and due, not leased to anyone else, handed out only while the
/// subscription is active and not seeking, with an attempt number above every number used for
/// it before; with ordering, it is its key's head and no other delivery of the key is out
/// (`pushing`: the events of `s` with a push under way, whatever became of their deliveries).
pub(super) fn handout(
    model: &Model,
    s: Sub,
    ev: Ev,
    attempt: u32,
    pushing: &[Ev],
    now: Timestamp,
    high: Timestamp,
) -> Result<(), String> {
    let sub = &model.subs[s];
    let name = ev_name(model, ev);
    let Some(d) = sub.dels.get(&ev) else {
        return Err(format!("s{s} handed out {name}, which it never owed"));
    };
    let Some(o) = d.owed() else {
        return Err(format!("s{s} handed out {name}, which is {:?}", d.state));
    };
    if attempt <= d.last_no.max(d.handed) {
        return Err(format!(
            "s{s} handed out {name} as attempt {attempt}, but attempt {} was logged and {} handed out before",
            d.last_no, d.handed
        ));
    }
    if sub.status != SubscriptionStatus::Active || sub.seeking {
        return Err(format!(
            "s{s} handed out {name} while {:?}{}",
            sub.status,
            if sub.seeking { " and seeking" } else { "" }
        ));
    }
    if let Some(l) = o.lease.filter(|l| l.until > high) {
        return Err(format!(
            "s{s} handed out {name} while its lease (attempt {}) is held until {:?}",
            l.attempt, l.until
        ));
    }
    match o.avail(&sub.policy, now) {
        Avail::Due | Avail::Held => {}
        other => {
            return Err(format!(
                "s{s} handed out {name} before it is due: {other:?}"
            ))
        }
    }
    if sub.ordered {
        let key = model.events[ev].key;
        if let Some((head, _)) = model.owed(s).find(|(e, _)| model.events[*e].key == key) {
            if head != ev {
                return Err(format!(
                    "s{s} (ordered) handed out {name} before its key's head {}",
                    ev_name(model, head)
                ));
            }
        }
        for (other, oo) in model.owed(s) {
            if other != ev
                && model.events[other].key == key
                && oo.lease.is_some_and(|l| l.until > high)
            {
                return Err(format!(
                    "s{s} (ordered) handed out {name} while {} of its key is leased",
                    ev_name(model, other)
                ));
            }
        }
        for &p in pushing {
            let owed = sub.dels.get(&p).is_some_and(|d| d.owed().is_some());
            if p != ev && model.events[p].key == key && (owed || STRICT_KEY_BLOCK_BY_ORPHANED_PUSH)
            {
                return Err(format!(
                    "s{s} (ordered) handed out {name} while {} of its key is being pushed{}",
                    ev_name(model, p),
                    if owed {
                        ""
                    } else {
                        " (no longer owed: stopped or seeked past)"
                    }
                ));
            }
        }
    }
    Ok(())
}

/// What was handed out in one call against what was eligible: no repeats, nothing ineligible,
/// and, when fewer than `limit` came, everything eligible.
pub(super) fn handout_set(
    model: &Model,
    s: Sub,
    got: &[Ev],
    eligible: &[Ev],
    limit: usize,
) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for ev in got {
        if !seen.insert(*ev) {
            return Err(format!(
                "s{s} handed out {} twice at once",
                ev_name(model, *ev)
            ));
        }
        if !eligible.contains(ev) {
            return Err(format!(
                "s{s} handed out {}, which is not eligible now",
                ev_name(model, *ev)
            ));
        }
    }
    if got.len() < limit && got.len() < eligible.len() {
        let missing: Vec<String> = eligible
            .iter()
            .filter(|e| !seen.contains(e))
            .map(|e| ev_name(model, *e))
            .collect();
        return Err(format!(
            "s{s} handed out {} of at most {limit}, leaving out eligible {missing:?}",
            got.len()
        ));
    }
    Ok(())
}

/// The time the engine says to look again, when it handed out less than asked: after `now`,
/// and no later than the first time the model finds something eligible without a write.
pub(super) fn next_due(
    s: Sub,
    next: Option<Timestamp>,
    earliest: Option<Timestamp>,
    now: Timestamp,
) -> Result<(), String> {
    if next.is_some_and(|n| n <= now) {
        return Err(format!(
            "s{s}: the next due time {next:?} is not after now {now:?}"
        ));
    }
    match (next, earliest) {
        (None, Some(t)) => Err(format!(
            "s{s}: nothing said when to look again, but something falls due at {t:?}"
        )),
        (Some(n), Some(t)) if n > t => Err(format!(
            "s{s}: told to look again at {n:?}, but something falls due at {t:?}"
        )),
        _ => Ok(()),
    }
}
