//! The JARVIS atomic executor: an ARP spec/v1 Atomic Executor whose nodes are
//! WebAssembly components ("node packs") loaded from a directory, each
//! execution in a fresh sandbox with time and memory limits.
//!
//! # Layout
//! - [`config`]: command line and environment, validated into one `Config`.
//! - [`world`]: bindings generated from `wit/node-pack.wit` (the only `bindgen!`).
//! - [`runtime`]: wasmtime engine, linker and limits built once, the epoch
//!   ticker, the guests' own runtime, and the sandbox every call runs in.
//! - [`packs`]: what a pack declares, read within bounds and checked (`spec`),
//!   and what it needs granted, checked against the grants (`needs`);
//!   the registry of loaded packs by source (`registry`), the node index
//!   built from them (`index`), the packs directory watcher (`watch`) and
//!   the inspection of pack files as the registry would load them
//!   (`inspect`, which `jarvis-pack list|inspect|check` uses).
//! - [`grants`]: host interfaces granted to packs, one module each (log,
//!   clock, random, timer, config), and the operator's grants file.
//! - [`executor`]: admission, sandboxed execution, limits, cancel, retries,
//!   and the one type every failed or canceled outcome is a variant of.
//! - [`metrics`]: Prometheus metric names, help texts and label bounds.
//! - [`api`]: the HTTP API and its ARP error envelopes.
//! - [`watpack`]: packs written as WAT (the built-in echo, test guests).

pub mod api;
pub mod config;
pub mod executor;
pub mod grants;
pub mod metrics;
pub mod packs;
pub mod runtime;
pub mod watpack;
pub mod world;

/// The registry's former path, kept for the executor's imports.
pub use packs::registry;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::Config;
use crate::executor::Executor;
use crate::metrics::Metrics;
use crate::packs::registry::{BUILTIN_SOURCE, PackRegistry};
use crate::packs::watch::PackWatcher;
use crate::runtime::{EpochTicker, GuestRuntime};

/// Instances beyond the concurrency cap, for `describe` calls while loading.
const SPARE_INSTANCES: u32 = 16;

/// A ready executor: registry with the built-ins, the packs directory loading
/// and watched in the background, the runtime its guests run on and the
/// epoch ticker that stops them.
#[derive(Debug)]
pub struct Service {
    pub executor: Arc<Executor>,
    auth: jarvis_auth::Authenticator,
    /// Stopped when the service is dropped or shut down.
    watcher: Option<PackWatcher>,
    // Dropped before the ticker, so guests still running are stopped while
    // epochs still advance.
    _guests: GuestRuntime,
    _ticker: EpochTicker,
}

impl Service {
    /// Builds the engine and registry, registers the built-in echo and starts
    /// loading and watching the packs directory. Must run inside a tokio
    /// runtime.
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        let mut auth = config.auth.clone();
        if !config.metrics_require_auth && !auth.exempt_paths.iter().any(|p| p == api::METRICS_PATH)
        {
            auth.exempt_paths.push(api::METRICS_PATH.to_owned());
        }
        let auth = jarvis_auth::Authenticator::new(auth)
            .map_err(|e| anyhow::anyhow!("authentication: {e}"))?;
        let metrics = Arc::new(Metrics::new());
        let mut limits = config.runtime.clone();
        limits.max_instances = limits.max_instances.saturating_add(SPARE_INSTANCES);
        let engine = runtime::build_engine(&limits, config.compile_cache_dir.as_deref())?;
        let ticker = EpochTicker::start(engine.clone());
        let registry = Arc::new(PackRegistry::new(
            engine,
            limits,
            config.pack_limits.clone(),
            config.grants.clone(),
            metrics.clone(),
        )?);
        let builtin = wasmtime_wat(&watpack::builtin_echo_wat())?;
        registry
            .load_bytes(BUILTIN_SOURCE, &builtin)
            .await
            .map_err(|e| anyhow::anyhow!("the built-in echo pack failed to load: {e}"))?;
        let watcher = config
            .packs_dir
            .as_ref()
            .map(|dir| PackWatcher::start(registry.clone(), dir.clone(), config.watch.clone()));
        let guests = GuestRuntime::start(config.guest_threads)
            .map_err(|e| anyhow::anyhow!("starting the guest runtime: {e}"))?;
        let executor = Arc::new(Executor::new(
            registry,
            config.executor.clone(),
            guests.guests().clone(),
            metrics,
        ));
        Ok(Self {
            executor,
            auth,
            watcher,
            _guests: guests,
            _ticker: ticker,
        })
    }

    /// Stops watching the packs directory and waits for the watcher to end.
    pub async fn shutdown(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            watcher.shutdown().await;
        }
    }

    /// The HTTP API behind the authentication layer.
    ///
    /// The layer wraps the whole router rather than each route
    /// (`Router::layer`): the same requests pass through it, fallbacks
    /// included, without a second boxed service to clone on every request.
    pub fn app(&self) -> App {
        tower::Layer::layer(&self.auth.layer(), api::router(self.executor.clone()))
    }
}

/// The service's HTTP application: the API router behind authentication.
pub type App = jarvis_auth::AuthService<axum::Router>;

/// Serves `app` on `listener` until `shutdown` completes (then drains).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::ServiceExt as _;
    use axum::serve::ListenerExt as _;
    // Without TCP_NODELAY a response's last small write waits for the client's
    // delayed ACK (~40 ms on Linux) whenever an earlier write is unacknowledged.
    let listener = listener.tap_io(|stream| {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "TCP_NODELAY not set on an accepted connection");
        }
    });
    axum::serve(listener, app.into_make_service())
        .with_graceful_shutdown(shutdown)
        .await
}

/// Turns WAT text into wasm bytes.
pub fn wasmtime_wat(text: &str) -> anyhow::Result<Vec<u8>> {
    Ok(wat::parse_str(text)?)
}

/// A service listening on a real socket, for tests and embedding.
#[derive(Debug)]
pub struct RunningServer {
    pub addr: SocketAddr,
    pub service: Service,
    handle: tokio::task::JoinHandle<()>,
}

impl RunningServer {
    /// Starts a server for `config` on `config.host:config.port` (port 0 for any).
    pub async fn spawn(config: &Config) -> anyhow::Result<Self> {
        let service = Service::start(config).await?;
        let listener = tokio::net::TcpListener::bind((config.host, config.port)).await?;
        let addr = listener.local_addr()?;
        let app = service.app();
        let handle = tokio::spawn(async move {
            let _ = serve(listener, app, std::future::pending()).await;
        });
        Ok(Self {
            addr,
            service,
            handle,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.handle.abort();
    }
}
