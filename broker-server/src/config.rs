//! The server's configuration: built-in defaults, then a TOML file, then `POSTROOM_*`
//! environment variables, then command-line flags, each overriding the one before. Every setting
//! of the core and the server can be set each way, so that a container or a systemd unit needs
//! no file at all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::StartError;

/// HTTP limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Largest request body accepted (default 1 MiB + 64 KiB, so that a maximal payload fits).
    pub body_bytes_max: usize,
    /// Longest a request may take before the server answers 503, in milliseconds (default 60 s,
    /// above the longest pull wait).
    pub request_timeout_ms: u64,
    /// Most requests handled at once; beyond it requests are shed with 503 (default 1,024).
    pub concurrent_requests_max: usize,
    /// How long shutdown waits for requests in flight, in milliseconds (default 30 s).
    pub shutdown_grace_ms: u64,
    /// Largest total size of a request's headers (names, values and separators) accepted;
    /// beyond it the answer is 431 (default 16 KiB).
    pub header_bytes_max: usize,
    /// Most headers one request may carry; beyond it the answer is 431 (default 64; the HTTP
    /// parser itself refuses more than 100).
    pub headers_max: usize,
    /// Longest a client may take to send a request's line and headers, in milliseconds
    /// (default 10 s); the connection is then closed. It applies to each request of an HTTP/1
    /// connection (so an idle keep-alive connection is closed after it too) and to a new
    /// connection's first request whatever its protocol, over HTTP and HTTPS. At least 1.
    pub header_read_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            body_bytes_max: 1024 * 1024 + 64 * 1024,
            request_timeout_ms: 60_000,
            concurrent_requests_max: 1024,
            shutdown_grace_ms: 30_000,
            header_bytes_max: 16 * 1024,
            headers_max: 64,
            header_read_timeout_ms: 10_000,
        }
    }
}

/// Authentication and tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Turns authentication off: every caller is the local administrator. For experiments on
    /// one machine only: refused unless the server listens on a loopback address (default off;
    /// also the `--insecure-no-auth` flag).
    pub insecure_no_auth: bool,
    /// How long an access token from `POST /oauth/token` is valid, in seconds (default 3600).
    pub token_ttl_secs: u64,
    /// The `iss` and `aud` of the tokens this server issues (default `postroom`).
    pub token_issuer: String,
    /// An external OpenID Connect issuer whose tokens are accepted too (optional).
    pub external: Option<ExternalIssuer>,
    /// The client id of the administrator created on first start (`postroom serve` takes it
    /// from `POSTROOM_ADMIN_CLIENT_ID`; default `admin`).
    pub admin_client_id: Option<String>,
    /// Its secret (`POSTROOM_ADMIN_CLIENT_SECRET`); generated and printed once when absent.
    pub admin_client_secret: Option<String>,
    /// Failed client authentications allowed per client id and source address per minute
    /// (default 10), refilled evenly (one every 6 s by default). Beyond it that pair is
    /// refused with 429 before any secret is checked, the right secret included. Zero turns
    /// the limit off. Keyed by the pair, not the client id alone, so that nobody can lock a
    /// client out by failing on purpose from elsewhere.
    pub failures_per_client_address_per_minute: u32,
    /// Failed client authentications allowed per source address per minute, whatever client
    /// they name (default 30), so that cycling client ids does not get around the limit above.
    /// IPv6 addresses count per /64, the block one host usually has. Zero turns it off
    /// (behind a reverse proxy every caller has the proxy's address).
    pub failures_per_address_per_minute: u32,
    /// Most client id and address pairs, and most addresses, whose failures are remembered
    /// (default 100,000 each, a few MB). Pairs whose failures have been refilled are forgotten
    /// first; when that is not enough, new pairs are not counted until it is.
    pub failure_keys_max: usize,
    /// Tokens one client may be issued per minute (default 60), refilled evenly; beyond it the
    /// client gets 429 `too_many_tokens` before its secret is checked. A client keeps a token
    /// until it expires (an hour by default), so this only stops a client that loops on the
    /// token endpoint and so holds the secret-check slots everyone shares. Zero turns it off.
    pub tokens_per_client_per_minute: u32,
    /// How far in the future a token of ours may say it was issued (`iat`), in seconds, for a
    /// clock stepped back (default 60). Later ones are refused.
    pub token_clock_skew_secs: u64,
    /// Most token signing keys in use at once: the one that signs and the retired ones still
    /// verifying the tokens they signed (default 8). A rotation beyond it is refused until
    /// older keys have expired, or drops them with `drop_previous`.
    pub signing_keys_max: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            insecure_no_auth: false,
            token_ttl_secs: 3600,
            token_issuer: "postroom".into(),
            external: None,
            admin_client_id: None,
            admin_client_secret: None,
            failures_per_client_address_per_minute: 10,
            failures_per_address_per_minute: 30,
            failure_keys_max: 100_000,
            tokens_per_client_per_minute: 60,
            token_clock_skew_secs: 60,
            signing_keys_max: 8,
        }
    }
}

