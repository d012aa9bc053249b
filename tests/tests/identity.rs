//! Members, applications, API clients with rotating secrets, rights and the audit log in the
//! core. Guards against a secret that keeps working after revocation, a third secret, an
//! unknown client told apart from a wrong secret, rights leaking across Rooms, and audit
//! entries lost or out of order across a reopen.
#![forbid(unsafe_code)]

use broker_core::{AuditFilter, Broker, NewAuditEntry, Role};
use postroom_tests::{memory_broker, moved, room, setup_room, test_config, ty, who};

async fn app(broker: &Broker, code: &str) -> broker_core::Principal {
    if broker.members().unwrap().is_empty() {
        broker
            .create_member("UK/GOV/HO", "Home Office")
            .await
            .unwrap();
    }
    broker
        .create_application("UK/GOV/HO", code, "an application")
        .await
        .unwrap()
        .id
}

#[tokio::test]
async fn members_applications_and_clients() {
    let (broker, _) = memory_broker(test_config()).await;
    assert_eq!(
        broker
            .create_application("UK/GOV/HO", "irc", "")
            .await
            .unwrap_err()
            .code(),
        "identity_not_found",
        "the member must exist"
    );
    let irc = app(&broker, "irc").await;
    assert_eq!(irc.as_str(), "UK/GOV/HO/irc");
    assert_eq!(
        broker
            .create_member("UK/GOV/HO", "again")
            .await
            .unwrap_err()
            .code(),
        "identity_exists"
    );
    assert_eq!(
        broker
            .create_member("UK/GOV", "x")
            .await
            .unwrap_err()
            .code(),
        "invalid_input"
    );
    assert_eq!(
        broker.delete_member("UK/GOV/HO").await.unwrap_err().code(),
        "invalid_input",
        "a member with applications stays"
    );

    let (client, secret) = broker
        .create_client(&irc, Some("irc-centre".into()), None)
        .await
        .unwrap();
    assert_eq!(client.application, irc);
    assert!(secret.len() >= 32);
    let (authenticated, secret_id) = broker
        .authenticate_client("irc-centre", &secret)
        .await
        .unwrap();
    assert_eq!(authenticated.client_id, "irc-centre");
    assert_eq!(secret_id, 1, "the secret that matched");
    assert!(!client.incarnation.is_empty());
    assert_eq!(authenticated.incarnation, client.incarnation);
    for (id, s) in [
        ("irc-centre", "wrong-secret-123456"),
        ("nobody", secret.as_str()),
    ] {
        assert_eq!(
            broker.authenticate_client(id, s).await.unwrap_err().code(),
            "invalid_client"
        );
    }
    assert_eq!(
        broker
            .create_client(&irc, Some("short".into()), Some("tooshort".into()))
            .await
            .unwrap_err()
            .code(),
        "invalid_input"
    );

    // Rotation: a second secret, both work; a third is refused; revoke the first.
    let (second, second_secret) = broker.add_client_secret("irc-centre", None).await.unwrap();
    assert_eq!(second.id, 2);
    assert_eq!(
        broker
            .authenticate_client("irc-centre", &secret)
            .await
            .unwrap()
            .1,
        1
    );
    assert_eq!(
        broker
            .authenticate_client("irc-centre", &second_secret)
            .await
            .unwrap()
            .1,
        2,
        "the second secret is told apart from the first"
    );
    assert_eq!(
        broker
            .add_client_secret("irc-centre", None)
            .await
            .unwrap_err()
            .code(),
        "limit_exceeded"
    );
    let after = broker.revoke_client_secret("irc-centre", 1).await.unwrap();
    assert_eq!(after.secrets.iter().map(|s| s.id).collect::<Vec<_>>(), [2]);
    assert_eq!(
        broker
            .authenticate_client("irc-centre", &secret)
            .await
            .unwrap_err()
            .code(),
        "invalid_client",
        "a revoked secret stops working"
    );
    assert_eq!(
        broker
            .revoke_client_secret("irc-centre", 2)
            .await
            .unwrap_err()
            .code(),
        "invalid_input",
        "the last secret stays"
    );
    assert_eq!(broker.clients(Some(&irc)).unwrap().len(), 1);

    // Deleting the application removes its clients and rights.
    broker.grant(&irc, Role::Admin, None, None).await.unwrap();
    broker.delete_application(&irc).await.unwrap();
    assert!(broker.clients(None).unwrap().is_empty());
    assert!(broker.grants(None).unwrap().is_empty());
    assert_eq!(
        broker
            .authenticate_client("irc-centre", &second_secret)
            .await
            .unwrap_err()
            .code(),
        "invalid_client"
    );
}

