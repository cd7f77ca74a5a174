//! The `pooled` binary: parses the command line, runs a subcommand, and turns any failure into
//! one line on stderr and a non-zero exit.

use clap::Parser;
use pooled::app::App;
use pooled::config::{Cli, Command, DatabaseArgs, ServeArgs};
use pooled::store::Store;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    pooled::telemetry::init();
    let result = match cli.command.unwrap_or(Command::Serve(Box::new(cli.serve))) {
        Command::Serve(args) => serve(*args).await,
        Command::Migrate(args) => migrate(args).await,
        Command::Bench(args) => pooled::bench::run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` keeps the whole cause chain on one line.
            eprintln!("pooled: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let settings = args.into_settings()?;
    let database = settings.database.redacted();
    let clock = settings.clock.as_str();
    let app = App::build(settings).await?;
    println!(
        "pooled {} listening on http://{} (database {database}, clock {clock})",
        env!("CARGO_PKG_VERSION"),
        app.addr
    );
    if let Some(token) = &app.generated_admin_token {
        println!(
            "admin token (generated for this run; set POOLED_ADMIN_TOKEN to keep one): {token}"
        );
    }
    app.run_until_stopped(shutdown_signal()).await
}

async fn migrate(args: DatabaseArgs) -> anyhow::Result<()> {
    let url = args.database_url()?;
    let store = Store::connect(&url).await?;
    store.migrate().await?;
    store.close().await;
    println!("{} is migrated", url.redacted());
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