/// A trusted external token issuer (Keycloak-style): its tokens are checked against its JSON Web
/// Key Set, issuer, audience and expiry, and mapped to an application by claims.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalIssuer {
    /// The expected `iss` claim.
    pub issuer: String,
    /// The expected `aud` claim.
    pub audience: String,
    /// The JWKS as a local file (read at start).
    pub jwks_file: Option<PathBuf>,
    /// The JWKS URL (fetched at start and again when a token names an unknown key id).
    pub jwks_url: Option<String>,
    /// The claim that holds the application id `INSTANCE/CLASS/MEMBER/APPLICATION`
    /// (default `postroom_application`).
    #[serde(default = "default_application_claim")]
    pub application_claim: String,
}

fn default_application_claim() -> String {
    "postroom_application".into()
}

/// What operators may see.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObservabilityConfig {
    /// Whether `GET /v1/admin/messages?payload=true` may show payloads (default false: payloads
    /// often carry personal data, and an operator chasing a delivery rarely needs them).
    pub message_log_payloads: bool,
}

/// HTTPS: when both files are given the server speaks TLS (rustls) instead of plain HTTP.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, PEM.
    pub cert_path: Option<PathBuf>,
    /// The private key, PEM.
    pub key_path: Option<PathBuf>,
}

impl TlsConfig {
    /// The error when only one of the two files is set: serving plain HTTP then would silently
    /// drop the TLS the operator asked for.
    pub const HALF_SET: &'static str =
        "TLS needs both tls.cert_path and tls.key_path; only one of them is set";

    /// Whether the server speaks HTTPS: both files are set.
    pub fn is_enabled(&self) -> bool {
        self.cert_path.is_some() && self.key_path.is_some()
    }
}

/// Where the broker keeps its data (`[storage]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `redb` (the default: one embedded file in the data folder) or `postgres` (a PostgreSQL
    /// database that several nodes may share; see `[storage.postgres]`).
    pub backend: Backend,
    /// The PostgreSQL database, when `backend = "postgres"`.
    pub postgres: broker_core::PostgresConfig,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: Backend::Redb,
            postgres: broker_core::PostgresConfig::default(),
        }
    }
}

/// The storage backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// An embedded redb file, `postroom.redb` in the data folder.
    Redb,
    /// A PostgreSQL database (`storage.postgres.url`).
    Postgres,
}