#[tokio::test]
async fn grants_give_rights_per_room_and_type() {
    let (broker, _) = memory_broker(test_config()).await;
    setup_room(&broker, "r").await;
    let p = app(&broker, "pub").await;
    assert_eq!(
        broker
            .grant(&p, Role::Publisher, Some(room("nowhere")), None)
            .await
            .unwrap_err()
            .code(),
        "room_not_found"
    );
    assert_eq!(
        broker
            .grant(&p, Role::Publisher, None, None)
            .await
            .unwrap_err()
            .code(),
        "invalid_input"
    );
    assert_eq!(
        broker
            .grant(&who("UK/GOV/HO/ghost"), Role::Admin, None, None)
            .await
            .unwrap_err()
            .code(),
        "identity_not_found"
    );
    broker
        .grant(
            &p,
            Role::Publisher,
            Some(room("r")),
            Some(vec![ty("moved")]),
        )
        .await
        .unwrap();
    let rights = broker.rights(&p).unwrap();
    assert!(rights.can_publish(&room("r"), &ty("moved")));
    assert!(!rights.can_publish(&room("r"), &ty("other")));
    assert!(!rights.can_subscribe(&room("r"), None));
    assert!(!rights.manages(&room("r")));
    broker
        .revoke(&p, Role::Publisher, Some(&room("r")))
        .await
        .unwrap();
    assert!(!broker
        .rights(&p)
        .unwrap()
        .can_publish(&room("r"), &ty("moved")));
    assert_eq!(
        broker
            .revoke(&p, Role::Publisher, Some(&room("r")))
            .await
            .unwrap_err()
            .code(),
        "identity_not_found"
    );
}

