//! How the PostgreSQL backend reaches its database: the `[storage.postgres]` settings, the
//! driver's configuration made from them (timeouts, primary only), TLS (rustls, `ca_file` or the
//! system's roots, always verified) and the connection pools. Kept apart from `pg_kv.rs`, which
//! is what the backend does once connected.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde::{Deserialize, Serialize};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{Error, Result};

/// How to reach the PostgreSQL database (`[storage.postgres]` in `postroom.toml`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// A libpq connection string or URL (`postgresql://user:password@host:5432/postroom`,
    /// `host=/run/postgresql dbname=postroom`). Empty: not configured.
    pub url: String,
    /// Connections kept for reads (default 16); commits use one more of their own.
    pub pool_size: usize,
    /// Longest a statement may run before the database cancels it, in milliseconds (default
    /// 30,000; 0: no limit). Set on every connection.
    pub statement_timeout_ms: u64,
    /// Longest to wait for a connection, to the database or from the pool, in milliseconds
    /// (default 5,000).
    pub connect_timeout_ms: u64,
    /// A PEM file of the certificate authorities that sign the database's certificate (a
    /// private CA, a cloud provider's bundle). Empty (the default): the system's trusted roots.
    /// Whether TLS is used is the URL's `sslmode` (`disable`, `prefer`, the default, or
    /// `require`); when it is, the certificate is always verified, host name included.
    pub ca_file: String,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: String::new(),
            pool_size: 16,
            statement_timeout_ms: 30_000,
            connect_timeout_ms: 5_000,
            ca_file: String::new(),
        }
    }
}

/// Without the URL, which may hold a password: where the database is instead.
impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("database", &self.describe())
            .field("pool_size", &self.pool_size)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl PostgresConfig {
    /// Where the database is, for logs and the start-up line: hosts and database name, never
    /// the password.
    pub fn describe(&self) -> String {
        match self.url.parse::<tokio_postgres::Config>() {
            Ok(pg) => {
                let hosts: Vec<String> = pg
                    .get_hosts()
                    .iter()
                    .map(|h| match h {
                        tokio_postgres::config::Host::Tcp(name) => name.clone(),
                        tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
                    })
                    .collect();
                format!(
                    "PostgreSQL database {} on {}",
                    pg.get_dbname().unwrap_or("(default)"),
                    if hosts.is_empty() {
                        "localhost".to_string()
                    } else {
                        hosts.join(",")
                    }
                )
            }
            Err(_) => "PostgreSQL (an invalid connection string)".into(),
        }
    }
}

/// The driver's configuration from ours: the connection string, the timeouts, and the
/// application name that `pg_stat_activity` shows.
pub(super) fn pg_config(config: &PostgresConfig) -> Result<tokio_postgres::Config> {
    if config.url.trim().is_empty() {
        return Err(Error::Storage(
            "postgres: storage.postgres.url is not set (a URL such as \
             postgresql://postroom@db.example:5432/postroom)"
                .into(),
        ));
    }
    let mut pg: tokio_postgres::Config = config.url.parse().map_err(|e| {
        Error::Storage(format!(
            "postgres: storage.postgres.url is not a valid connection string: {e}"
        ))
    })?;
    pg.connect_timeout(Duration::from_millis(config.connect_timeout_ms.max(1)));
    // Only a primary takes writes, and only a primary's snapshots see every acknowledged
    // commit: with several hosts, a standby is never used.
    pg.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
    if pg.get_application_name().is_none() {
        pg.application_name("postroom");
    }
    let mut options = pg.get_options().unwrap_or("").to_string();
    options.push_str(&format!(
        " -c statement_timeout={}",
        config.statement_timeout_ms
    ));
    pg.options(options.trim());
    Ok(pg)
}

/// Warns when a database reached over the network may be talked to in plaintext: with
/// `sslmode=prefer` (the default) an attacker on the path can refuse TLS and read or change
/// everything, signing keys included.
pub(super) fn warn_if_plaintext(pg: &tokio_postgres::Config) {
    let remote = pg.get_hosts().iter().any(|h| match h {
        tokio_postgres::config::Host::Tcp(name) => {
            name != "localhost"
                && !name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        tokio_postgres::config::Host::Unix(_) => false,
    });
    if remote && pg.get_ssl_mode() != tokio_postgres::config::SslMode::Require {
        tracing::warn!(
            "storage.postgres.url reaches the database over the network without sslmode=require: \
             a machine on the path can refuse TLS and read or change the data; add sslmode=require"
        );
    }
}

/// The TLS connector: rustls (aws-lc-rs), trusting `ca_file` or else the system's roots. The
/// URL's `sslmode` decides whether it is used.
pub(super) fn tls(config: &PostgresConfig) -> Result<MakeRustlsConnect> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if config.ca_file.trim().is_empty() {
        // Certificates the system store holds but rustls cannot parse are skipped, as a
        // browser would.
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
    } else {
        let file = config.ca_file.trim();
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(file).map_err(|e| {
            Error::Storage(format!("postgres: storage.postgres.ca_file {file}: {e}"))
        })?;
        for cert in certs {
            let cert = cert.map_err(|e| {
                Error::Storage(format!("postgres: storage.postgres.ca_file {file}: {e}"))
            })?;
            roots.add(cert).map_err(|e| {
                Error::Storage(format!("postgres: storage.postgres.ca_file {file}: {e}"))
            })?;
        }
        if roots.is_empty() {
            return Err(Error::Storage(format!(
                "postgres: storage.postgres.ca_file {file} holds no certificate"
            )));
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Storage(format!("postgres: TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(client))
}

pub(super) fn pool(
    pg: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    size: usize,
    config: &PostgresConfig,
) -> Result<Pool> {
    let manager = Manager::from_config(
        pg.clone(),
        tls.clone(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let wait = Duration::from_millis(config.connect_timeout_ms.max(1));
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(wait))
        .create_timeout(Some(wait))
        .build()
        .map_err(|e| Error::Storage(format!("postgres: cannot build the pool: {e}")))
}
