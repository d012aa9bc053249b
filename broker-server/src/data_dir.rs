//! The data folder's protection. `postroom.redb` holds the token signing keys and the API
//! clients' records, so anyone who can read it can sign tokens; the server therefore keeps the
//! folder to its own user. A new folder is made 0700 (and the core makes the database 0600); an
//! existing folder that other users can read or write stops the start with a message saying how
//! to fix it, unless the operator has said, with `allow_open_data_dir`, that it is shared on
//! purpose. A database an older version left readable by others is made 0600.
//!
//! On platforms without Unix permissions the folder is only created.

use std::path::Path;

use crate::config::ServerConfig;
use crate::error::StartError;

/// Makes the data folder ready before the broker opens it: creates it private, or checks that
/// an existing one is (see the module's documentation).
pub fn prepare(config: &ServerConfig) -> Result<(), StartError> {
    let dir = &config.data_dir;
    let fail = |what: &Path, e: std::io::Error| {
        StartError::DataDir(format!("cannot prepare {}: {e}", what.display()))
    };
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder.create(dir).map_err(|e| fail(dir, e))?;
            Ok(())
        }
        Err(e) => Err(fail(dir, e)),
        Ok(meta) if !meta.is_dir() => Err(StartError::DataDir(format!(
            "{} is not a folder",
            dir.display()
        ))),
        Ok(meta) => check_existing(config, &meta),
    }
}

#[cfg(unix)]
fn check_existing(config: &ServerConfig, meta: &std::fs::Metadata) -> Result<(), StartError> {
    use std::os::unix::fs::PermissionsExt;
    /// Read, write or search by the group or by others.
    const OPEN: u32 = 0o077;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & OPEN != 0 {
        if !config.allow_open_data_dir {
            return Err(StartError::OpenDataDir {
                dir: config.data_dir.clone(),
                mode,
            });
        }
        tracing::warn!(
            dir = %config.data_dir.display(),
            mode = format!("{mode:04o}"),
            "the data folder is open to other users (allow_open_data_dir is set)"
        );
    }
    // The database file is made private even in a folder left open on purpose: it holds the
    // token signing keys.
    let db = config.database_path();
    if let Ok(file) = std::fs::metadata(&db) {
        let file_mode = file.permissions().mode() & 0o7777;
        if file.is_file() && file_mode & OPEN != 0 {
            std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
                StartError::DataDir(format!("cannot make {} private: {e}", db.display()))
            })?;
            tracing::info!(
                file = %db.display(),
                was = format!("{file_mode:04o}"),
                "made the database file private (0600)"
            );
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_existing(_: &ServerConfig, _: &std::fs::Metadata) -> Result<(), StartError> {
    Ok(())
}
