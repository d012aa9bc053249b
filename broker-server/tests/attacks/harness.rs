//! The world the attacks run in: a broker in memory on a manual clock, its router driven
//! in-process, the bootstrap administrator, and helpers that set up members, applications,
//! clients, grants and Rooms the way an administrator would, through the public HTTP API.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use base64::Engine;
use broker_core::{Broker, ManualClock, Timestamp};
use broker_server::{router, ServerConfig};
use serde_json::{json, Value};
use tower::ServiceExt;

/// The bootstrap administrator's client secret.
pub const ADMIN_SECRET: &str = "the-administrators-secret";

/// A response, its body parsed as JSON (`Null` when it is not JSON).
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    /// The body's length in bytes.
    pub len: usize,
    /// The body as received.
    pub raw_body: Vec<u8>,
}

/// An application with one API client and a token for it.
#[derive(Clone)]
pub struct Actor {
    /// `INSTANCE/CLASS/MEMBER/APPLICATION`.
    pub principal: String,
    pub client_id: String,
    pub secret: String,
    pub token: String,
}

/// A broker with its router and the administrator's token.
pub struct World {
    pub app: axum::Router,
    pub broker: Broker,
    pub clock: ManualClock,
    pub admin: String,
    pub config: ServerConfig,
}

/// The configuration the attacks run against: authentication on, the administrator's secret
/// fixed.
pub fn config() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.auth.admin_client_id = Some("admin".into());
    config.auth.admin_client_secret = Some(ADMIN_SECRET.into());
    config
}

impl World {
    /// A world with [`config`].
    pub async fn start() -> World {
        World::start_with(config()).await
    }

    /// A world with `config` (its administrator bootstrapped as in `postroom serve`).
    pub async fn start_with(config: ServerConfig) -> World {
        let clock = ManualClock::new(Timestamp(1_767_225_600_000));
        let broker = Broker::open_in_memory(config.broker.clone(), Arc::new(clock.clone()))
            .await
            .unwrap();
        broker_server::auth::bootstrap(&broker, &config.auth)
            .await
            .unwrap();
        let app = router(broker.clone(), &config).unwrap();
        let mut w = World {
            app,
            broker,
            clock,
            admin: String::new(),
            config,
        };
        w.admin = w.token("admin", ADMIN_SECRET).await;
        w
    }

    /// Sends one request from 127.0.0.1 (as a connection would tell the server).
    pub async fn raw(&self, req: Request<Body>) -> Answer {
        self.raw_from(req, "127.0.0.1:40000".parse().unwrap()).await
    }

