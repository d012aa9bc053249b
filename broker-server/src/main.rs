//! The `postroom` binary. The HTTP server (`postroom serve`) is the subject of its own issue and
//! is not built yet; until it is, this binary says so plainly instead of pretending to serve, and
//! the README points to the embedded quickstart.

fn main() -> std::process::ExitCode {
    eprintln!(
        "postroom {}: the HTTP server is not built yet.\n\
         Run the embedded broker instead: cargo run --release -p postroom-examples --bin quickstart",
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::from(2)
}
