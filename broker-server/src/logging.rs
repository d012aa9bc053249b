//! The server's logs: text for people or JSON for collectors, with levels an administrator
//! changes at run time (`PATCH /v1/admin/config` with `log_level`). Turning on `debug` for one
//! module during an incident, and off again, should not need a restart that loses the incident.

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::prelude::*;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

/// The live filter and the directives it was built from (an `EnvFilter` does not give them
/// back in the form they were written).
struct Control {
    handle: reload::Handle<EnvFilter, Registry>,
    directives: Mutex<String>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// Installs the process's logger: `directives` in `RUST_LOG` syntax (e.g. `info` or
/// `info,broker_core=debug`), JSON lines when `json`, else text, on standard error. Returns an
/// error for bad directives or when a logger is already installed.
pub fn init(directives: &str, json: bool) -> Result<(), String> {
    let filter = EnvFilter::try_new(directives).map_err(|e| format!("log level: {e}"))?;
    let (layer, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(layer);
    let installed = if json {
        registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
    installed.map_err(|e| format!("cannot install the logger: {e}"))?;
    let _ = CONTROL.set(Control {
        handle,
        directives: Mutex::new(directives.to_string()),
    });
    Ok(())
}

/// The directives in force, or `None` when this process's logger was not installed by
/// [`init`] (a program embedding the server logs its own way).
pub fn level() -> Option<String> {
    CONTROL.get().map(|c| {
        c.directives
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    })
}

/// Why a log level change was refused.
#[derive(Debug)]
pub enum LevelError {
    /// The directives do not parse.
    Invalid(String),
    /// This process's logger was not installed by [`init`].
    NotManaged,
}

/// Replaces the directives in force.
pub fn set_level(directives: &str) -> Result<(), LevelError> {
    let control = CONTROL.get().ok_or(LevelError::NotManaged)?;
    let filter = EnvFilter::try_new(directives).map_err(|e| LevelError::Invalid(e.to_string()))?;
    let mut current = control.directives.lock().unwrap_or_else(|p| p.into_inner());
    control
        .handle
        .reload(filter)
        .map_err(|_| LevelError::NotManaged)?;
    *current = directives.to_string();
    Ok(())
}
