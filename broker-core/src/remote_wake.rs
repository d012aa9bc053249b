//! Wake-ups between brokers sharing one store (issue 16, item 3). A broker wakes its own
//! dispatchers and long-polls after each commit; the other nodes learn of that commit only
//! through the store. So each commit that changed a delivery queue carries a short notice
//! (PostgreSQL sends it with `pg_notify` in the commit's own transaction, so it arrives only if
//! the commit did), and every other node wakes the same subscriptions. This file is the notice's
//! format, as pure functions: which node sent it, which queues changed, which push leases were
//! handed over. A node that missed notices (its listening connection broke) wakes everything.

use crate::ids::SubscriptionId;

/// The PostgreSQL channel the notices of the Postroom whose tables are in `schema` travel on.
/// Channels are shared by the whole database, so the schema is part of the name: two Postroom
/// installations in two schemas of one database never wake each other.
pub(crate) fn channel(schema: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(schema.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("postroom_wake_{hex}")
}

/// The longest notice sent (PostgreSQL refuses payloads of 8,000 bytes or more); a commit that
/// changed more queues than fit says "all" instead.
pub(crate) const PAYLOAD_MAX: usize = 7_900;

/// What another node's commit asks this node to wake.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct RemoteWake {
    /// Every subscription's queue (the list did not fit, or notices may have been missed).
    pub all: bool,
    /// Every subscription's push lease may have been released (notices may have been missed):
    /// each dispatcher waiting for one looks at it. Only after a break in listening, never for
    /// a commit whose list of queues merely did not fit, so that a commit fanning out to many
    /// subscriptions does not make every node read every lease.
    pub all_released: bool,
    /// Subscriptions whose queues changed: their dispatchers and long-polls look again.
    pub queues: Vec<SubscriptionId>,
    /// Subscriptions whose push lease its holder released: a dispatcher waiting for the lease
    /// claims it now.
    pub released: Vec<SubscriptionId>,
}

/// The notice a commit by `origin` sends; `None` when it changed nothing another node waits on.
/// Format: `<origin>;<queues>;<released>`, each id 32 hex digits, lists comma-separated, `*`
/// for every subscription. A list that does not fit becomes `*` alone: the queues' first (a
/// commit fanning out to many subscriptions), the released leases' only if still too long.
pub(crate) fn encode(origin: u128, queues: &[u128], released: &[u128]) -> Option<String> {
    if queues.is_empty() && released.is_empty() {
        return None;
    }
    let list = |ids: &[u128]| {
        ids.iter()
            .map(|id| format!("{id:032x}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let (q, r) = (list(queues), list(released));
    let head = 32 + 2;
    if head + q.len() + r.len() <= PAYLOAD_MAX {
        return Some(format!("{origin:032x};{q};{r}"));
    }
    if head + 1 + r.len() <= PAYLOAD_MAX {
        return Some(format!("{origin:032x};*;{r}"));
    }
    Some(everything(origin))
}

/// The notice that wakes every subscription on every other node.
pub(crate) fn everything(origin: u128) -> String {
    format!("{origin:032x};*;*")
}

/// What a notice asks of node `own`: `None` for its own notices and for text that is not a
/// notice (it is ignored: nothing but a wake-up rides on it).
pub(crate) fn decode(payload: &str, own: u128) -> Option<RemoteWake> {
    let mut parts = payload.split(';');
    let origin = u128::from_str_radix(parts.next()?, 16).ok()?;
    if origin == own {
        return None;
    }
    let (queues, released) = (parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let ids = |list: &str| -> Option<Vec<SubscriptionId>> {
        if list == "*" {
            return Some(Vec::new());
        }
        list.split(',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                u128::from_str_radix(s, 16)
                    .ok()
                    .map(|n| SubscriptionId(uuid::Uuid::from_u128(n)))
            })
            .collect()
    };
    Some(RemoteWake {
        all: queues == "*",
        all_released: released == "*",
        queues: ids(queues)?,
        released: ids(released)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(n: u128) -> SubscriptionId {
        SubscriptionId(uuid::Uuid::from_u128(n))
    }

    #[test]
    fn a_notice_names_what_changed_and_its_sender_ignores_it() {
        let n = encode(7, &[1, u128::MAX], &[3]).expect("a notice");
        assert_eq!(
            decode(&n, 8),
            Some(RemoteWake {
                all: false,
                all_released: false,
                queues: vec![sid(1), sid(u128::MAX)],
                released: vec![sid(3)],
            })
        );
        assert_eq!(decode(&n, 7), None, "a node's own notice");
        assert_eq!(encode(7, &[], &[]), None, "nothing to wake");
        let only_released = encode(7, &[], &[3]).unwrap();
        assert_eq!(decode(&only_released, 8).unwrap().released, vec![sid(3)]);
    }

    /// A commit fanning out to more subscriptions than a notice holds wakes every queue but
    /// no lease: before, it also had every dispatcher on every node read its lease.
    #[test]
    fn a_commit_that_changed_too_many_queues_wakes_every_queue_but_no_lease() {
        let many: Vec<u128> = (0..1000).collect();
        let n = encode(7, &many, &[3]).unwrap();
        assert!(n.len() <= PAYLOAD_MAX);
        let wake = decode(&n, 8).unwrap();
        assert!(wake.all && !wake.all_released, "{wake:?}");
        assert_eq!(wake.released, vec![sid(3)]);
        let both = encode(7, &many, &many).unwrap();
        assert!(both.len() <= PAYLOAD_MAX);
        let everything = decode(&everything(7), 8).unwrap();
        assert!(everything.all && everything.all_released);
        assert_eq!(decode(&both, 8).unwrap(), everything);
    }

    #[test]
    fn text_that_is_not_a_notice_is_ignored() {
        for junk in ["", "hello", "zz;;", "07;1;2;3", "07;xyz;", &"f".repeat(40)] {
            assert_eq!(decode(junk, 8), None, "{junk:?}");
        }
    }
}
