//! Attacks on the transport: a client that sends a request's headers slowly (or never) to hold
//! a connection, and with it a file descriptor and a task, for as long as it likes; and a
//! subscriber that learns the broker's DNS answers from the push target guard's refusals.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::Served;

/// How long the attacks wait for the server to close a connection before calling it held.
const HELD: Duration = Duration::from_secs(10);

/// Waits until the server closes `conn` (end of stream or reset), at most [`HELD`]; returns how
/// long that took, or `None` when the connection was still open at the deadline.
async fn closed_within(conn: &mut TcpStream, since: Instant) -> Option<Duration> {
    let deadline = tokio::time::Instant::from_std(since + HELD);
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed()),
            // Whatever the server says first (a 408, say), it must then close.
            Ok(Ok(_)) => continue,
        }
    }
}

/// One complete `GET /healthz` on a new connection; returns the status line.
async fn healthz(served: &Served) -> String {
    let mut conn = TcpStream::connect(served.addr).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: postroom\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(HELD, conn.read_to_end(&mut answer))
        .await
        .expect("the server answers a complete request")
        .unwrap();
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Issue 14, item 13. Mallory opens connections and sends half a request (a request line and
/// part of a header) on one and nothing at all on another, then waits, to hold them open (a
/// slowloris attack: enough of them exhaust the server's file descriptors). With
/// `http.header_read_timeout_ms` at 300 ms the server closes both within the timeout plus a
/// margin, and still answers a complete request on another connection.
#[tokio::test]
async fn slow_headers_are_cut_off() {
    let mut config = crate::harness::config();
    config.http.header_read_timeout_ms = 300;
    let served = Served::start(config).await;
    // The server is up (its database open, the administrator bootstrapped) before the clock
    // of the attack starts.
    assert!(healthz(&served).await.contains(" 200 "));

    let start = Instant::now();
    let mut partial = TcpStream::connect(served.addr).await.unwrap();
    partial
        .write_all(b"POST /oauth/token HTTP/1.1\r\nHost: postroom\r\nContent-Ty")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(served.addr).await.unwrap();

    let took = closed_within(&mut partial, start).await;
    let took = took.unwrap_or_else(|| panic!("a partial request was held open for {HELD:?}"));
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    assert!(
        took < Duration::from_millis(300) + Duration::from_secs(5),
        "{took:?}"
    );
    let took = closed_within(&mut silent, start).await;
    let took = took.unwrap_or_else(|| panic!("a silent connection was held open for {HELD:?}"));
    assert!(
        took < Duration::from_millis(300) + Duration::from_secs(5),
        "{took:?}"
    );

    assert!(healthz(&served).await.contains(" 200 "));
    served.stop().await;
}

/// Issue 14, item 13, over HTTPS. Mallory completes the TLS handshake, sends half a request
/// and waits. With `http.header_read_timeout_ms` at 300 ms the server closes the connection
/// within the timeout plus a margin, as over plain HTTP.
#[tokio::test]
async fn slow_headers_over_tls_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, ck.cert.pem()).unwrap();
    std::fs::write(&key_path, ck.signing_key.serialize_pem()).unwrap();
    let mut config = crate::harness::config();
    config.http.header_read_timeout_ms = 300;
    config.tls.cert_path = Some(cert_path);
    config.tls.key_path = Some(key_path);
    let served = Served::start(config).await;
    let addr = served.addr;
    let cert = ck.cert.der().clone();

    let took = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let conn = rustls::ClientConnection::new(
            std::sync::Arc::new(client),
            "localhost".try_into().unwrap(),
        )
        .unwrap();
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(HELD)).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        // The handshake happens on this first write, before the server's timers start.
        tls.write_all(b"POST /oauth/token HTTP/1.1\r\nHost: postroom\r\nContent-Ty")
            .unwrap();
        tls.flush().unwrap();
        let start = Instant::now();
        let mut buf = [0u8; 1024];
        loop {
            match tls.read(&mut buf) {
                Ok(0) => return Some(start.elapsed()),
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return None
                }
                // Closed without close_notify, or reset: closed all the same.
                Err(_) => return Some(start.elapsed()),
            }
        }
    })
    .await
    .unwrap();
    let took = took.unwrap_or_else(|| panic!("a partial request was held open for {HELD:?}"));
    assert!(
        took < Duration::from_millis(300) + Duration::from_secs(5),
        "{took:?}"
    );
    served.stop().await;
}

/// Issue 14, item 13: the push target guard's answers tell no DNS answers.
mod dns_answers {
    use axum::http::StatusCode;
    use serde_json::json;

    use crate::harness::World;

    /// Dotted IPv4 addresses in `text` (four dot-separated runs of digits).
    fn ipv4_in(text: &str) -> Vec<String> {
        text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|w| {
                let parts: Vec<&str> = w.split('.').collect();
                parts.len() == 4 && parts.iter().all(|p| !p.is_empty() && p.len() <= 3)
            })
            .map(String::from)
            .collect()
    }

    /// Issue 14, item 13. Mallory, a subscriber, maps the broker's internal network by
    /// subscribing with push URLs whose names resolve to internal addresses and reading the
    /// refusals ("`x` resolves to 10.1.2.3, a private address"). `localhost` resolves to a
    /// loopback address, refused by default: the refusal says the target is not allowed and
    /// names no address, and a name that does not resolve at all gets the same words.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_push_target_reveals_no_dns_answer() {
        let w = World::start().await;
        w.room("transfers").await;
        let mallory = w.justice("mallory").await;
        w.grant(&mallory, "subscriber", "transfers", None).await;

        let subscribe = |host: &str| {
            let body = json!({"mode": "push", "push": {"url": format!("http://{host}:9/hook")}});
            w.post("/v1/rooms/transfers/subscriptions", &mallory.token, body)
        };
        let local = subscribe("localhost").await;
        assert_eq!(
            local.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{}",
            local.body
        );
        assert_eq!(local.body["code"], "invalid_input");
        let detail = local.body["detail"].as_str().unwrap_or("").to_string();
        assert!(ipv4_in(&detail).is_empty(), "addresses in: {detail}");
        assert!(!detail.contains("::1"), "addresses in: {detail}");
        assert!(
            !detail.contains("loopback"),
            "the address class in: {detail}"
        );
        assert!(detail.contains("not an allowed push target"), "{detail}");

        // A name that does not resolve is answered in the same words.
        let nowhere = subscribe("nowhere.invalid").await;
        assert_eq!(nowhere.status, local.status, "{}", nowhere.body);
        assert_eq!(
            nowhere.body["detail"]
                .as_str()
                .unwrap_or("")
                .replace("nowhere.invalid", "HOST"),
            detail.replace("localhost", "HOST")
        );
    }
}
