//! Postroom's HTTP server: a thin axum layer over broker-core. The router is built by
//! [`api::app`]; [`serve`] runs it with the configured limits, over HTTPS when a certificate is
//! configured, and shuts down gracefully.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod auth_external;
pub mod brakes;
pub mod cli;
pub mod config;
pub mod connections;
pub mod data_dir;
pub mod error;
pub mod logging;
mod middleware;
pub mod observe;
pub mod pack;
pub mod system;
pub mod tls;
mod tokens;

use std::future::Future;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::Router;
use broker_core::Broker;
use tokio::net::TcpListener;
use tower::ServiceBuilder;

pub use api::{app, openapi, AppState};
pub use config::ServerConfig;
pub use error::{ApiError, StartError};

/// The identity every caller acts as until authentication exists.
pub const LOCAL_ADMIN: &str = "local-admin";

/// The router with the HTTP limits of `config` around it: body size, request timeout and a bound
/// on concurrent requests beyond which requests are shed with 503 and `Retry-After`.
pub fn router(broker: Broker, config: &ServerConfig) -> Result<Router, StartError> {
    router_with(broker, config, None)
}

/// [`router`] that also accepts tokens of a trusted external issuer.
pub fn router_with(
    broker: Broker,
    config: &ServerConfig,
    external: Option<std::sync::Arc<auth_external::ExternalVerifier>>,
) -> Result<Router, StartError> {
    // Installed before the first request so that nothing recorded early is lost.
    observe::prometheus();
    system::mark_started();
    let auth = std::sync::Arc::new(auth::Auth::new(broker.clone(), &config.auth, external)?);
    // With access control on, a subscriber's right is checked on every delivery, not only
    // when it subscribed.
    broker.enforce_subscriber_rights(!config.auth.insecure_no_auth);
    let limits = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
            ApiError::Busy
        }))
        .load_shed()
        // Global: axum applies a router's layers to each route separately, and a plain
        // concurrency limit would then count per route, not for the server.
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            config.http.concurrent_requests_max.max(1),
        ))
        .timeout(Duration::from_millis(config.http.request_timeout_ms));
    let idempotency = middleware::Idempotency {
        broker: broker.clone(),
        body_bytes_max: config.http.body_bytes_max,
        running: Default::default(),
    };
    let header_limits = middleware::HeaderLimits {
        bytes_max: config.http.header_bytes_max,
        count_max: config.http.headers_max,
    };
    let token = Router::new()
        .route("/oauth/token", axum::routing::post(auth::token))
        // The same endpoint where the IRC ICD's clients build their token URL from a Keycloak
        // credentials file (`<auth-server-url>/realms/<realm>/protocol/openid-connect/token`),
        // so that they need only a new file, not new code. There is one realm: its name is
        // not checked.
        .route(auth::ICD_TOKEN_PATH, axum::routing::post(auth::token))
        .with_state(auth.clone());
    let gate = middleware::Gate {
        broker: broker.clone(),
        auth: auth.clone(),
        idempotency,
    };
    // Layers run outside in: request metrics and header limits, the body limit, load shedding
    // and the timeout, then the audit log, authentication and idempotency around the handler.
    // These wrap each route (metrics need the route template that routing finds), so they are
    // kept to four: axum clones and boxes every per-route layer on every request (see
    // `middleware::front`).
    let routes = app(AppState {
        broker,
        database_path: config.database_path(),
        message_log_payloads: config.observability.message_log_payloads,
        auth,
    })
    .merge(token)
    .layer(axum::middleware::from_fn_with_state(gate, middleware::gate))
    .layer(limits)
    .layer(DefaultBodyLimit::max(config.http.body_bytes_max))
    // Outside the limits, so that their answers (431, 413, 503) are counted too.
    .layer(axum::middleware::from_fn_with_state(
        header_limits,
        middleware::front,
    ));
    // Around the router, once rather than per route: every request gets an `x-request-id` (the
    // caller's, or a new UUID), every log line of the request carries it in its span, and the
    // answer echoes it. The span holds the method and path only: no headers (tokens) and no
    // bodies (payloads).
    let outer = ServiceBuilder::new()
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(
            tower_http::request_id::MakeRequestUuid,
        ))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                // One line per answered request at the default level, with status and latency.
                .on_response(
                    tower_http::trace::DefaultOnResponse::new().level(tracing::Level::INFO),
                )
                .make_span_with(|req: &axum::http::Request<axum::body::Body>| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    tracing::info_span!(
                        "request",
                        request_id = %id,
                        method = %req.method(),
                        path = %req.uri().path(),
                    )
                }),
        )
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        .service(routes);
    Ok(Router::new().fallback_service(outer))
}

