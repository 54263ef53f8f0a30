//! `jarvis-run-coordinator`: parse the configuration, serve until SIGTERM or ctrl-c.

use anyhow::Context;
use clap::Parser;
use jarvis_run_coordinator::Server;
use jarvis_run_coordinator::config::{Args, Config};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
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

/// Resolves on the first SIGTERM or ctrl-c; a second one exits at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tracing::info!("shutting down; a second signal exits immediately");
    tokio::spawn(async {
        wait_for_signal().await;
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
