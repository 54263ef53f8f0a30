//! `jarvis-run-coordinator`: parse the configuration, serve until SIGTERM or ctrl-c.

use anyhow::Context;
use clap::Parser;
use jarvis_run_coordinator::Server;
use jarvis_run_coordinator::config::{Args, Config};
use tracing_subscriber::EnvFilter;

// Requests allocate and free many small buffers (HTTP, JSON, SQLite rows);
// mimalloc serves them faster than glibc's allocator under sustained load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            EnvFilter::try_from_env("LOG_LEVEL").or_else(|_| EnvFilter::try_new("info"))?,
        )
        .init();
    let config = Config::from_args(Args::parse())?;
    let db = config.db_path.clone();
    let server = Server::bind(config)
        .await
        .context("starting the run coordinator")?;
    tracing::info!(addr = %server.addr, db = %db.display(), "run coordinator listening");
    server.serve(shutdown_signal()).await?;
    Ok(())
}

/// Open requests (event streams follow runs for as long as they last) get this long to finish.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Resolves on the first SIGTERM or ctrl-c; a second one, or the drain limit, exits at once.
/// Nothing is lost by exiting: every acknowledged change is already committed.
async fn shutdown_signal() {
    wait_for_signal().await;
    tracing::info!("shutting down; a second signal exits immediately");
    tokio::spawn(async {
        tokio::select! {
            _ = wait_for_signal() => {}
            _ = tokio::time::sleep(DRAIN_LIMIT) => tracing::warn!("drain limit reached; exiting"),
        }
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
