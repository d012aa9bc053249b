//! Access control end to end through the router: the OAuth 2.0 token endpoint (RFC 6749
//! client credentials, both client authentication methods, its error answers), token expiry on
//! the injected clock, secret rotation, the first-start administrator, the GovStack header
//! check, the audit log, and a matrix of every role against every endpoint. Guards against an
//! endpoint that forgets its rights check, and against a token outliving its client.
#![forbid(unsafe_code)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use base64::Engine;
use broker_core::{Broker, ManualClock, Timestamp};
use broker_server::{router, ServerConfig};
use serde_json::{json, Value};
use tower::ServiceExt;

const ADMIN_SECRET: &str = "the-administrators-secret";

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

struct Server {
    app: axum::Router,
    clock: ManualClock,
}

impl Server {
    async fn start() -> Server {
        let mut config = ServerConfig::default();
        config.auth.admin_client_id = Some("admin".into());
        config.auth.admin_client_secret = Some(ADMIN_SECRET.into());
        let clock = ManualClock::new(Timestamp(1_767_225_600_000));
        let broker = Broker::open_in_memory(config.broker.clone(), Arc::new(clock.clone()))
            .await
            .unwrap();
        let made = broker_server::auth::bootstrap(&broker, &config.auth)
            .await
            .unwrap();
        assert_eq!(
            made,
            Some(("admin".to_string(), None)),
            "secret given, not shown"
        );
        Server {
            app: router(broker, &config).unwrap(),
            clock,
        }
    }

    async fn raw(&self, req: Request<Body>) -> Answer {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        Answer {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        client_header: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some(c) = client_header {
            req = req.header("x-govstack-client", c);
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Body::from(b.to_string())
            }
            None => Body::empty(),
        };
        self.raw(req.body(body).unwrap()).await
    }

    async fn form(&self, body: &str, basic: Option<(&str, &str)>) -> Answer {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri("/oauth/token")
            .header("content-type", "application/x-www-form-urlencoded");
        if let Some((id, secret)) = basic {
            let cred = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
            req = req.header("authorization", format!("Basic {cred}"));
        }
        self.raw(req.body(Body::from(body.to_string())).unwrap())
            .await
    }

    async fn token(&self, id: &str, secret: &str) -> String {
        let a = self
            .form("grant_type=client_credentials", Some((id, secret)))
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        a.body["access_token"].as_str().unwrap().to_string()
    }

