//! HTTPS: `serve()` with `[tls]` configured speaks TLS on its listener (a client that trusts the
//! certificate gets answers, a plain-HTTP client does not) and still shuts down cleanly; bad TLS
//! settings stop the server before it starts, naming the file at fault. Guards against a
//! configured certificate being silently ignored, which would serve credentials in clear text.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use broker_server::config::TlsConfig;
use broker_server::{serve, ServerConfig, StartError};
use tokio::net::TcpListener;

/// A self-signed certificate for 127.0.0.1 and localhost, written as PEM files into `dir`.
struct TestCert {
    cert_pem: String,
    cert_path: PathBuf,
    key_path: PathBuf,
}

fn self_signed(dir: &Path) -> TestCert {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let cert_pem = ck.cert.pem();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, &cert_pem).unwrap();
    std::fs::write(&key_path, ck.signing_key.serialize_pem()).unwrap();
    TestCert {
        cert_pem,
        cert_path,
        key_path,
    }
}

fn config(dir: &Path, cert: Option<&Path>, key: Option<&Path>) -> ServerConfig {
    ServerConfig {
        data_dir: dir.join("data"),
        tls: TlsConfig {
            cert_path: cert.map(Path::to_path_buf),
            key_path: key.map(Path::to_path_buf),
        },
        ..ServerConfig::default()
    }
}

/// Starts `serve()` on an ephemeral loopback port with `config`; returns its address, the
/// trigger for shutdown and the server task.
async fn start(
    config: ServerConfig,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), StartError>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, config, async move {
        let _ = stop_rx.await;
    }));
    (addr, stop_tx, server)
}

#[tokio::test]
async fn https_answers_a_client_that_trusts_the_certificate_and_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let cert = self_signed(dir.path());
    let (addr, stop, server) = start(config(
        dir.path(),
        Some(&cert.cert_path),
        Some(&cert.key_path),
    ))
    .await;

    let trusting = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(cert.cert_pem.as_bytes()).unwrap()])
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // The listener is bound before `serve` runs, so the connection waits in the backlog until
    // the server accepts it: no sleep or retry is needed.
    for host in [addr.to_string(), format!("localhost:{}", addr.port())] {
        let resp = trusting
            .get(format!("https://{host}/healthz"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("https://{host}: {e:?}"));
        assert_eq!(resp.status(), 200, "https://{host}");
        assert_eq!(resp.text().await.unwrap(), "ok");
    }

    // A client that does not trust the certificate refuses the handshake.
    let untrusting = reqwest::Client::builder()
        .tls_certs_only([])
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    assert!(untrusting
        .get(format!("https://{addr}/healthz"))
        .send()
        .await
        .is_err());

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let outcome = plain.get(format!("http://{addr}/healthz")).send().await;
    assert!(
        outcome.is_err(),
        "plain HTTP must not be answered: {outcome:?}"
    );

    stop.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("serve() returns after shutdown")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    // The broker was closed: its database can be opened again at once.
    broker_core::Broker::open(
        dir.path().join("data").join("postroom.redb"),
        broker_core::Config::default(),
    )
    .await
    .unwrap()
    .close()
    .await;
}

/// The error `serve()` stops with for `config`, which must be a configuration error.
async fn config_error(config: ServerConfig) -> String {
    let (_addr, _stop, server) = start(config).await;
    let result = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("serve() fails at once")
        .unwrap();
    match result {
        Err(e @ StartError::Config(_)) => e.to_string(),
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_tls_settings_stop_the_server_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cert = self_signed(dir.path());

    let only_cert = config_error(config(dir.path(), Some(&cert.cert_path), None)).await;
    assert!(only_cert.contains("tls.key_path"), "{only_cert}");
    let only_key = config_error(config(dir.path(), None, Some(&cert.key_path))).await;
    assert!(only_key.contains("tls.cert_path"), "{only_key}");

    let missing = dir.path().join("missing.pem");
    let e = config_error(config(dir.path(), Some(&missing), Some(&cert.key_path))).await;
    assert!(
        e.contains("missing.pem") && e.contains("cannot read"),
        "{e}"
    );

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let e = config_error(config(dir.path(), Some(&garbage), Some(&cert.key_path))).await;
    assert!(e.contains("garbage.pem"), "{e}");
    let e = config_error(config(dir.path(), Some(&cert.cert_path), Some(&garbage))).await;
    assert!(e.contains("garbage.pem"), "{e}");

    // A key and a certificate in each other's place: each file holds valid PEM of the wrong
    // kind.
    let e = config_error(config(
        dir.path(),
        Some(&cert.key_path),
        Some(&cert.cert_path),
    ))
    .await;
    assert!(e.contains("key.pem") || e.contains("cert.pem"), "{e}");

    // A key that belongs to another certificate.
    let other = tempfile::tempdir().unwrap();
    let other_cert = self_signed(other.path());
    let e = config_error(config(
        dir.path(),
        Some(&cert.cert_path),
        Some(&other_cert.key_path),
    ))
    .await;
    assert!(e.contains("cannot be used together"), "{e}");

    // None of these opened the broker.
    assert!(!dir.path().join("data").join("postroom.redb").exists());
}