/// Everything `postroom serve` runs with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Where to listen (default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// The data folder; the database is `postroom.redb` inside it (default `./data`). Created
    /// 0700, the database 0600; an existing folder that other users can read or write is
    /// refused at start unless [`ServerConfig::allow_open_data_dir`] is set.
    pub data_dir: PathBuf,
    /// Starts even when the data folder can be read or written by other users (default false;
    /// also `--allow-open-data-dir`). The database holds the token signing keys: only set this
    /// when the folder is shared on purpose (a backup agent's group, say).
    pub allow_open_data_dir: bool,
    /// Where the data lives: the embedded redb file (default) or PostgreSQL.
    pub storage: StorageConfig,
    /// HTTP limits.
    pub http: HttpConfig,
    /// Authentication.
    pub auth: AuthConfig,
    /// HTTPS.
    pub tls: TlsConfig,
    /// What operators may see.
    pub observability: ObservabilityConfig,
    /// The core's settings (limits, writer, retention, delivery).
    pub broker: broker_core::Config,
    /// Domain packs (`schemas/irc/pack.toml`, ...) applied at every start, before the server
    /// answers: their Rooms and event types are created or updated (see [`crate::pack`]).
    /// Relative paths are relative to the working directory.
    pub packs: Vec<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("data"),
            allow_open_data_dir: false,
            storage: StorageConfig::default(),
            http: HttpConfig::default(),
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            observability: ObservabilityConfig::default(),
            broker: broker_core::Config::default(),
            packs: Vec::new(),
        }
    }
}

/// The prefix of environment variables that set configuration. Nested settings are joined with
/// a double underscore: `POSTROOM_BROKER__LIMITS__PAYLOAD_BYTES_MAX=2097152`.
pub const ENV_PREFIX: &str = "POSTROOM_";

impl ServerConfig {
    /// Loads the configuration: defaults, then the TOML file (if given), then environment
    /// variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, StartError> {
        let mut doc = toml::Table::try_from(ServerConfig::default())
            .map_err(|e| StartError::Config(format!("defaults: {e}")))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| StartError::Config(format!("cannot read {}: {e}", path.display())))?;
            let file_doc: toml::Table = toml::from_str(&text)
                .map_err(|e| StartError::Config(format!("{}: {e}", path.display())))?;
            merge(&mut doc, file_doc);
        }
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            // Variables the program itself reads elsewhere (credentials, log settings, and the
            // client subcommands' `POSTROOM_SERVER`, `POSTROOM_TOKEN`, credentials and token
            // cache) are not configuration keys: a shell set up for the client must still be
            // able to run `postroom serve`.
            if matches!(
                rest,
                "LOG"
                    | "LOG_FORMAT"
                    | "SERVER"
                    | "TOKEN"
                    | "CLIENT_ID"
                    | "CLIENT_SECRET"
                    | "CACHE_DIR"
            ) || rest.starts_with("ADMIN_")
            {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
            set_path(&mut doc, &path, parse_env_value(&value))
                .map_err(|e| StartError::Config(format!("{name}: {e}")))?;
        }
        toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| StartError::Config(e.to_string()))
    }

    /// Checks the settings that depend on each other or on where the server listens, before it
    /// starts: `insecure_no_auth` only on a loopback `listen_addr` (127.0.0.0/8 or ::1), because
    /// anyone who can reach the port would otherwise act as the administrator; and the TLS
    /// certificate and key set together or not at all; a header read timeout of at least 1 ms;
    /// a push lease (`broker.delivery.dispatch_lease_ms`) between 1 s and 10 min.
    pub fn validate(&self, listen_addr: SocketAddr) -> Result<(), StartError> {
        if self.auth.insecure_no_auth && !listen_addr.ip().is_loopback() {
            return Err(StartError::Config(format!(
                "--insecure-no-auth is only allowed on a loopback address; {listen_addr} is not \
                 one (listen on 127.0.0.1 or [::1], or turn authentication on)"
            )));
        }
        if self.tls.cert_path.is_some() != self.tls.key_path.is_some() {
            return Err(StartError::Config(TlsConfig::HALF_SET.into()));
        }
        if self.storage.backend == Backend::Postgres && self.storage.postgres.url.trim().is_empty()
        {
            return Err(StartError::Config(
                "storage.backend is postgres but storage.postgres.url is not set (for example \
                 POSTROOM_STORAGE__POSTGRES__URL=postgresql://postroom@db.example/postroom)"
                    .into(),
            ));
        }
        let lease = self.broker.delivery.dispatch_lease_ms;
        if !(1_000..=600_000).contains(&lease) {
            return Err(StartError::Config(format!(
                "broker.delivery.dispatch_lease_ms must be between 1000 and 600000 \
                 (milliseconds); it is {lease}"
            )));
        }
        if self.http.header_read_timeout_ms == 0 {
            return Err(StartError::Config(
                "http.header_read_timeout_ms must be at least 1 (milliseconds)".into(),
            ));
        }
        Ok(())
    }

    /// The database file inside the data folder.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("postroom.redb")
    }
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// An environment value as TOML when it parses as a scalar (`42`, `true`, `1.5`), else a string.
fn parse_env_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc)
        .ok()
        .and_then(|mut t| t.remove("v"))
    {
        Some(v @ (toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_))) => v,
        _ => toml::Value::String(raw.to_string()),
    }
}