/// Checks the configuration against the listener's address, opens the broker and serves on
/// `listener` (HTTPS when `config.tls` names a certificate and key, else plain HTTP) until
/// `shutdown` completes; then starts closing the broker (long-polls are answered at once, new
/// pulls get 503: see [`Broker::begin_close`]), stops accepting, lets requests in flight finish
/// (up to `shutdown_grace_ms`), and closes the broker so that everything queued is committed.
pub async fn serve(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let addr = listener.local_addr().map_err(StartError::Serve)?;
    config.validate(addr)?;
    // The certificate is loaded before the broker opens, so that a bad file fails fast and
    // leaves the data untouched.
    let tls = tls::load(&config.tls)?;
    let external = match &config.auth.external {
        Some(cfg) => Some(std::sync::Arc::new(
            auth_external::ExternalVerifier::load(cfg).await?,
        )),
        None => None,
    };
    // Packs are read before the broker opens, so that a bad file fails fast.
    let packs = config
        .packs
        .iter()
        .map(|p| pack::Pack::load(p).map_err(|e| StartError::Config(format!("pack: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let broker = match config.storage.backend {
        config::Backend::Redb => {
            // The folder is checked last, just before the broker writes into it.
            data_dir::prepare(&config)?;
            Broker::open(config.database_path(), config.broker.clone()).await?
        }
        config::Backend::Postgres => {
            Broker::open_postgres(config.storage.postgres.clone(), config.broker.clone()).await?
        }
    };
    if let Some((client_id, secret)) = auth::bootstrap(&broker, &config.auth).await? {
        // Shown once, on the terminal that started the server; never logged.
        let text = match secret {
            Some(secret) => format!(
                "created the administrator client: client_id={client_id} client_secret={secret}\n\
                 (shown only now; get a token with POST /oauth/token, grant_type=client_credentials)"
            ),
            None => format!(
                "created the administrator client `{client_id}` from POSTROOM_ADMIN_CLIENT_ID"
            ),
        };
        use std::io::Write as _;
        if writeln!(std::io::stdout(), "{text}").is_err() {
            tracing::warn!(
                client_id,
                "could not show the new administrator's credentials (stdout is closed); set \
                 POSTROOM_ADMIN_CLIENT_ID and POSTROOM_ADMIN_CLIENT_SECRET on a fresh data folder"
            );
        }
    }
    if !packs.is_empty() {
        let owner = broker_core::Principal::new(format!(
            "{}/{}",
            auth::BOOTSTRAP_MEMBER,
            auth::BOOTSTRAP_APPLICATION
        ))?;
        for p in &packs {
            for room in pack::apply(&broker, p, &owner).await? {
                tracing::info!(pack = %p.path.display(), room = %room.room, outcome = room.outcome, "pack applied");
            }
        }
    }
    let app = router_with(broker.clone(), &config, external)?;
    let grace = Duration::from_millis(config.http.shutdown_grace_ms);
    let header_read = Duration::from_millis(config.http.header_read_timeout_ms);
    // The broker starts closing as soon as the signal comes, before the requests in flight are
    // waited for: long-polls are answered at once and new pulls get 503, so that no poll holds
    // the shutdown for its whole wait. Other requests still finish within the grace period.
    let shutdown = {
        let broker = broker.clone();
        async move {
            shutdown.await;
            broker.begin_close();
        }
    };
    let outcome = match serve_on(listener, app, tls, header_read, grace, shutdown).await {
        Ok(()) => Ok(()),
        Err(e) => Err(StartError::Serve(e)),
    };
    broker.close().await;
    outcome
}

/// Serves `app` on `listener` with axum-server, over rustls when `tls` is given, until
/// `shutdown` completes; then stops accepting, lets connections finish for up to `grace`, and
/// drops them. Plain HTTP goes through axum-server too, not `axum::serve`, because only
/// axum-server exposes hyper's connection builder, and with it the header read timeout.
///
/// `header_read` bounds the time a client may take to send a request's line and headers:
/// hyper's HTTP/1 `header_read_timeout` for every request of a connection (its timer is
/// axum-server's `TokioTimer`), and axum-server's first-request timeout for a new connection
/// whatever its protocol (it also covers the protocol detection, which hyper does not time,
/// and a client that connects and says nothing). A client past it is disconnected.
///
/// Handlers see the connection's remote address as `ConnectInfo<SocketAddr>`.
async fn serve_on(
    listener: TcpListener,
    app: Router,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    header_read: Duration,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = axum_server::Handle::new();
    let listener = listener.into_std()?;
    let service = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let mut served = match tls {
        None => {
            let mut server = axum_server::from_tcp(listener)?
                .map(connections::CountingAcceptor::new)
                .handle(handle.clone())
                .first_request_timeout(header_read);
            server
                .http_builder()
                .http1()
                .header_read_timeout(header_read);
            boxed(server.serve(service))
        }
        Some(tls) => {
            let mut server = axum_server::from_tcp_rustls(
                listener,
                axum_server::tls_rustls::RustlsConfig::from_config(tls),
            )?
            .map(connections::CountingAcceptor::new)
            .handle(handle.clone())
            .first_request_timeout(header_read);
            server
                .http_builder()
                .http1()
                .header_read_timeout(header_read);
            boxed(server.serve(service))
        }
    };
    tokio::select! {
        r = &mut served => return r,
        _ = shutdown => {}
    }
    handle.graceful_shutdown(Some(grace));
    let outcome = served.await;
    if handle.connection_count() > 0 {
        tracing::warn!("requests still running after the shutdown grace period; stopping anyway");
    }
    outcome
}

/// The two servers' futures have different types; boxed, one shutdown path serves both.
fn boxed(
    f: impl Future<Output = std::io::Result<()>> + Send + 'static,
) -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> {
    Box::pin(f)
}

/// A future that completes on SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled: a server answers requests before its shutdown
/// future is necessarily polled, and a SIGTERM in between would otherwise kill the process
/// without a graceful shutdown. Call it inside the Tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let (mut term, mut int) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::interrupt()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let term = async {
                match term.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let int = async {
                match int.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = term => {}
                _ = int => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown signal received");
    }
}
