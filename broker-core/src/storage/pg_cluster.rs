//! A throwaway PostgreSQL server for tests, so that `cargo test` needs nothing running
//! beforehand: the first test that asks starts one (initdb and pg_ctl from the machine's
//! PostgreSQL, in a fresh temporary folder, on a free loopback port), and every test gets an
//! empty schema of its own in it, reached over TLS (a certificate for 127.0.0.1 from an authority
//! made with `openssl` at start, which [`TestPostgres::fresh`] configures as `ca_file`). The
//! server runs with `fsync=off`: the tests stop Postroom
//! processes, never the machine, and a commit's flush would only slow them. A watchdog shell stops the server and removes its folder once
//! the test process has exited.
//!
//! Where the binaries are: `POSTROOM_TEST_PG_BIN`, else `pg_config --bindir`, else the newest
//! `/usr/lib/postgresql/<version>/bin` (Debian's layout). As root, the server runs as the
//! `postgres` user (initdb refuses root). To use a server that is already running instead, set
//! `POSTROOM_TEST_POSTGRES_URL` to a connection URL or key-value string of a role that may
//! create schemas.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::pg_config::PostgresConfig;

/// A PostgreSQL server the tests share.
pub struct TestPostgres {
    /// A key-value connection string of the server's `postgres` database.
    base: String,
    next: AtomicU64,
    /// The certificate authority of the server's TLS certificate (for 127.0.0.1), when this
    /// process started the server.
    ca_file: Option<PathBuf>,
    /// How to stop and start it again, when this process started it.
    control: Option<Control>,
}

/// What `pg_ctl` needs to stop and start a server this process started.
struct Control {
    /// The folder of the PostgreSQL binaries.
    bin: PathBuf,
    /// The server's port on 127.0.0.1.
    port: u16,
    /// The folder holding the data folder, the log, the socket and the certificates.
    dir: PathBuf,
    pg_ctl: PathBuf,
    data: PathBuf,
    log: PathBuf,
    /// The server's options (`pg_ctl -o`).
    options: String,
    /// Whether `pg_ctl` runs as the `postgres` user (this process is root).
    root: bool,
}

impl Control {
    fn pg_ctl(&self) -> Command {
        let mut c = if self.root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&self.pg_ctl);
            c
        } else {
            Command::new(&self.pg_ctl)
        };
        c.arg("-D").arg(&self.data);
        c
    }
}

static SERVER: OnceLock<Result<TestPostgres, String>> = OnceLock::new();