    /// Sends one request as if from `peer`.
    pub async fn raw_from(&self, mut req: Request<Body>, peer: SocketAddr) -> Answer {
        req.extensions_mut().insert(ConnectInfo(peer));
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
            len: bytes.len(),
            raw_body: bytes.to_vec(),
        }
    }

    /// A request with an optional bearer token and JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        self.send_json(req, body).await
    }

    /// Sends `req` with `body` as JSON, or with no body.
    pub async fn send_json(
        &self,
        req: axum::http::request::Builder,
        body: Option<Value>,
    ) -> Answer {
        let (req, body) = match body {
            Some(b) => (
                req.header("content-type", "application/json"),
                Body::from(b.to_string()),
            ),
            None => (req, Body::empty()),
        };
        self.raw(req.body(body).unwrap()).await
    }

    /// `GET` with a token.
    pub async fn get(&self, path: &str, token: &str) -> Answer {
        self.call(Method::GET, path, Some(token), None).await
    }

    /// `POST` of a JSON body with a token.
    pub async fn post(&self, path: &str, token: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    /// `DELETE` with a token.
    pub async fn delete(&self, path: &str, token: &str) -> Answer {
        self.call(Method::DELETE, path, Some(token), None).await
    }

    /// The token endpoint with a form body and optional Basic credentials, from `peer`.
    pub async fn token_form(
        &self,
        body: &str,
        basic: Option<(&str, &str)>,
        peer: SocketAddr,
    ) -> Answer {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri("/oauth/token")
            .header("content-type", "application/x-www-form-urlencoded");
        if let Some((id, secret)) = basic {
            let cred = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
            req = req.header("authorization", format!("Basic {cred}"));
        }
        self.raw_from(req.body(Body::from(body.to_string())).unwrap(), peer)
            .await
    }

    /// A token for a client (panics unless the endpoint answers 200).
    pub async fn token(&self, id: &str, secret: &str) -> String {
        let a = self
            .token_form(
                "grant_type=client_credentials",
                Some((id, secret)),
                "127.0.0.1:40000".parse().unwrap(),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        a.body["access_token"].as_str().unwrap().to_string()
    }

    /// Registers member `member` (`INSTANCE/CLASS/CODE`) if it is new, its application `code`,
    /// and a client `code` for it; returns the application with a token.
    pub async fn actor(&self, member: &str, code: &str) -> Actor {
        let m = self
            .post(
                "/v1/admin/members",
                &self.admin,
                json!({"id": member, "name": member}),
            )
            .await;
        assert!(
            m.status == StatusCode::CREATED || m.status == StatusCode::CONFLICT,
            "{}",
            m.body
        );
        let a = self
            .post(
                "/v1/admin/applications",
                &self.admin,
                json!({"member": member, "code": code}),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        let principal = format!("{member}/{code}");
        let c = self
            .post(
                "/v1/admin/clients",
                &self.admin,
                json!({"application": principal, "client_id": code}),
            )
            .await;
        assert_eq!(c.status, StatusCode::CREATED, "{}", c.body);
        let secret = c.body["client_secret"].as_str().unwrap().to_string();
        let token = self.token(code, &secret).await;
        Actor {
            principal,
            client_id: code.to_string(),
            secret,
            token,
        }
    }

    /// A Home Office application.
    pub async fn home_office(&self, code: &str) -> Actor {
        self.actor("UK/GOV/HO", code).await
    }

    /// A Ministry of Justice application.
    pub async fn justice(&self, code: &str) -> Actor {
        self.actor("UK/GOV/MOJ", code).await
    }

    /// The administrator gives `who` a role on `room` (optionally limited to event types).
    pub async fn grant(&self, who: &Actor, role: &str, room: &str, types: Option<Value>) {
        let mut body = json!({"principal": who.principal, "role": role, "room": room});
        if let Some(t) = types {
            body["event_types"] = t;
        }
        let a = self.post("/v1/admin/grants", &self.admin, body).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    }

    /// The administrator takes a role on `room` away from `who`.
    pub async fn revoke(&self, who: &Actor, role: &str, room: &str) {
        let body = json!({"principal": who.principal, "role": role, "room": room});
        let a = self
            .post("/v1/admin/grants/revoke", &self.admin, body)
            .await;
        assert!(a.status.is_success(), "{}", a.body);
    }

    /// The administrator creates an active Room with one event type `t` whose schema accepts
    /// any object with a string `id`, keyed by `/id`.
    pub async fn room(&self, name: &str) {
        let a = self
            .post("/v1/rooms", &self.admin, json!({"name": name}))
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        self.event_type(name, "t").await;
    }

    /// The administrator registers event type `ty` in `room` (an object with a string `id`).
    pub async fn event_type(&self, room: &str, ty: &str) {
        let schema = json!({
            "type": "object",
            "properties": {"id": {"type": "string"}},
            "required": ["id"]
        });
        let a = self
            .call(
                Method::PUT,
                &format!("/v1/rooms/{room}/event-types/{ty}"),
                Some(&self.admin),
                Some(json!({"schema": schema, "key_pointer": "/id"})),
            )
            .await;
        assert!(a.status.is_success(), "{}", a.body);
    }

    /// Publishes `payload` as type `t` to `room` with `token`.
    pub async fn publish(&self, room: &str, token: &str, payload: Value) -> Answer {
        self.post(&format!("/v1/rooms/{room}/events/t"), token, payload)
            .await
    }
}

/// A webhook receiver on a loopback port: every POST to `/{name}` is answered 200 and its
/// path name is handed to the test, in arrival order.
pub struct Receiver {
    addr: SocketAddr,
    rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    counts: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl Receiver {
    /// Starts the receiver.
    pub async fn start() -> Receiver {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let counts: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>> =
            Default::default();
        let c = counts.clone();
        let app = axum::Router::new().route(
            "/{name}",
            axum::routing::post(
                move |axum::extract::Path(name): axum::extract::Path<String>| {
                    let tx = tx.clone();
                    let c = c.clone();
                    async move {
                        *c.lock().unwrap().entry(name.clone()).or_default() += 1;
                        let _ = tx.send(name);
                        StatusCode::OK
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, rx, counts }
    }

    /// The URL of webhook `name`.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    /// The name of the next webhook called (fails the test after 20 s).
    pub async fn next(&mut self) -> String {
        tokio::time::timeout(std::time::Duration::from_secs(20), self.rx.recv())
            .await
            .expect("no push within 20 s")
            .expect("receiver stopped")
    }

    /// How many pushes webhook `name` has received.
    pub fn received(&self, name: &str) -> usize {
        self.counts.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

// ----- Publish, secrets and transport attacks (issue 14, items 6, 7, 8, 10, 13) -----

impl World {
    /// A request with a bearer token, extra headers and an optional JSON body.
    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        token: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Answer {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        self.send_json(req, body).await
    }

    /// A GovStack call by `who` on Room `room`: `/r1/{who's member}/{room}/{rest}` with
    /// `X-GovStack-Client` naming `who`.
    pub async fn gov(
        &self,
        method: Method,
        who: &Actor,
        room: &str,
        rest: &str,
        body: Option<Value>,
    ) -> Answer {
        let member = who.principal.rsplit_once('/').unwrap().0;
        let path = format!("/r1/{member}/{room}/{rest}");
        self.call_with(
            method,
            &path,
            &who.token,
            &[("x-govstack-client", who.principal.as_str())],
            body,
        )
        .await
    }

    /// Applies the `irc` domain pack (the `irc` Room and its event types) as the bootstrap
    /// administrator, as `packs = [...]` does at start.
    pub async fn irc_pack(&self) {
        self.try_irc_pack().await.unwrap();
    }

    /// [`World::irc_pack`], with the outcome.
    pub async fn try_irc_pack(
        &self,
    ) -> Result<Vec<broker_server::pack::AppliedRoom>, broker_core::Error> {
        let pack = broker_server::pack::Pack::load(
            concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/irc/pack.toml").as_ref(),
        )
        .unwrap();
        let admin = broker_core::Principal::new("local/ADMIN/postroom/admin").unwrap();
        broker_server::pack::apply(&self.broker, &pack, &admin).await
    }
}

// ----- Added for the token attacks (issue 14, items 4, 9 and 12) -----

impl World {
    /// A world with `config` whose server also trusts the external issuer `external` (as
    /// `postroom serve` does with `[auth.external]`).
    pub async fn start_with_external(
        config: ServerConfig,
        external: Arc<broker_server::auth_external::ExternalVerifier>,
    ) -> World {
        let mut w = World::start_with(config).await;
        w.app = broker_server::router_with(w.broker.clone(), &w.config, Some(external)).unwrap();
        w
    }

    /// The broker's clock in whole seconds, as tokens count time.
    pub fn now_secs(&self) -> u64 {
        use broker_core::Clock;
        self.clock.now().as_ms() / 1000
    }
}

/// The header and claims of a JSON Web Token, read without checking anything.
pub fn jwt_parts(token: &str) -> (Value, Value) {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.split('.');
    let mut next = || -> Value {
        let raw = b64
            .decode(parts.next().expect("a JWT part"))
            .expect("base64url");
        serde_json::from_slice(&raw).expect("JSON")
    };
    let header = next();
    let claims = next();
    (header, claims)
}
