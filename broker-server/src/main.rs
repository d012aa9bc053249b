//! The `postroom` binary: `postroom serve` runs the broker's HTTP server; every other
//! subcommand is a client of a running server (see `broker_server::cli`).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use broker_server::cli::{ClientCommand, GlobalArgs};
use broker_server::config::Backend;
use broker_server::{serve, shutdown_signal, ServerConfig};
use clap::{Parser, Subcommand};

/// mimalloc rather than glibc's malloc: a publish allocates on a request worker and frees on
/// the writer thread (and the other way round), which glibc serialises on its arena locks; see
/// ARCHITECTURE.md for the measurement.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "postroom",
    version,
    about = "Postroom, a durable Pub/Sub broker"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the HTTP server. With no options: data in ./data, listening on 127.0.0.1:8080.
    Serve {
        /// A TOML configuration file; `POSTROOM_*` environment variables override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The address to listen on (overrides the file and the environment).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// The data folder (overrides the file and the environment).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Turns authentication off: every caller acts as the local administrator. Refused
        /// unless the server listens on a loopback address (127.0.0.0/8 or ::1).
        #[arg(long)]
        insecure_no_auth: bool,
        /// Starts even when other users of the host can read or write the data folder, which
        /// holds the token signing keys (by default such a folder is refused).
        #[arg(long)]
        allow_open_data_dir: bool,
    },
    /// Creates or upgrades the PostgreSQL schema (`storage.backend = "postgres"`); with
    /// `--check`, only lists the steps it would apply and exits 1 when there are any. The
    /// server applies them itself at start, under a lock; this is for deploy pipelines that
    /// migrate first. The redb backend upgrades its file when it opens: nothing to do here.
    Migrate {
        /// A TOML configuration file; `POSTROOM_*` environment variables override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Only say what would change.
        #[arg(long)]
        check: bool,
    },
    /// Copies an embedded broker's data (its `postroom.redb`: Rooms, event types, events,
    /// subscriptions with their positions, dead letters, identities, signing keys, audit log)
    /// into an empty PostgreSQL schema, then reads both back to compare them. Stop the
    /// embedded broker first; start the nodes on PostgreSQL once this reports success.
    MigrateData {
        /// A TOML configuration file; `POSTROOM_*` environment variables override it. Its
        /// `[storage.postgres]` settings (TLS authority, timeouts) apply to the target.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The embedded broker's data folder (or its `postroom.redb` file).
        #[arg(long)]
        from: PathBuf,
        /// The target's connection URL (default: `storage.postgres.url`).
        #[arg(long)]
        to: Option<String>,
    },
    #[command(flatten)]
    Client(ClientCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
            insecure_no_auth,
            allow_open_data_dir,
        } => run_server(ServeArgs {
            config,
            listen,
            data_dir,
            insecure_no_auth,
            allow_open_data_dir,
        }),
        Command::Migrate { config, check } => migrate(config, check),
        Command::MigrateData { config, from, to } => migrate_data(config, from, to),
        Command::Client(command) => broker_server::cli::run(cli.global, command),
    }
}

/// `postroom migrate [--check]`.
fn migrate(config: Option<PathBuf>, check: bool) -> ExitCode {
    let cfg = match ServerConfig::load(config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("postroom: {e}");
            return ExitCode::FAILURE;
        }
    };
    if cfg.storage.backend != Backend::Postgres {
        println!(
            "storage.backend is redb: its file is upgraded when the server opens it; nothing to \
             migrate"
        );
        return ExitCode::SUCCESS;
    }
    let pg = &cfg.storage.postgres;
    let result = if check {
        broker_core::pending_migrations(pg)
    } else {
        broker_core::apply_migrations(pg)
    };
    match result {
        Ok(steps) if steps.is_empty() => {
            println!("{}: the schema is up to date", pg.describe());
            ExitCode::SUCCESS
        }
        Ok(steps) => {
            let verb = if check { "would apply" } else { "applied" };
            println!("{}: {verb}:", pg.describe());
            for step in &steps {
                println!("  {} {}", step.version, step.name);
            }
            if check {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("postroom: {}: {e}", pg.describe());
            ExitCode::from(2)
        }
    }
}

