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
    /// Every subscription (the notice did not fit, or notices may have been missed).
    pub all: bool,
    /// Subscriptions whose queues changed: their dispatchers and long-polls look again.
    pub queues: Vec<SubscriptionId>,
    /// Subscriptions whose push lease its holder released: a dispatcher waiting for the lease
    /// claims it now.
    pub released: Vec<SubscriptionId>,
}

/// The notice a commit by `origin` sends; `None` when it changed nothing another node waits on.
/// Format: `<origin>;<queues>;<released>`, each id 32 hex digits, lists comma-separated, `*`
/// for every subscription.
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
    let full = format!("{origin:032x};{};{}", list(queues), list(released));
    if full.len() <= PAYLOAD_MAX {
        Some(full)
    } else {
        Some(everything(origin))
    }
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
    if queues == "*" || released == "*" {
        return Some(RemoteWake {
            all: true,
            ..RemoteWake::default()
        });
    }
    let ids = |list: &str| -> Option<Vec<SubscriptionId>> {
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
        all: false,
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
                queues: vec![sid(1), sid(u128::MAX)],
                released: vec![sid(3)],
            })
        );
        assert_eq!(decode(&n, 7), None, "a node's own notice");
        assert_eq!(encode(7, &[], &[]), None, "nothing to wake");
        let only_released = encode(7, &[], &[3]).unwrap();
        assert_eq!(decode(&only_released, 8).unwrap().released, vec![sid(3)]);
    }

    #[test]
    fn a_commit_that_changed_too_many_queues_wakes_everything() {
        let many: Vec<u128> = (0..1000).collect();
        let n = encode(7, &many, &[]).unwrap();
        assert!(n.len() <= PAYLOAD_MAX);
        assert!(decode(&n, 8).unwrap().all);
        assert!(decode(&everything(7), 8).unwrap().all);
    }

    #[test]
    fn text_that_is_not_a_notice_is_ignored() {
        for junk in ["", "hello", "zz;;", "07;1;2;3", "07;xyz;", &"f".repeat(40)] {
            assert_eq!(decode(junk, 8), None, "{junk:?}");
        }
    }
}
