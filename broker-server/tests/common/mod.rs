//! Helpers shared by the server's test files (each test file is its own crate, so each uses
//! only some of them).
#![allow(dead_code)]

use std::process::Child;
use std::time::{Duration, Instant};

use broker_server::ServerConfig;

pub mod nodes;

/// How long a spawned `postroom` may take to exit before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The server's default configuration with authentication off (every caller the local
/// administrator), for tests about the API's behaviour rather than access control.
pub fn local() -> ServerConfig {
    let mut c = ServerConfig::default();
    c.auth.insecure_no_auth = true;
    c
}

/// Waits for `child` to exit, killing it and failing the test after [`DEADLINE`]. A process
/// has no exit notification to wait on portably, so this polls with a deadline.
pub fn wait(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("postroom did not exit within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `serve()` on an ephemeral loopback port with data in a temporary folder, stopped by
/// [`Served::stop`].
pub struct Served {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// The data folder, removed when this is dropped.
    pub dir: tempfile::TempDir,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), broker_server::StartError>>,
}

impl Served {
    /// Starts the server with `config` (its `data_dir` replaced by a temporary folder).
    pub async fn start(config: ServerConfig) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let config = ServerConfig {
            // A folder the server creates (0700): a temporary folder itself is 0755, which
            // `serve` refuses as a data folder.
            data_dir: dir.path().join("data"),
            ..config
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(broker_server::serve(listener, config, async move {
            let _ = stopped.await;
        }));
        Served {
            addr,
            dir,
            stop,
            task,
        }
    }

    /// Stops the server and waits for it to finish cleanly.
    pub async fn stop(self) -> tempfile::TempDir {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
        self.dir
    }
}