impl TestPostgres {
    /// Starts a server of its own (not the tests' shared one): `durable` keeps `fsync` on, as
    /// a benchmark needs; the tests' server runs without. Stopped when this process exits.
    pub fn start(durable: bool) -> Result<TestPostgres, String> {
        start_server(durable)
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`: no checkpoint;
    /// it recovers from its WAL when started again). Only a server this process started (one
    /// of [`TestPostgres::start`], never the tests' shared one, which other tests use).
    pub fn crash(&self) -> Result<(), String> {
        let control = self
            .control
            .as_ref()
            .ok_or("not a server this process started")?;
        output(control.pg_ctl().args(["-w", "-m", "immediate", "stop"]))?;
        Ok(())
    }

    /// A streaming replica of this server (one this process started): a base backup
    /// (`pg_basebackup -R`) started as a hot standby on a port of its own, with the same TLS
    /// certificate. Make it synchronous with
    /// `execute("ALTER SYSTEM SET synchronous_standby_names = '*'")` and
    /// `execute("SELECT pg_reload_conf()")` on this server; promote it with
    /// [`TestPostgres::promote`]. Stopped when this process exits.
    pub fn replica(&self) -> Result<TestPostgres, String> {
        let control = self
            .control
            .as_ref()
            .ok_or("not a server this process started")?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "postroom-pg-replica-{}-{nanos}",
            std::process::id()
        ));
        let root = control.root;
        prepare_dir(&dir, root)?;
        let data = dir.join("data");
        as_user(root, &control.bin.join("pg_basebackup"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &control.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg("-D")
            .arg(&data)
            .args(["-R", "-X", "stream", "--no-sync"])
            .output()
            .map_err(|e| format!("pg_basebackup: {e}"))
            .and_then(|o| {
                if o.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "pg_basebackup: {}",
                        String::from_utf8_lossy(&o.stderr)
                    ))
                }
            })?;
        let port = free_port()?;
        let options = control
            .options
            .replace(&format!("-p {}", control.port), &format!("-p {port}"))
            .replace(
                &format!("-k {}", control.dir.display()),
                &format!("-k {}", dir.display()),
            );
        let replica = Control {
            bin: control.bin.clone(),
            port,
            dir: dir.clone(),
            pg_ctl: control.pg_ctl.clone(),
            data: data.clone(),
            log: dir.join("log"),
            options,
            root,
        };
        output(replica.pg_ctl().arg("-l").arg(&replica.log).args([
            "-w",
            "-t",
            "60",
            "-o",
            &replica.options,
            "start",
        ]))?;
        watchdog(root, &control.pg_ctl, &data, &dir)?;
        Ok(TestPostgres {
            base: format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
            next: AtomicU64::new(0),
            ca_file: self.ca_file.clone(),
            control: Some(replica),
        })
    }

    /// Promotes a replica to primary (`pg_ctl promote -w`).
    pub fn promote(&self) -> Result<(), String> {
        let control = self
            .control
            .as_ref()
            .ok_or("not a server this process started")?;
        output(control.pg_ctl().args(["-w", "promote"]))?;
        Ok(())
    }

    /// A new, empty schema on this server, reached through a connection string that names
    /// this server and then `standby`, with `target_session_attrs=read-write`: the nodes use
    /// whichever of the two is the primary, as after a failover.
    pub fn fresh_across(&self, standby: &TestPostgres) -> PostgresConfig {
        let mut config = self.fresh();
        let (Some(a), Some(b)) = (&self.control, &standby.control) else {
            return config;
        };
        let schema = config
            .url
            .split("search_path=")
            .nth(1)
            .map(|s| s.trim_end_matches('\'').to_string())
            .unwrap_or_default();
        config.url = format!(
            "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=postgres \
             target_session_attrs=read-write options='-c search_path={schema}'",
            a.port, b.port
        );
        config
    }

    /// Starts again, on the same port and data, a server [`TestPostgres::crash`] stopped.
    pub fn start_again(&self) -> Result<(), String> {
        let control = self
            .control
            .as_ref()
            .ok_or("not a server this process started")?;
        output(control.pg_ctl().arg("-l").arg(&control.log).args([
            "-w",
            "-t",
            "60",
            "-o",
            &control.options,
            "start",
        ]))?;
        Ok(())
    }
}

/// The tests' server, started on first use. Panics, saying what is missing, when none can be
/// started: a test that needs PostgreSQL fails rather than passes unseen.
pub fn test_postgres() -> &'static TestPostgres {
    match SERVER.get_or_init(|| start_env().unwrap_or_else(|| start_server(false))) {
        Ok(server) => server,
        Err(why) => panic!(
            "these tests need PostgreSQL (the server package: initdb and pg_ctl), and none could \
             be started: {why}"
        ),
    }
}

impl TestPostgres {
    /// The configuration of a new, empty schema of its own on the server (the backend creates
    /// its tables there).
    pub fn fresh(&self) -> PostgresConfig {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let schema = format!("t{}_{n}", std::process::id());
        self.execute(&format!("CREATE SCHEMA {schema}"));
        let url = if self.base.starts_with("postgres://") || self.base.starts_with("postgresql://")
        {
            let sep = if self.base.contains('?') { '&' } else { '?' };
            format!("{}{sep}options=-c%20search_path%3D{schema}", self.base)
        } else {
            format!("{} options='-c search_path={schema}'", self.base)
        };
        PostgresConfig {
            url,
            pool_size: 4,
            // The server accepts TLS and the default `sslmode` (prefer) uses it: every test
            // connects over TLS, verifying the server's certificate.
            ca_file: self
                .ca_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            ..PostgresConfig::default()
        }
    }

    /// The PEM file of the authority that signed the server's certificate, when the tests
    /// started the server (it then accepts TLS on 127.0.0.1); `None` with
    /// `POSTROOM_TEST_POSTGRES_URL`.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// The bytes the key-value table of the schema `config` names takes on disk, indexes and
    /// TOAST included (`pg_total_relation_size`).
    pub fn table_bytes(&self, config: &PostgresConfig) -> i64 {
        let schema = config
            .url
            .split("search_path")
            .nth(1)
            .map(|s| {
                let s = s
                    .strip_prefix('=')
                    .or_else(|| s.strip_prefix("%3D"))
                    .unwrap_or(s);
                s.trim_end_matches('\'').to_string()
            })
            .unwrap_or_default();
        let sql = format!("SELECT pg_total_relation_size('{schema}.postroom_kv')");
        self.query(&sql).parse().unwrap_or(-1)
    }

    /// Holds a transaction open with a snapshot for `hold`, on a connection of its own, as a
    /// long report or a stuck client would: VACUUM cannot remove a row version that snapshot
    /// may still see, anywhere in the database. The returned thread ends when it commits.
    pub fn hold_snapshot(&self, hold: std::time::Duration) -> std::thread::JoinHandle<()> {
        let base = self.base.clone();
        std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let Ok((client, connection)) =
                    tokio_postgres::connect(&base, tokio_postgres::NoTls).await
                else {
                    return;
                };
                tokio::spawn(connection);
                let _ = client
                    .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT txid_current()")
                    .await;
                tokio::time::sleep(hold).await;
                let _ = client.batch_execute("COMMIT").await;
            });
        })
    }

    /// The first column of the first row of `sql` on the server's `postgres` database, as
    /// text ("" when there is none).
    pub fn query(&self, sql: &str) -> String {
        let base = self.base.clone();
        let statement = sql.to_string();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let (client, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
                    .await
                    .ok()?;
                tokio::spawn(connection);
                let rows = client.simple_query(&statement).await.ok()?;
                rows.into_iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                    _ => None,
                })
            })
        })
        .join()
        .ok()
        .flatten()
        .unwrap_or_default()
    }

    /// Runs one statement on the server's `postgres` database (tests: terminate connections,
    /// inspect the schema).
    pub fn execute(&self, sql: &str) {
        let base = self.base.clone();
        let statement = sql.to_string();
        let result = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let (client, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                tokio::spawn(connection);
                client
                    .batch_execute(&statement)
                    .await
                    .map_err(|e| format!("{e:?}"))
            })
        })
        .join()
        .unwrap_or_else(|_| Err("the statement's thread panicked".into()));
        if let Err(e) = result {
            panic!("test postgres: {sql}: {e}");
        }
    }
}

/// The server `POSTROOM_TEST_POSTGRES_URL` names, if it is set.
fn start_env() -> Option<Result<TestPostgres, String>> {
    let base = std::env::var("POSTROOM_TEST_POSTGRES_URL").ok()?;
    Some(Ok(TestPostgres {
        base,
        next: AtomicU64::new(0),
        ca_file: None,
        control: None,
    }))
}

fn start_server(durable: bool) -> Result<TestPostgres, String> {
    let bin = bin_dir()?;
    let root = output(Command::new("id").arg("-u"))?.trim() == "0";
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("postroom-pg-{}-{nanos}", std::process::id()));
    prepare_dir(&dir, root)?;
    let data = dir.join("data");
    let as_server = |program: &Path| as_user(root, program);
    output(as_server(&bin.join("initdb")).arg("-D").arg(&data).args([
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--no-sync",
    ]))?;
    let (ca_file, cert, key) = certificates(&dir)?;
    if root {
        let uid: u32 = parse(&output(Command::new("id").args(["-u", "postgres"]))?)?;
        std::os::unix::fs::chown(&key, Some(uid), None)
            .map_err(|e| format!("chown {}: {e}", key.display()))?;
    }
    let socket = dir.display().to_string();
    // A free port: the kernel picks one for a listener that is closed at once.
    let port = free_port()?;
    let options = format!(
        "-k {socket} -p {port} -c listen_addresses=127.0.0.1 -c max_connections=200 \
         {} -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
        if durable {
            ""
        } else {
            "-c fsync=off -c full_page_writes=off"
        },
        cert.display(),
        key.display()
    );
    output(
        as_server(&bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(&options)
            .arg("start"),
    )?;
    watchdog(root, &bin.join("pg_ctl"), &data, &dir)?;
    Ok(TestPostgres {
        base: format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
        next: AtomicU64::new(0),
        ca_file: Some(ca_file),
        control: Some(Control {
            bin: bin.clone(),
            port,
            dir: dir.clone(),
            pg_ctl: bin.join("pg_ctl"),
            data,
            log: dir.join("log"),
            options,
            root,
        }),
    })
}

/// Makes `dir` (0700: only the server's user may enter it: its socket and keys are there, and
/// the server trusts every local connection), owned by `postgres` when this process is root.
fn prepare_dir(dir: &Path, root: bool) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
    if root {
        let uid: u32 = parse(&output(Command::new("id").args(["-u", "postgres"]))?)?;
        let gid: u32 = parse(&output(Command::new("id").args(["-g", "postgres"]))?)?;
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))
            .map_err(|e| format!("chown {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// A command running `program` as the server's user (`postgres` when this process is root:
/// initdb and the server refuse root).
fn as_user(root: bool, program: &Path) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A free port on 127.0.0.1: the kernel picks one for a listener that is closed at once.
fn free_port() -> Result<u16, String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port())
}

/// Stops the server and removes its folder once this process has gone (a test binary has no
/// hook that runs at its exit). The paths go in as arguments, never into the script's text.
fn watchdog(root: bool, pg_ctl: &Path, data: &Path, dir: &Path) -> Result<(), String> {
    let script = "while [ -d \"/proc/$1\" ]; do sleep 1; done; \"$2\" -D \"$3\" -m immediate stop; rm -rf \"$4\"";
    as_user(root, Path::new("sh"))
        .args(["-c", script, "watchdog"])
        .arg(std::process::id().to_string())
        .arg(pg_ctl)
        .arg(data)
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the server's watchdog: {e}"))?;
    Ok(())
}

/// A certificate authority and a server certificate for 127.0.0.1 signed by it, made with the
/// `openssl` command in `dir`: (the authority's PEM, the server's certificate, its key).
fn certificates(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf), String> {
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
         extendedKeyUsage=serverAuth\n",
    )
    .map_err(|e| format!("{}: {e}", ext.display()))?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    output(
        Command::new("openssl")
            .current_dir(dir)
            .args(["req", "-x509"])
            .args(ec)
            .args(["-keyout", "ca.key", "-out", "ca.crt", "-days", "3"])
            .args(["-subj", "/CN=Postroom test CA"]),
    )?;
    output(
        Command::new("openssl")
            .current_dir(dir)
            .arg("req")
            .args(ec)
            .args(["-keyout", "server.key", "-out", "server.csr"])
            .args(["-subj", "/CN=127.0.0.1"]),
    )?;
    output(Command::new("openssl").current_dir(dir).args([
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "3",
        "-extfile",
        "server.ext",
    ]))?;
    let key = dir.join("server.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", key.display()))?;
    Ok((dir.join("ca.crt"), dir.join("server.crt"), key))
}

fn bin_dir() -> Result<PathBuf, String> {
    if let Ok(dir) = std::env::var("POSTROOM_TEST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    if let Ok(out) = output(Command::new("pg_config").arg("--bindir")) {
        let dir = PathBuf::from(out.trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| format!("no PostgreSQL found (/usr/lib/postgresql: {e}); install the server package or set POSTROOM_TEST_PG_BIN"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| "no initdb under /usr/lib/postgresql/*/bin; install the server package or set POSTROOM_TEST_PG_BIN".into())
}

fn output(command: &mut Command) -> Result<String, String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{command:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{command:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn parse(s: &str) -> Result<u32, String> {
    s.trim().parse().map_err(|e| format!("{s:?}: {e}"))
}
