//! Helpers shared by the server's test files (each test file is its own crate, so each uses
//! only some of them).
#![allow(dead_code)]

use std::process::Child;
use std::time::{Duration, Instant};

use broker_server::ServerConfig;

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
