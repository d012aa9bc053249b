//! Attacks on the data folder (issue 14, item 4): `postroom.redb` holds the token signing keys
//! and the client records, so anyone who can read it can sign tokens. These tests start the
//! server as `postroom serve` does (`broker_server::serve` on a loopback listener) and look at
//! what it leaves on disk.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use broker_server::{ServerConfig, StartError};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::harness::config;

/// Longest a start may take before the test gives up.
const DEADLINE: Duration = Duration::from_secs(30);

/// The permission bits of a file or folder.
fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A server that started, and how to stop it.
struct Running {
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), StartError>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap().unwrap();
    }
}

/// Runs `serve` with `cfg` until it either answers `GET /healthz` (it started) or returns an
/// error (it refused to start).
async fn start(cfg: ServerConfig) -> Result<Running, StartError> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let mut server = tokio::spawn(broker_server::serve(listener, cfg, async move {
        let _ = stopped.await;
    }));
    // The listener is bound, so the probe waits in its backlog until the server accepts, or
    // fails when a refusing server drops the listener.
    let probe = async {
        let client = reqwest::Client::new();
        client.get(format!("http://{addr}/healthz")).send().await
    };
    let outcome = tokio::time::timeout(DEADLINE, async {
        tokio::select! {
            done = &mut server => Err(done.unwrap().expect_err("serve ended without a shutdown")),
            answer = probe => match answer {
                Ok(a) => {
                    assert_eq!(a.status(), 200);
                    Ok(())
                }
                Err(_) => Err((&mut server).await.unwrap().expect_err("the probe failed")),
            },
        }
    })
    .await
    .expect("the server neither started nor refused");
    outcome.map(|()| Running { stop, server })
}

/// Issue 14, item 4. The attacker has a shell account on the broker's host (or a process in
/// another container sharing the volume). On a fresh install the server created `./data` 0755
/// and `postroom.redb` 0644, so the attacker could copy the database and read the signing key
/// out of it. A fresh data folder must be 0700 and every file the server writes there 0600.
#[tokio::test]
async fn a_fresh_data_folder_and_its_database_are_private() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("var").join("postroom");
    let mut cfg = config();
    cfg.data_dir = data.clone();
    let running = start(cfg).await.expect("a fresh folder starts");

    assert_eq!(mode(&data), 0o700, "the data folder is open to other users");
    let mut files = 0;
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{} is open to others", path.display());
        files += 1;
    }
    assert!(files >= 1, "the database is in the folder");
    assert_eq!(mode(&data.join("postroom.redb")), 0o600);
    running.stop().await;
}

/// Issue 14, item 4. The data folder already exists and other users can read it (0755, as an
/// older version or a careless `mkdir` left it). The attacker waits for the server to write the
/// signing key there. The server refuses to start, naming the folder, its mode and the fix, and
/// opens nothing.
#[tokio::test]
async fn a_data_folder_other_users_can_read_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cfg = config();
    cfg.data_dir = data.clone();

    let refused = match start(cfg).await {
        Ok(running) => {
            running.stop().await;
            panic!("the server started on a 0755 data folder");
        }
        Err(e) => e.to_string(),
    };
    assert!(refused.contains(&data.display().to_string()), "{refused}");
    assert!(refused.contains("0755"), "{refused}");
    assert!(
        refused.contains(&format!("chmod 700 {}", data.display())),
        "{refused}"
    );
    assert!(refused.contains("allow_open_data_dir"), "{refused}");
    assert!(
        !data.join("postroom.redb").exists(),
        "nothing may be written into the open folder"
    );
    assert_eq!(
        mode(&data),
        0o755,
        "the operator's folder is left as it was"
    );
}

/// Issue 14, item 4. A database an older version left 0644 in a folder the operator has since
/// made private is made 0600 at the next start, so that moving or sharing the folder later does
/// not expose it.
#[tokio::test]
async fn a_database_an_older_version_left_readable_is_made_private() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut cfg = config();
    cfg.data_dir = data.clone();
    start(cfg.clone()).await.unwrap().stop().await;
    let db = data.join("postroom.redb");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();

    let running = start(cfg).await.expect("a private folder starts");
    assert_eq!(mode(&db), 0o600);
    running.stop().await;
}

/// Issue 14, item 4: the escape hatch. An operator whose backup agent reads the folder through
/// its group sets `allow_open_data_dir`; the server then starts on the open folder and leaves
/// the folder's mode alone (the database it creates is still 0600).
#[tokio::test]
async fn an_operator_may_keep_an_open_folder_on_purpose() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o750)).unwrap();
    let mut cfg = config();
    cfg.data_dir = data.clone();
    cfg.allow_open_data_dir = true;

    let running = start(cfg).await.expect("allowed explicitly");
    assert_eq!(mode(&data), 0o750);
    assert_eq!(mode(&data.join("postroom.redb")), 0o600);
    running.stop().await;
}