    /// Creates an application with a client and returns the client's token.
    async fn member_app(&self, admin: &str, code: &str) -> String {
        let a = self
            .call(
                Method::POST,
                "/v1/admin/applications",
                Some(admin),
                None,
                Some(json!({"member": "UK/GOV/HO", "code": code})),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        let c = self
            .call(
                Method::POST,
                "/v1/admin/clients",
                Some(admin),
                None,
                Some(json!({"application": format!("UK/GOV/HO/{code}"), "client_id": code})),
            )
            .await;
        assert_eq!(c.status, StatusCode::CREATED, "{}", c.body);
        let secret = c.body["client_secret"].as_str().unwrap().to_string();
        self.token(code, &secret).await
    }

    async fn grant(&self, admin: &str, code: &str, role: &str, types: Option<Value>) {
        let mut body = json!({"principal": format!("UK/GOV/HO/{code}"), "role": role, "room": "r"});
        if let Some(t) = types {
            body["event_types"] = t;
        }
        let a = self
            .call(
                Method::POST,
                "/v1/admin/grants",
                Some(admin),
                None,
                Some(body),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    }
}

#[tokio::test]
async fn the_token_endpoint_follows_rfc_6749() {
    let s = Server::start().await;
    // client_secret_basic and client_secret_post both work.
    let basic = s
        .form(
            "grant_type=client_credentials",
            Some(("admin", ADMIN_SECRET)),
        )
        .await;
    assert_eq!(basic.status, StatusCode::OK);
    assert_eq!(basic.body["token_type"], "bearer");
    assert_eq!(basic.body["expires_in"], 3600);
    assert_eq!(basic.headers["cache-control"], "no-store");
    let post = s
        .form(
            &format!("grant_type=client_credentials&client_id=admin&client_secret={ADMIN_SECRET}"),
            None,
        )
        .await;
    assert_eq!(post.status, StatusCode::OK);

    let wrong = s
        .form(
            "grant_type=client_credentials",
            Some(("admin", "not-the-secret")),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.body["error"], "invalid_client");
    assert!(wrong.headers.contains_key("www-authenticate"));
    let unknown = s
        .form(
            "grant_type=client_credentials",
            Some(("nobody", ADMIN_SECRET)),
        )
        .await;
    assert_eq!(unknown.body["error"], "invalid_client");
    let grant = s
        .form("grant_type=password", Some(("admin", ADMIN_SECRET)))
        .await;
    assert_eq!(grant.status, StatusCode::BAD_REQUEST);
    assert_eq!(grant.body["error"], "unsupported_grant_type");
    let missing = s.form("", Some(("admin", ADMIN_SECRET))).await;
    assert_eq!(missing.body["error"], "invalid_request");
    let both = s
        .form(
            &format!("grant_type=client_credentials&client_id=admin&client_secret={ADMIN_SECRET}"),
            Some(("admin", ADMIN_SECRET)),
        )
        .await;
    assert_eq!(both.body["error"], "invalid_request");
    let json_body = s
        .call(
            Method::POST,
            "/oauth/token",
            None,
            None,
            Some(json!({"grant_type": "client_credentials"})),
        )
        .await;
    assert_eq!(json_body.body["error"], "invalid_request");
}

#[tokio::test]
async fn tokens_expire_on_the_clock_and_die_with_their_client() {
    let s = Server::start().await;
    let admin = s.token("admin", ADMIN_SECRET).await;
    let none = s.call(Method::GET, "/v1/rooms", None, None, None).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.body["code"], "unauthenticated");
    assert!(none.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    let forged = s
        .call(Method::GET, "/v1/rooms", Some("a.b.c"), None, None)
        .await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        s.call(Method::GET, "/v1/rooms", Some(&admin), None, None)
            .await
            .status,
        StatusCode::OK
    );
    s.clock.advance_ms(3_600_000);
    assert_eq!(
        s.call(Method::GET, "/v1/rooms", Some(&admin), None, None)
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "expired after expires_in"
    );
    let admin = s.token("admin", ADMIN_SECRET).await;

    // Rotation: a second secret, both valid; revoke the first; deleting the client kills its
    // tokens at once.
    s.call(
        Method::POST,
        "/v1/admin/members",
        Some(&admin),
        None,
        Some(json!({"id": "UK/GOV/HO"})),
    )
    .await;
    let token = s.member_app(&admin, "rotating").await;
    let added = s
        .call(
            Method::POST,
            "/v1/admin/clients/rotating/secrets",
            Some(&admin),
            None,
            None,
        )
        .await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.body);
    let second = added.body["client_secret"].as_str().unwrap().to_string();
    s.token("rotating", &second).await;
    let revoked = s
        .call(
            Method::DELETE,
            "/v1/admin/clients/rotating/secrets/2",
            Some(&admin),
            None,
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::OK);
    let old = s
        .form("grant_type=client_credentials", Some(("rotating", &second)))
        .await;
    assert_eq!(old.status, StatusCode::UNAUTHORIZED, "the revoked secret");
    assert_eq!(
        s.call(Method::GET, "/v1/rooms", Some(&token), None, None)
            .await
            .status,
        StatusCode::OK
    );
    let del = s
        .call(
            Method::DELETE,
            "/v1/admin/clients/rotating",
            Some(&admin),
            None,
            None,
        )
        .await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    assert_eq!(
        s.call(Method::GET, "/v1/rooms", Some(&token), None, None)
            .await
            .status,
        StatusCode::UNAUTHORIZED,
        "a deleted client's token stops at once"
    );
}

