//! `jarvis-atomic-executor`: serves the ARP Atomic Executor API over HTTP.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use jarvis_atomic_executor::Service;
use jarvis_atomic_executor::config::Args;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

// Every request allocates and frees a few dozen small buffers on its way
// through HTTP, the sandbox and JSON; mimalloc serves them faster than glibc's
// allocator and does not fragment under sustained load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Log lines waiting for the writer thread before new ones are dropped.
const LOG_BUFFER_LINES: usize = 64 * 1024;

/// Bytes of log lines the writer thread gathers before it writes them out.
const LOG_WRITE_BUFFER: usize = 64 * 1024;

fn main() -> ExitCode {
    // LOG_LEVEL is what the Python services read; RUST_LOG wins when set.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(
            std::env::var("LOG_LEVEL")
                .unwrap_or_else(|_| "info".into())
                .to_lowercase(),
        )
    });
    let json = match std::env::var("LOG_FORMAT").as_deref() {
        Err(std::env::VarError::NotPresent) | Ok("text") => false,
        Ok("json") => true,
        Ok(other) => {
            eprintln!("jarvis-atomic-executor: LOG_FORMAT must be `text` or `json`, got {other:?}");
            return ExitCode::from(2);
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            eprintln!("jarvis-atomic-executor: LOG_FORMAT must be `text` or `json`");
            return ExitCode::from(2);
        }
    };
    // Guest text is escaped for the text format and left as data for JSON.
    jarvis_atomic_executor::grants::log::set_json_format(json);
    // Lines are written by a thread of their own, so a slow reader of stdout
    // (a full pipe) never blocks a request thread; past the buffer, lines are
    // dropped rather than waited for. The guard flushes what is left at exit.
    // The writer thread takes every line waiting, then flushes: through a
    // buffer, a burst of lines is fewer writes than one per line (1,000 calls
    // timing out together: ~190 instead of ~960), and no line waits once the
    // burst ends.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .lossy(true)
        .thread_name("log-writer")
        .finish(std::io::BufWriter::with_capacity(
            LOG_WRITE_BUFFER,
            std::io::stdout(),
        ));
    let _ = LOG_FLUSH.set(std::sync::Mutex::new(Some(guard)));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if json {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::stdout().is_terminal()).init();
    }

    let config = match Args::parse().validate() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("jarvis-atomic-executor: {message}");
            return ExitCode::from(2);
        }
    };
    if !config.transparent_huge_pages
        && let Err(e) = jarvis_atomic_executor::runtime::disable_transparent_huge_pages()
    {
        tracing::warn!(error = %e, "cannot turn transparent huge pages off");
    }
    // The API's threads keep the ordinary policy: a request that arrives
    // may preempt a guest on its core without waiting for the scheduler's
    // tick (see `runtime::handoff` for how results still cross in batches).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jarvis-atomic-executor: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jarvis-atomic-executor: {e:#}");
            ExitCode::FAILURE
        }
    };
    flush_logs();
    code
}

/// The log writer's guard: dropping it writes out the lines still buffered.
static LOG_FLUSH: std::sync::OnceLock<std::sync::Mutex<Option<WorkerGuard>>> =
    std::sync::OnceLock::new();

/// Writes out the buffered log lines; call before the process ends.
fn flush_logs() {
    if let Some(guard) = LOG_FLUSH.get() {
        drop(guard.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

async fn serve(config: jarvis_atomic_executor::config::Config) -> anyhow::Result<()> {
    let mut service = Service::start(&config).await?;
    let listener = tokio::net::TcpListener::bind((config.host, config.port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", config.host, config.port))?;
    tracing::info!(addr = %listener.local_addr()?, "jarvis-atomic-executor listening");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let grace = config.shutdown_grace;
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!(
            grace_secs = grace.as_secs(),
            "shutting down: no new connections, draining requests"
        );
        let _ = stop_tx.send(());
        // A second signal, or the grace period running out, ends the process.
        tokio::select! {
            _ = shutdown_signal() => tracing::warn!("second signal: exiting now"),
            _ = tokio::time::sleep(grace) => tracing::warn!("grace period over: exiting with requests in flight"),
        }
        flush_logs();
        std::process::exit(1);
    });
    jarvis_atomic_executor::serve(listener, service.app(), async {
        let _ = stop_rx.await;
    })
    .await?;
    service.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
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
    let _ = ctrl_c.await;
}
