//! The JARVIS Run Coordinator: the ARP spec/v1 Run Coordinator, durable in an
//! embedded SQLite file or in PostgreSQL shared by several coordinators.
//!
//! Every API call changes Runs, NodeRuns and RunEvents in one transaction, so a
//! run's event `seq` is gapless and a crash loses nothing that was acknowledged.
//! NodeRuns are dispatched through a durable, leased queue to one of several
//! Atomic Executors (with retries on transient failures, under the same
//! `node_run_id`) or a Composite Executor, which calls back to create children
//! and complete its NodeRun.
//!
//! # Layout
//! - [`config`]: command line and environment, validated into one `Config`.
//! - [`api`]: the HTTP routes of `run-coordinator.openapi.yaml`; `api::error` maps
//!   `RunError` to a status and an ARP `ErrorEnvelope` in one place.
//! - [`coordinator`]: the operations (start, create children, complete, cancel).
//! - [`constraints`]: merging constraint envelopes into the strictest one.
//! - [`dispatch`]: the dispatch queue (begin, atomic, composite, retry, poller),
//!   deadlines and crash recovery.
//! - [`events`]: who follows which run, and NDJSON event streams that follow it live.
//! - [`store`]: the store interface (reads, write transactions, commit effects);
//!   `store::sqlite` and `store::postgres` implement it, each with a group-committing
//!   writer thread (`store::writer`).
//! - [`catalog`]: node kind resolution (registry, executors, prefix).
//! - [`policy`]: PDP calls and the local deny/`dev-allow` fallback.
//! - [`executors`]: several atomic executors: listings, health, routing, failover.
//! - [`clients`]: HTTP clients of the other services, failures classified.
//! - [`runs`]: domain rules of Runs and NodeRuns; `runs::error::RunError` with stable codes.

pub mod api;
pub mod catalog;
pub mod clients;
pub mod config;
pub mod constraints;
pub mod coordinator;
pub mod dispatch;
pub mod events;
pub mod executors;
pub mod policy;
pub mod runs;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;

use jarvis_auth::TargetService;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::catalog::NodeCatalog;
use crate::clients::{CompositeExecutorClient, Http, NodeRegistryClient, PdpClient};
use crate::config::{Config, Database};
use crate::coordinator::Coordinator;
use crate::executors::AtomicExecutors;
use crate::policy::Policy;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{CommitEffects, EffectSink, Store};

/// A coordinator serving on a bound address.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    pub coordinator: Arc<Coordinator>,
    listener: TcpListener,
    auth: jarvis_auth::Authenticator,
    background: dispatch::Background,
}

impl Server {
    /// Opens the store, binds `config.listen` and starts the dispatcher.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(&config.listen).await?;
        let addr = listener.local_addr()?;
        let watchers = Arc::new(events::RunWatchers::default());
        let (dispatch_tx, dispatch_rx) = mpsc::unbounded_channel();
        let (cancel_tx, cancel_rx) = mpsc::unbounded_channel();
        let sink_watchers = watchers.clone();
        let sink: EffectSink = Box::new(move |effects: CommitEffects| {
            for run_id in &effects.changed_runs {
                sink_watchers.notify(run_id);
            }
            for node_run_id in effects.dispatch {
                let _ = dispatch_tx.send(node_run_id);
            }
            for cancel in effects.executor_cancels {
                let _ = cancel_tx.send(cancel);
            }
        });
        let lease_owner: Arc<str> = coordinator::new_id("coordinator").into();
        let store = match &config.database {
            Database::Sqlite(path) => {
                Store::new(Arc::new(SqliteStore::open(path, config.durability, sink)?))
            }
            Database::Postgres(url) => Store::new(Arc::new(
                PgStore::open(url, config.durability, &lease_owner, sink).await?,
            )),
        };
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        let outbound = |target| Http::new(http.clone(), config.outbound.clone(), target);
        let auth = jarvis_auth::Authenticator::new(config.auth.clone())?;
        let atomic = (!config.atomic_executor_urls.is_empty()).then(|| {
            Arc::new(AtomicExecutors::new(
                &config.atomic_executor_urls,
                &outbound(TargetService::AtomicExecutor),
                config.timing.probing,
            ))
        });
        let composite = config
            .composite_executor_url
            .clone()
            .map(|u| CompositeExecutorClient::new(u, outbound(TargetService::CompositeExecutor)));
        let registry = config
            .node_registry_url
            .clone()
            .map(|u| NodeRegistryClient::new(u, outbound(TargetService::NodeRegistry)));
        let pdp = config
            .pdp_url
            .clone()
            .map(|u| PdpClient::new(u, outbound(TargetService::Pdp)));
        let coordinator = Arc::new(Coordinator {
            store,
            catalog: NodeCatalog::new(registry, atomic.clone(), composite.clone()),
            policy: Policy {
                pdp,
                local: config.policy,
            },
            public_url: config.public_url_or(addr),
            atomic,
            composite,
            watchers,
            lease_owner,
            config,
        });
        let background = dispatch::spawn(coordinator.clone(), dispatch_rx, cancel_rx);
        Ok(Self {
            addr,
            coordinator,
            listener,
            auth,
            background,
        })
    }

    /// Serves until `shutdown` resolves, then stops the dispatcher's background loops
    /// and the executors' probes.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        use axum::serve::ListenerExt as _;
        // The event streams write one small chunk per event: without
        // TCP_NODELAY each waits for the client's delayed ACK (~40 ms).
        let listener = self.listener.tap_io(|stream| {
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(error = %err, "TCP_NODELAY not set on an accepted connection");
            }
        });
        let coordinator = self.coordinator.clone();
        let served = axum::serve(
            listener,
            api::router(self.coordinator).layer(self.auth.layer()),
        )
        .with_graceful_shutdown(shutdown)
        .await;
        self.background.stop().await;
        if let Some(atomic) = &coordinator.atomic {
            atomic.shutdown().await;
        }
        coordinator.store.close().await;
        served
    }
}
