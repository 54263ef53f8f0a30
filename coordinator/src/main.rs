//! `jarvis-run-coordinator`: parse the configuration, serve until SIGTERM or ctrl-c.

use anyhow::Context;
use clap::Parser;
use jarvis_run_coordinator::Server;
use jarvis_run_coordinator::config::{Args, Config, LocalPolicy};
use tracing_subscriber::EnvFilter;

// Requests allocate and free many small buffers (HTTP, JSON, SQLite rows);
// mimalloc serves them faster than glibc's allocator under sustained load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            EnvFilter::try_new(&args.log_level)
                .with_context(|| format!("--log-level / LOG_LEVEL `{}`", args.log_level))?,
        )
        .init();
    let config = Config::from_args(args)?;
    let server = Server::bind(config)
        .await
        .context("starting the run coordinator")?;
    log_startup(&server);
    server.serve(shutdown_signal()).await?;
    Ok(())
}

/// One line naming every service and file this coordinator uses, so a misconfigured
/// deployment shows at start rather than at the first run.
fn log_startup(server: &Server) {
    let config = &server.coordinator.config;
    let or_none = |url: &Option<String>| url.clone().unwrap_or_else(|| "none".to_owned());
    let atomic_executors = if config.atomic_executor_urls.is_empty() {
        "none".to_owned()
    } else {
        config.atomic_executor_urls.join(",")
    };
    let pdp = match (&config.pdp_url, &config.policy) {
        (Some(url), _) => url.clone(),
        (None, LocalPolicy::AllowAll) => "none (dev-allow: every decision allows)".to_owned(),
        (None, LocalPolicy::DenyAll) => "none (every decision denies)".to_owned(),
    };
    tracing::info!(
        addr = %server.addr,
        database = %config.database.describe(),
        atomic_executors = %atomic_executors,
        composite_executor = %or_none(&config.composite_executor_url),
        node_registry = %or_none(&config.node_registry_url),
        pdp = %pdp,
        auth = ?config.auth.mode,
        outbound_auth = config.outbound.is_enabled(),
        "run coordinator listening"
    );
    if let Some(atomic) = &server.coordinator.atomic {
        tracing::info!(
            count = atomic.urls().len(),
            executors = %atomic.urls().join(", "),
            probe_interval = ?config.timing.probing.interval,
            "atomic executors: NodeRuns go to those listing their node type, the least busy first"
        );
    }
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