#[tokio::test]
async fn the_govstack_header_must_name_the_token_s_application_and_changes_are_audited() {
    let s = Server::start().await;
    let admin = s.token("admin", ADMIN_SECRET).await;
    s.call(
        Method::POST,
        "/v1/admin/members",
        Some(&admin),
        None,
        Some(json!({"id": "UK/GOV/HO"})),
    )
    .await;
    let police = s.member_app(&admin, "police").await;
    // Another member's identity in the header: refused even for a right the caller has.
    let a = s
        .call(
            Method::GET,
            "/r1/UK/GOV/HO/births/api/v1/eventType",
            Some(&police),
            Some("UK/GOV/HO/births"),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.body["detail"]
        .as_str()
        .unwrap()
        .contains("does not match"));
    // Its own name: a member may ask for a Room through GovStack; it waits for approval.
    let b = s
        .call(
            Method::POST,
            "/r1/UK/GOV/HO/policeroom/api/v1/eventType",
            Some(&police),
            Some("UK/GOV/HO/police"),
            Some(json!({"eventType": "arrest", "schema": {"type": "object"}})),
        )
        .await;
    assert_eq!(b.status, StatusCode::OK, "{}", b.body);
    let room = s
        .call(
            Method::GET,
            "/v1/rooms/policeroom",
            Some(&police),
            None,
            None,
        )
        .await;
    assert_eq!(room.body["status"], "pending");

    // The audit log has the changes, with actors and failures, and no secret anywhere.
    let log = s
        .call(Method::GET, "/v1/admin/audit", Some(&admin), None, None)
        .await;
    let items = log.body["items"].as_array().unwrap();
    assert!(items.iter().any(|e| e["action"] == "POST /v1/admin/members"
        && e["actor"] == "local/ADMIN/postroom/admin"
        && e["outcome"] == "success"));
    assert!(items.iter().any(
        |e| e["action"] == "POST /r1/UK/GOV/HO/policeroom/api/v1/eventType"
            && e["actor"] == "UK/GOV/HO/police"
    ));
    let refused = s
        .call(
            Method::POST,
            "/v1/admin/members",
            Some(&police),
            None,
            Some(json!({"id": "UK/GOV/X"})),
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let failures = s
        .call(
            Method::GET,
            "/v1/admin/audit?outcome=failure",
            Some(&admin),
            None,
            None,
        )
        .await;
    assert!(failures.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["actor"] == "UK/GOV/HO/police" && e["error"] == "forbidden"));
    assert!(!log.body.to_string().contains(ADMIN_SECRET));
}

/// Starts `postroom serve` on a free port with `envs`, returning the child, its stdout reader
/// (kept open: the server prints the first administrator's credentials after the address)
/// and its base URL.
fn start_binary(
    dir: &std::path::Path,
    envs: &[(&str, &str)],
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
    String,
) {
    use std::io::BufRead;
    let mut child = bare_postroom()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        // Created by the server, private; the temporary folder itself is 0755.
        .arg(dir.join("data"))
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("address line")
        .to_string();
    // Answering /healthz means the server runs, with its signal handler in place.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        reqwest::get(format!("{url}/healthz"))
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 200);
    (child, out, url)
}

fn stop(mut child: std::process::Child) {
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert!(child.wait().unwrap().success());
}

