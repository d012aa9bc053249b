//! `postroom serve` as an operator starts it: the checks that refuse a dangerous configuration
//! before anything listens, and the line that tells where the server listens. Guards against
//! `--insecure-no-auth` being usable on a reachable address, a data folder other users can
//! read, and a TLS server announcing itself as plain HTTP.
#![forbid(unsafe_code)]

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

/// Lines of a child's stream, read on a thread and handed over a channel.
fn lines_of(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Waits for a line that `wanted` accepts, up to [`DEADLINE`]; kills the child on failure.
fn expect_line(
    lines: &mpsc::Receiver<String>,
    child: &mut std::process::Child,
    wanted: impl Fn(&str) -> bool,
) -> String {
    let until = std::time::Instant::now() + DEADLINE;
    loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if wanted(&line) => return line,
            Ok(_) => continue,
            Err(e) => {
                let _ = child.kill();
                panic!("no such line: {e}");
            }
        }
    }
}

/// `PATCH /v1/admin/config` with `log_level` changes what a running server logs: the trail of
/// received events (`postroom::messages`, metadata only) appears without a restart, and the
/// payload never does.
#[test]
fn the_log_level_changes_at_run_time_and_the_message_trail_carries_no_payload() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = postroom()
        .args(["serve", "--insecure-no-auth", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("POSTROOM_LOG", "warn")
        .env("POSTROOM_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = lines_of(child.stdout.take().unwrap());
    let stderr = lines_of(child.stderr.take().unwrap());
    let line = expect_line(&stdout, &mut child, |l| l.contains("listening"));
    let base = line
        .strip_prefix("postroom listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .expect("an address")
        .to_string();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let secret = "do-not-log-this-payload";
    let result: Result<(u16, u16), reqwest::Error> = runtime.block_on(async {
        let c = reqwest::Client::builder().timeout(DEADLINE).build()?;
        c.post(format!("{base}/v1/rooms"))
            .json(&serde_json::json!({"name": "logs"}))
            .send()
            .await?;
        c.put(format!("{base}/v1/rooms/logs/event-types/Note"))
            .json(&serde_json::json!({"schema": {"type": "object"}}))
            .send()
            .await?;
        let patched = c
            .patch(format!("{base}/v1/admin/config"))
            .json(&serde_json::json!({"log_level": "warn,postroom::messages=debug"}))
            .send()
            .await?
            .status()
            .as_u16();
        let published = c
            .post(format!("{base}/v1/rooms/logs/events/Note"))
            .json(&serde_json::json!({"text": secret}))
            .send()
            .await?
            .status()
            .as_u16();
        Ok((patched, published))
    });
    let (patched, published) = result.unwrap();
    assert_eq!((patched, published), (200, 201));
    let trail = expect_line(&stderr, &mut child, |l| l.contains("event received"));
    let entry: serde_json::Value = serde_json::from_str(&trail).unwrap();
    assert_eq!(entry["target"], "postroom::messages", "{trail}");
    assert_eq!(entry["fields"]["room"], "logs", "{trail}");
    assert!(
        !trail.contains(secret),
        "a payload reached the log: {trail}"
    );
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(wait(&mut child).success());
}

/// A data folder other users can read (a temporary folder is 0755) is refused before the server
/// announces itself, with the fix in the message; `--allow-open-data-dir` starts it anyway.
#[test]
fn an_open_data_folder_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("data");
    std::fs::create_dir(&open).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut child = postroom()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&open)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait(&mut child);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "{status:?}");
    assert!(
        stderr.contains(&format!("chmod 700 {}", open.display())) && stderr.contains("0755"),
        "{stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "a refused server must not announce itself"
    );
    assert!(!open.join("postroom.redb").exists());

    let mut child = postroom()
        .args(["serve", "--allow-open-data-dir", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&open)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = lines_of(child.stdout.take().unwrap());
    // The bootstrap's line comes after the database is open.
    expect_line(&stdout, &mut child, |l| {
        l.contains("created the administrator client")
    });
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(wait(&mut child).success());
    assert!(open.join("postroom.redb").exists());
}
