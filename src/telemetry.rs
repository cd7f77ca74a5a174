//! Logging: `tracing` to stdout, filtered by `RUST_LOG` (default `info`). Errors that end the
//! process go to stderr from `main`, as one line.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    // Ignored if a subscriber is already set (tests build several services in one process).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .try_init();
}