/// README's path for a newcomer: start the server, take the printed credentials, get a token,
/// create a Room and an event type, publish.
#[test]
fn a_newcomer_gets_a_token_from_the_printed_credentials_and_publishes() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let (child, mut out, url) = start_binary(dir.path(), &[]);
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .to_string()
    };
    let (id, secret) = (field("client_id"), field("client_secret"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let token: Value = http
            .post(format!("{url}/oauth/token"))
            .basic_auth(&id, Some(&secret))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = token["access_token"].as_str().unwrap().to_string();
        let steps = [
            ("POST", "/v1/rooms", json!({"name": "irc"}), 201),
            (
                "PUT",
                "/v1/rooms/irc/event-types/bed",
                json!({"schema": {"type": "object"}}),
                201,
            ),
            ("POST", "/v1/rooms/irc/events/bed", json!({"bed": 1}), 201),
        ];
        for (method, path, body, want) in steps {
            let r = http
                .request(method.parse().unwrap(), format!("{url}{path}"))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), want, "{method} {path}");
        }
        let anonymous = http
            .post(format!("{url}/v1/rooms/irc/events/bed"))
            .json(&json!({"bed": 2}))
            .send()
            .await
            .unwrap();
        assert_eq!(anonymous.status().as_u16(), 401);
    });
    stop(child);

    // A restart creates nobody new; with the variables on a fresh folder, that client is made.
    let (child, mut out, _) = start_binary(dir.path(), &[]);
    stop(child);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(!rest.contains("client_secret"), "{rest}");
    let fresh = tempfile::tempdir().unwrap();
    let (child, mut out, url) = start_binary(
        fresh.path(),
        &[
            ("POSTROOM_ADMIN_CLIENT_ID", "ops"),
            ("POSTROOM_ADMIN_CLIENT_SECRET", "a-long-chosen-secret"),
        ],
    );
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(
        line.contains("`ops`") && !line.contains("a-long-chosen-secret"),
        "{line}"
    );
    let status = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{url}/oauth/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials&client_id=ops&client_secret=a-long-chosen-secret")
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 200);
    stop(child);
}

#[tokio::test]
async fn in_a_room_that_asks_for_it_subscriptions_wait_for_a_manager() {
    let s = Server::start().await;
    let admin = s.token("admin", ADMIN_SECRET).await;
    s.call(
        Method::POST,
        "/v1/admin/members",
        Some(&admin),
        None,
        Some(json!({"id": "UK/GOV/HO"})),
    )
    .await;
    let room = s
        .call(
            Method::POST,
            "/v1/rooms",
            Some(&admin),
            None,
            Some(json!({"name": "r", "subscription_approval": true})),
        )
        .await;
    assert_eq!(room.body["subscription_approval"], true);
    let subscriber = s.member_app(&admin, "subscriber").await;
    let manager = s.member_app(&admin, "manager").await;
    s.grant(&admin, "subscriber", "subscriber", None).await;
    s.grant(&admin, "manager", "room_manager", None).await;
    let pull = Some(json!({"mode": "pull"}));
    let sub = s
        .call(
            Method::POST,
            "/v1/rooms/r/subscriptions",
            Some(&subscriber),
            None,
            pull.clone(),
        )
        .await;
    assert_eq!(
        sub.body["subscription"]["status"], "pending",
        "{}",
        sub.body
    );
    let sid = sub.body["subscription"]["id"].as_str().unwrap().to_string();
    // The subscriber cannot approve itself; the manager can.
    let own = s
        .call(
            Method::POST,
            &format!("/v1/subscriptions/{sid}/approve"),
            Some(&subscriber),
            None,
            None,
        )
        .await;
    assert_eq!(own.status, StatusCode::FORBIDDEN);
    let approved = s
        .call(
            Method::POST,
            &format!("/v1/subscriptions/{sid}/approve"),
            Some(&manager),
            None,
            None,
        )
        .await;
    assert_eq!(approved.body["status"], "active", "{}", approved.body);
    // A manager's own subscription needs nobody's approval.
    let managers = s
        .call(
            Method::POST,
            "/v1/rooms/r/subscriptions",
            Some(&manager),
            None,
            pull,
        )
        .await;
    assert_eq!(managers.body["subscription"]["status"], "active");
}

/// The binary with none of the caller's `POSTROOM_*` settings (a test run's own, such as
/// `POSTROOM_SIM_SECONDS`, are not server settings, and the server refuses unknown ones).
fn bare_postroom() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_postroom"));
    for (k, _) in std::env::vars() {
        if k.starts_with("POSTROOM_") {
            c.env_remove(k);
        }
    }
    c
}

mod matrix;