fn set_path(doc: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty setting name")?;
    let mut table = doc;
    for p in parents {
        table = match table.get_mut(p) {
            Some(toml::Value::Table(t)) => t,
            _ => return Err(format!("`{p}` is not a group of settings")),
        };
    }
    if !table.contains_key(last) {
        return Err(format!("unknown setting `{last}`"));
    }
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_file_env_in_that_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("postroom.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:9000\"\n[broker.limits]\npayload_bytes_max = 2048\nkey_bytes_max = 10\n").unwrap();
        let env = vec![
            (
                "POSTROOM_BROKER__LIMITS__KEY_BYTES_MAX".to_string(),
                "20".to_string(),
            ),
            (
                "POSTROOM_DATA_DIR".to_string(),
                "/var/lib/postroom".to_string(),
            ),
            (
                "POSTROOM_BROKER__VALIDATE_FORMATS".to_string(),
                "false".to_string(),
            ),
            ("OTHER".to_string(), "ignored".to_string()),
        ];
        let c = ServerConfig::load(Some(&file), env).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.broker.limits.payload_bytes_max, 2048);
        assert_eq!(
            c.broker.limits.key_bytes_max, 20,
            "environment beats the file"
        );
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/postroom"));
        assert!(!c.broker.validate_formats);
        assert_eq!(c.http, HttpConfig::default());
    }

    #[test]
    fn unknown_or_ill_typed_settings_are_refused() {
        let bad = |k: &str, v: &str| {
            ServerConfig::load(None, vec![(k.to_string(), v.to_string())]).unwrap_err()
        };
        assert!(bad("POSTROOM_NOPE", "1")
            .to_string()
            .contains("unknown setting"));
        let typed = bad("POSTROOM_BROKER__LIMITS__PAYLOAD_BYTES_MAX", "lots").to_string();
        assert!(
            typed.contains("payload_bytes_max") || typed.contains("invalid type"),
            "{typed}"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "lissen = \"x\"").unwrap();
        assert!(ServerConfig::load(Some(&file), Vec::new()).is_err());
    }

    /// The push target guard's settings, as the README documents them.
    #[test]
    fn push_allow_from_the_file_and_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("postroom.toml");
        std::fs::write(
            &file,
            "[broker.delivery.push_allow]\nprivate = true\ncidrs = [\"100.64.0.0/10\"]\n",
        )
        .unwrap();
        let env = vec![(
            "POSTROOM_BROKER__DELIVERY__PUSH_ALLOW__LOOPBACK".to_string(),
            "true".to_string(),
        )];
        let allow = ServerConfig::load(Some(&file), env)
            .unwrap()
            .broker
            .delivery
            .push_allow;
        assert!(allow.loopback && allow.private && !allow.link_local);
        assert_eq!(allow.cidrs, vec!["100.64.0.0/10".to_string()]);
        assert_eq!(
            ServerConfig::default().broker.delivery.push_allow,
            broker_core::PushAllow::default(),
            "nothing non-public is allowed by default"
        );
    }

    #[test]
    fn insecure_no_auth_is_only_allowed_on_loopback() {
        let mut c = ServerConfig::default();
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(
            c.validate(addr("0.0.0.0:8080")).is_ok(),
            "auth on: any address"
        );
        c.auth.insecure_no_auth = true;
        for ok in ["127.0.0.1:8080", "127.1.2.3:0", "[::1]:8080"] {
            assert!(c.validate(addr(ok)).is_ok(), "{ok} is loopback");
        }
        for bad in [
            "0.0.0.0:8080",
            "[::]:8080",
            "192.0.2.1:8080",
            "[::ffff:127.0.0.1]:8080",
        ] {
            let e = c.validate(addr(bad)).unwrap_err().to_string();
            assert!(
                e.contains("--insecure-no-auth is only allowed on a loopback address"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn tls_files_come_in_pairs() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut c = ServerConfig::default();
        c.tls.cert_path = Some("cert.pem".into());
        assert!(!c.tls.is_enabled());
        let e = c.validate(addr).unwrap_err().to_string();
        assert!(e.contains("tls.key_path"), "{e}");
        c.tls.key_path = Some("key.pem".into());
        assert!(c.tls.is_enabled());
        assert!(c.validate(addr).is_ok());
    }

    /// The data folder's escape hatch, from the file and the environment (the flag is
    /// `--allow-open-data-dir`).
    #[test]
    fn allow_open_data_dir_from_the_file_and_the_environment() {
        assert!(!ServerConfig::default().allow_open_data_dir);
        let env = vec![(
            "POSTROOM_ALLOW_OPEN_DATA_DIR".to_string(),
            "true".to_string(),
        )];
        assert!(ServerConfig::load(None, env).unwrap().allow_open_data_dir);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("postroom.toml");
        std::fs::write(&file, "allow_open_data_dir = true\n").unwrap();
        assert!(
            ServerConfig::load(Some(&file), Vec::new())
                .unwrap()
                .allow_open_data_dir
        );
    }

    #[test]
    fn a_header_read_timeout_is_required() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut c = ServerConfig::default();
        c.http.header_read_timeout_ms = 0;
        let e = c.validate(addr).unwrap_err().to_string();
        assert!(e.contains("header_read_timeout_ms"), "{e}");
    }

    /// A push lease of a millisecond would have every node commit renewals hundreds of times a
    /// second; one longer than ten minutes leaves a dead node's subscriptions that long.
    #[test]
    fn a_push_lease_outside_one_second_to_ten_minutes_is_refused() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        for (lease, ok) in [
            (0, false),
            (999, false),
            (1_000, true),
            (600_000, true),
            (u64::MAX, false),
        ] {
            let mut c = ServerConfig::default();
            c.broker.delivery.dispatch_lease_ms = lease;
            match c.validate(addr) {
                Ok(()) => assert!(ok, "{lease} accepted"),
                Err(e) => {
                    assert!(!ok, "{lease} refused: {e}");
                    assert!(e.to_string().contains("dispatch_lease_ms"), "{e}");
                }
            }
        }
    }

    #[test]
    fn the_client_variables_are_not_settings() {
        let env = vec![
            ("POSTROOM_SERVER".to_string(), "http://h:1".to_string()),
            ("POSTROOM_TOKEN".to_string(), "t".to_string()),
            ("POSTROOM_CLIENT_ID".to_string(), "c".to_string()),
            ("POSTROOM_CLIENT_SECRET".to_string(), "s".to_string()),
            ("POSTROOM_CACHE_DIR".to_string(), "/tmp/x".to_string()),
        ];
        assert_eq!(
            ServerConfig::load(None, env).unwrap(),
            ServerConfig::default()
        );
    }
}