#[tokio::test]
async fn the_audit_log_keeps_every_entry_in_order_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    {
        let broker = Broker::open(&path, test_config()).await.unwrap();
        for (i, error) in [None, Some("room_exists"), None].into_iter().enumerate() {
            broker
                .record_audit(NewAuditEntry {
                    actor: who(if i == 1 { "bob" } else { "alice" }),
                    action: "POST /v1/rooms".into(),
                    target: format!("/v1/rooms/r{i}"),
                    error: error.map(String::from),
                    detail: None,
                })
                .await
                .unwrap();
        }
        broker.close().await;
    }
    let broker = Broker::open(&path, test_config()).await.unwrap();
    let all = broker.audit(AuditFilter::default()).unwrap();
    assert_eq!(
        all.items.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(all.items[1].outcome, "failure");
    assert_eq!(all.items[1].error.as_deref(), Some("room_exists"));
    let alice = broker
        .audit(AuditFilter {
            actor: Some(who("alice")),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(alice.items.len(), 2);
    let paged = broker
        .audit(AuditFilter {
            limit: Some(2),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(paged.items.len(), 2);
    let rest = broker
        .audit(AuditFilter {
            cursor: paged.next_cursor,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(rest.items.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
    let failures = broker
        .audit(AuditFilter {
            outcome: Some("failure".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(failures.items.len(), 1);
    broker.close().await;
}

/// Authentication reads a client and its application's rights on every request, and the core
/// keeps those answers between writes. A change must still be seen by the very next read:
/// rights granted and revoked, a client deleted, an application deleted, each after the old
/// answer was read (and so cached).
#[tokio::test]
async fn cached_identity_reads_follow_every_change_at_once() {
    let (broker, _) = memory_broker(test_config()).await;
    setup_room(&broker, "sensors").await;
    let p = app(&broker, "reader").await;
    let publishes = |p: &broker_core::Principal| {
        broker
            .rights(p)
            .unwrap()
            .can_publish(&room("sensors"), &ty("reading"))
    };
    broker
        .create_client(&p, Some("reader-client".into()), None)
        .await
        .unwrap();

    assert!(!publishes(&p));
    broker
        .grant(&p, Role::Publisher, Some(room("sensors")), None)
        .await
        .unwrap();
    assert!(publishes(&p));
    // Read twice, so that the second answer is the cached one.
    assert!(publishes(&p));
    broker
        .revoke(&p, Role::Publisher, Some(&room("sensors")))
        .await
        .unwrap();
    assert!(!publishes(&p));

    assert_eq!(broker.client("reader-client").unwrap().application, p);
    assert_eq!(broker.client("reader-client").unwrap().application, p);
    broker.delete_client("reader-client").await.unwrap();
    assert!(broker.client("reader-client").is_err());

    // A new client of the same id for another application is seen as that application's.
    let q = app(&broker, "writer").await;
    broker
        .create_client(&q, Some("reader-client".into()), None)
        .await
        .unwrap();
    assert_eq!(broker.client("reader-client").unwrap().application, q);
    broker.delete_application(&q).await.unwrap();
    assert!(broker.client("reader-client").is_err());
}

/// A ring of signing keys: the newest signs, a retired key verifies only what it signed before
/// it retired and only during its grace, a rotation beyond the bound is refused, `drop_previous`
/// forgets every earlier key, and the ring survives a reopen. The database the broker creates
/// is private to its user (folder 0700, file 0600). Guards against a key that cannot be
/// replaced, a stolen old key that keeps signing, and a world-readable key store.
#[tokio::test]
async fn signing_keys_rotate_expire_and_persist_in_a_private_file() {
    use broker_core::{Clock, ManualClock, Rotation, Timestamp};
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data").join("db.redb");
    let clock = ManualClock::new(Timestamp(1_000_000));
    let broker = Broker::open_with_clock(&path, test_config(), std::sync::Arc::new(clock.clone()))
        .await
        .unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    assert_eq!(mode(&path), 0o600);

    let first = broker.signing_keys("tokens").await.unwrap();
    assert_eq!(first.signer().kid(), "k1");
    let rotation = Rotation {
        grace_ms: 60_000,
        keys_max: 3,
        drop_previous: false,
    };
    let t1 = clock.now();
    let second = broker.rotate_signing_key("tokens", rotation).await.unwrap();
    assert_eq!(second.signer().kid(), "k2");
    assert_ne!(second.signer().secret(), first.signer().secret());
    assert!(
        second.verifier("k1", t1, t1).is_some(),
        "signed before it retired"
    );
    assert!(
        second.verifier("k1", t1.plus_ms(1), t1).is_none(),
        "signed after"
    );
    assert!(
        second.verifier("k1", t1, t1.plus_ms(60_000)).is_none(),
        "grace over"
    );
    assert_eq!(
        broker.signing_keys("tokens").await.unwrap().version(),
        second.version(),
        "readers see the rotation at once"
    );

    clock.advance_ms(1_000);
    broker.rotate_signing_key("tokens", rotation).await.unwrap();
    assert_eq!(
        broker
            .rotate_signing_key("tokens", rotation)
            .await
            .unwrap_err()
            .code(),
        "limit_exceeded",
        "k1, k2 and k3 are all in use"
    );
    // Once k1's grace is over (k2's, from a second later, is not), there is room again and
    // k1 is gone.
    clock.advance_ms(59_500);
    let fourth = broker.rotate_signing_key("tokens", rotation).await.unwrap();
    let kids: Vec<String> = fourth
        .keys(clock.now())
        .into_iter()
        .map(|k| k.kid)
        .collect();
    assert_eq!(kids, ["k4", "k3", "k2"]);
    let dropped = broker
        .rotate_signing_key(
            "tokens",
            Rotation {
                drop_previous: true,
                ..rotation
            },
        )
        .await
        .unwrap();
    assert_eq!(dropped.keys(clock.now()).len(), 1);
    assert!(dropped.verifier("k4", clock.now(), clock.now()).is_none());
    let kept = dropped.signer().secret().to_vec();
    broker.close().await;
    drop(broker);

    let broker = Broker::open(&path, test_config()).await.unwrap();
    let reopened = broker.signing_keys("tokens").await.unwrap();
    assert_eq!(reopened.signer().kid(), "k5");
    assert_eq!(reopened.signer().secret(), kept.as_slice());
    broker.close().await;
}

/// A client deleted and created again under the same id is another incarnation, so that what
/// was issued to the first (a token) can be told from what is issued to the second.
#[tokio::test]
async fn a_client_created_again_is_another_incarnation() {
    let (broker, _) = memory_broker(test_config()).await;
    let irc = app(&broker, "irc").await;
    let (first, _) = broker
        .create_client(&irc, Some("centre".into()), None)
        .await
        .unwrap();
    broker.delete_client("centre").await.unwrap();
    let (second, _) = broker
        .create_client(&irc, Some("centre".into()), None)
        .await
        .unwrap();
    assert!(!first.incarnation.is_empty());
    assert_ne!(first.incarnation, second.incarnation);
    assert_eq!(
        broker.client("centre").unwrap().incarnation,
        second.incarnation
    );
}

/// Issue 15, defect 7. The identity cache was moved on after the writer's reply, in the
/// caller's task: a revocation whose caller stopped waiting (a request timeout, a closed
/// connection) committed, but the revoked right stayed cached until some unrelated write. Now
/// the writer moves the cache on after the commit, whoever is still waiting.
#[tokio::test]
async fn a_revocation_whose_caller_gave_up_still_takes_effect() {
    let mut config = test_config();
    config.retention.interval_ms = 0;
    let (broker, _) = memory_broker(config).await;
    setup_room(&broker, "r").await;
    let p = app(&broker, "publisher").await;
    broker
        .grant(&p, Role::Publisher, Some(room("r")), None)
        .await
        .unwrap();
    // The revocation is handed to the writer, and its caller stops waiting for the answer. A
    // writer on another core may answer within that one poll, and then the caller did not
    // give up: grant again and retry until it does.
    let r = room("r");
    let mut gave_up = false;
    for _ in 0..50 {
        // The right is read, and so cached.
        assert!(broker.rights(&p).unwrap().can_publish(&r, &ty("t")));
        use std::future::Future;
        let mut revoke = std::pin::pin!(broker.revoke(&p, Role::Publisher, Some(&r)));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // Polled once (so handed to the writer), then dropped.
        if revoke.as_mut().poll(&mut cx).is_pending() {
            gave_up = true;
            break;
        }
        broker
            .grant(&p, Role::Publisher, Some(r.clone()), None)
            .await
            .unwrap();
    }
    assert!(gave_up, "the revocation always answered within one poll");

    // The writer applies operations in order and answers each after its commit: once a publish
    // sent now is acknowledged, the revocation has committed. A publish does not move the
    // identity cache on (nor does anything else: the retention task is off), so only the
    // revocation's own commit can have made the right stop applying.
    broker.publish(moved("r", "ann", 1)).await.unwrap();
    assert!(
        !broker.rights(&p).unwrap().can_publish(&room("r"), &ty("t")),
        "the revoked right is still cached"
    );
    assert!(broker.grants(Some(&p)).unwrap().is_empty());
}