/// `postroom migrate-data --from <data folder> [--to <url>]`: exit 0 when copied and
/// compared, 1 otherwise.
fn migrate_data(config: Option<PathBuf>, from: PathBuf, to: Option<String>) -> ExitCode {
    let cfg = match ServerConfig::load(config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("postroom: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut pg = cfg.storage.postgres.clone();
    if let Some(url) = to {
        pg.url = url;
    }
    if pg.url.trim().is_empty() {
        eprintln!(
            "postroom: migrate-data needs a target: --to postgres://... or storage.postgres.url"
        );
        return ExitCode::FAILURE;
    }
    let file = if from.is_dir() {
        from.join("postroom.redb")
    } else {
        from
    };
    println!("copying {} into {}", file.display(), pg.describe());
    match broker_core::copy_embedded_to_postgres(&file, &pg) {
        Ok(report) => {
            for (space, rows, bytes) in &report.spaces {
                println!("  {space:<22} {rows:>10} rows {bytes:>14} bytes");
            }
            println!(
                "copied and compared {} rows; the nodes may start on {}",
                report.rows(),
                pg.describe()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("postroom: migrate-data: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The options of `postroom serve`.
struct ServeArgs {
    config: Option<PathBuf>,
    listen: Option<std::net::SocketAddr>,
    data_dir: Option<PathBuf>,
    insecure_no_auth: bool,
    allow_open_data_dir: bool,
}

fn run_server(args: ServeArgs) -> ExitCode {
    let ServeArgs {
        config,
        listen,
        data_dir,
        insecure_no_auth,
        allow_open_data_dir,
    } = args;
    // Only the server logs: the client subcommands' output is for the person at the terminal.
    // `POSTROOM_LOG_FORMAT=json` gives one JSON object per line for log collectors; the
    // default is text for people.
    let directives = std::env::var("POSTROOM_LOG").unwrap_or_else(|_| "info".into());
    let json = std::env::var("POSTROOM_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    if let Err(e) = broker_server::logging::init(&directives, json) {
        eprintln!("postroom: {e} (POSTROOM_LOG={directives})");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("postroom: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let mut cfg = ServerConfig::load(config.as_deref(), std::env::vars())?;
        if let Some(l) = listen {
            cfg.listen = l;
        }
        if let Some(d) = data_dir {
            cfg.data_dir = d;
        }
        // The first administrator's credentials, used only when the data has none yet.
        if let Ok(id) = std::env::var("POSTROOM_ADMIN_CLIENT_ID") {
            cfg.auth.admin_client_id = Some(id);
        }
        if let Ok(secret) = std::env::var("POSTROOM_ADMIN_CLIENT_SECRET") {
            cfg.auth.admin_client_secret = Some(secret);
        }
        // The flag can only turn the setting on: a file or variable that turned it on is not
        // silently undone by leaving the flag out.
        if insecure_no_auth {
            cfg.auth.insecure_no_auth = true;
        }
        if allow_open_data_dir {
            cfg.allow_open_data_dir = true;
        }
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| broker_server::StartError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(broker_server::StartError::Serve)?;
        // `serve` checks these too (the configuration, and that the data folder is private);
        // checking before the line below keeps a server that is about to refuse to start from
        // announcing that it listens.
        cfg.validate(addr)?;
        if cfg.storage.backend == Backend::Redb {
            broker_server::data_dir::prepare(&cfg)?;
        }
        let scheme = if cfg.tls.is_enabled() {
            "https"
        } else {
            "http"
        };
        // Signal handlers first, so that a SIGTERM from now on means a graceful shutdown.
        let shutdown = shutdown_signal();
        // Printed on stdout so that scripts (and tests) can find the port when it was 0.
        let data = match cfg.storage.backend {
            Backend::Redb => cfg.data_dir.display().to_string(),
            Backend::Postgres => cfg.storage.postgres.describe(),
        };
        println!("postroom listening on {scheme}://{addr} with data in {data}");
        if cfg.auth.insecure_no_auth {
            tracing::warn!(
                "authentication is off (--insecure-no-auth): every caller is the administrator"
            );
        }
        serve(listener, cfg, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postroom: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own consistency checks: among them, that no subcommand's option shares a name
    /// with a global one, which once made `admin clients create --client-id` log in as the new
    /// client.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
