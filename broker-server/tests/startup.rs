//! `postroom serve` as an operator starts it: the checks that refuse a dangerous configuration
//! before anything listens, and the line that tells where the server listens. Guards against
//! `--insecure-no-auth` being usable on a reachable address, and against a TLS server
//! announcing itself as plain HTTP.

mod common;
use common::{wait, DEADLINE};

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

/// The binary with none of the user's `POSTROOM_*` settings.
fn postroom() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_postroom"));
    for (k, _) in std::env::vars() {
        if k.starts_with("POSTROOM_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn insecure_no_auth_on_a_reachable_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = postroom()
        .args(["serve", "--insecure-no-auth", "--listen", "0.0.0.0:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait(&mut child);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!status.success(), "{status:?}");
    assert!(
        stderr.contains("--insecure-no-auth is only allowed on a loopback address"),
        "{stderr}"
    );
    assert!(
        !stdout.contains("listening"),
        "a refused server must not announce itself: {stdout}"
    );
    assert!(
        !dir.path().join("data").join("postroom.redb").exists(),
        "the data must not be opened"
    );
}

#[test]
fn https_is_announced_and_served_and_insecure_no_auth_runs_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let file = dir.path().join("postroom.toml");
    std::fs::write(
        &file,
        format!(
            "[tls]\ncert_path = {:?}\nkey_path = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    )
    .unwrap();

    let mut child = postroom()
        .args(["serve", "--insecure-no-auth", "--listen", "127.0.0.1:0"])
        .arg("--config")
        .arg(&file)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let line = match lines_rx.recv_timeout(DEADLINE) {
        Ok(line) => line,
        Err(e) => {
            let _ = child.kill();
            panic!("postroom did not announce itself: {e}");
        }
    };
    let Some(addr) = line
        .strip_prefix("postroom listening on https://")
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
    else {
        let _ = child.kill();
        panic!("expected an https:// address: {line}");
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ck.cert.pem().as_bytes()).unwrap()])
            .timeout(DEADLINE)
            .build()
            .unwrap();
        let resp = client.get(format!("https://{addr}/healthz")).send().await?;
        resp.text().await
    });

    // SIGTERM asks for the graceful shutdown; the server must then exit successfully.
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = wait(&mut child);
    assert_eq!(answer.unwrap(), "ok");
    assert!(status.success(), "{status:?}");
}
