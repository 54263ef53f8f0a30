//! Node kind and node-type constraints: the Node Registry, else the executors' own catalogs, else the id prefix.
//!
//! Answers are cached and refreshed in the background, one fetch per source at a
//! time: a lookup never makes a call itself and no lock is held while a fetch runs,
//! so a hung executor or registry delays no caller by more than the wait it chose.
//! A stale answer is served while its refresh runs; a lookup that finds nothing
//! may wait a short while for a fetch in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arp_types::{ConstraintEnvelope, NodeKind, NodeType, NodeTypeRef};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::clients::{CallError, CompositeExecutorClient, NodeRegistryClient};
use crate::executors::AtomicExecutors;

/// How long a fetched node type (or executor listing) is trusted.
pub(crate) const TTL: Duration = Duration::from_secs(30);
/// A source is asked again at most this often: after a failed fetch, or when a
/// node type it did not list is looked up (unknown ids must not cause a storm).
pub(crate) const MISS_REFETCH: Duration = Duration::from_secs(1);
/// How long [`NodeCatalog::lookup`] waits for a fetch in flight that may know the type.
pub const LOOKUP_WAIT: Duration = Duration::from_secs(1);
/// Registry answers kept; clients choose the ids, so the cache is bounded.
const REGISTRY_ENTRIES_MAX: usize = 4096;

/// What the coordinator needs to know about a node type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeTypeInfo {
    /// `None` when no source knows the type and its id has no `atomic.`/`composite.` prefix.
    pub kind: Option<NodeKind>,
    pub constraints: Option<ConstraintEnvelope>,
    /// A source could not be reached (or has not answered yet): an unknown kind may become known later.
    pub sources_unreachable: bool,
}

/// Node types by id, each with the versions listed.
pub(crate) type Listing = HashMap<String, Vec<NodeType>>;

#[derive(Debug)]
pub struct NodeCatalog {
    shared: Arc<Shared>,
    /// Fetches in flight. They only read, so dropping the catalog may abort them.
    fetches: Mutex<JoinSet<()>>,
}

#[derive(Debug)]
struct Shared {
    registry: Option<NodeRegistryClient>,
    /// The atomic executors keep their own listings (they route NodeRuns by them);
    /// the catalog reads their union.
    atomic: Option<Arc<AtomicExecutors>>,
    composite: Option<CompositeExecutorClient>,
    /// Held only to read or record answers, never across a fetch.
    state: Mutex<State>,
    /// Bumped after every fetch ends, for lookups waiting on one.
    fetched: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct State {
    /// By (id, version); `Some(None)` when the registry does not know the type.
    registry: HashMap<(String, String), Cached<Option<NodeTypeInfo>>>,
    /// The composite executor's listing, apart from the atomic ones so that one
    /// that hangs delays nothing the other lists.
    composite_listing: Cached<Listing>,
}

/// One source's answer and the single fetch that may replace it.
#[derive(Debug)]
pub(crate) struct Cached<T> {
    pub(crate) value: Option<T>,
    /// When the last successful fetch ended.
    pub(crate) fetched_at: Option<Instant>,
    started_at: Option<Instant>,
    pub(crate) in_flight: bool,
    /// The last fetch could not reach the source.
    pub(crate) unreachable: bool,
}

impl<T> Default for Cached<T> {
    fn default() -> Self {
        Self {
            value: None,
            fetched_at: None,
            started_at: None,
            in_flight: false,
            unreachable: false,
        }
    }
}

impl<T> Cached<T> {
    /// Claims the one fetch allowed if the answer is older than `max_age`, none is in
    /// flight and none started within [`MISS_REFETCH`]; the caller then starts it.
    pub(crate) fn claim(&mut self, max_age: Duration) -> bool {
        let due = !self.in_flight
            && self.fetched_at.is_none_or(|t| t.elapsed() >= max_age)
            && self.started_at.is_none_or(|t| t.elapsed() >= MISS_REFETCH);
        if due {
            self.in_flight = true;
            self.started_at = Some(Instant::now());
        }
        due
    }

    /// No answer yet, but a fetch that may bring one is in flight.
    pub(crate) fn first_answer_pending(&self) -> bool {
        self.value.is_none() && self.in_flight
    }
}

/// The fetches a lookup found due.
#[derive(Debug, Default)]
struct Due {
    registry: Option<(String, String)>,
    composite_listing: bool,
}

impl NodeCatalog {
    pub fn new(
        registry: Option<NodeRegistryClient>,
        atomic: Option<Arc<AtomicExecutors>>,
        composite: Option<CompositeExecutorClient>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                registry,
                atomic,
                composite,
                state: Mutex::default(),
                fetched: watch::channel(0).0,
            }),
            fetches: Mutex::default(),
        }
    }

    /// What is known about the type, waiting at most [`LOOKUP_WAIT`] for a fetch in flight.
    pub async fn lookup(&self, node_type_ref: &NodeTypeRef) -> NodeTypeInfo {
        self.lookup_within(node_type_ref, LOOKUP_WAIT).await
    }

    /// What is known about the type right now (stale answers included); starts
    /// any refresh that is due in the background. For paths that must not wait
    /// on another service, such as starting a run.
    pub fn lookup_cached(&self, node_type_ref: &NodeTypeRef) -> NodeTypeInfo {
        self.check(node_type_ref).0
    }

    /// What is known about the type, waiting at most `wait` for fetches in flight.
    pub async fn lookup_within(&self, node_type_ref: &NodeTypeRef, wait: Duration) -> NodeTypeInfo {
        let deadline = tokio::time::Instant::now() + wait;
        // Subscribed before checking, so a fetch that ends in between still wakes us.
        let mut fetched = self.shared.fetched.subscribe();
        let mut atomic_fetched = self.shared.atomic.as_ref().map(|a| a.subscribe());
        loop {
            let (best, pending) = self.check(node_type_ref);
            if !pending {
                return best;
            }
            let changed = async {
                match &mut atomic_fetched {
                    Some(atomic) => tokio::select! {
                        _ = fetched.changed() => {}
                        _ = atomic.changed() => {}
                    },
                    None => {
                        let _ = fetched.changed().await;
                    }
                }
            };
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return best;
            }
        }
    }

    /// The best answer now, and whether a fetch in flight may still improve it.
    /// Starts the fetches that are due.
    fn check(&self, r: &NodeTypeRef) -> (NodeTypeInfo, bool) {
        let mut due = Due::default();
        let answer = self.shared.check(r, &mut due);
        if let Some(key) = due.registry {
            self.spawn(self.shared.clone().fetch_registry(key));
        }
        if due.composite_listing {
            self.spawn(self.shared.clone().fetch_composite_listing());
        }
        answer
    }

    fn spawn(&self, fetch: impl Future<Output = ()> + Send + 'static) {
        let mut fetches = self.fetches.lock().unwrap();
        while fetches.try_join_next().is_some() {}
        fetches.spawn(fetch);
    }
}

impl Shared {
    fn check(&self, r: &NodeTypeRef, due: &mut Due) -> (NodeTypeInfo, bool) {
        let mut state = self.state.lock().unwrap();
        let mut pending = false;
        let mut unreachable = false;
        if self.registry.is_some() {
            let key = (r.node_type_id.clone(), r.version.clone());
            if state.registry.len() >= REGISTRY_ENTRIES_MAX && !state.registry.contains_key(&key) {
                // Settled answers are refetched when asked for again.
                state.registry.retain(|_, e| e.in_flight);
            }
            let entry = state.registry.entry(key).or_default();
            // "Not found" is asked again soon: the type may be registered any moment.
            let max_age = if matches!(entry.value, Some(Some(_))) {
                TTL
            } else {
                MISS_REFETCH
            };
            if entry.claim(max_age) {
                due.registry = Some((r.node_type_id.clone(), r.version.clone()));
            }
            if let Some(Some(info)) = &entry.value {
                return (info.clone(), false);
            }
            pending |= entry.first_answer_pending();
            unreachable |= entry.unreachable;
        }
        // The atomic executors start their own fetches; they never wait either.
        let atomic = self
            .atomic
            .as_ref()
            .map(|a| a.lookup(r))
            .unwrap_or_default();
        unreachable |= atomic.unreachable;
        let mut listed = atomic.listed;
        if self.composite.is_some() {
            let listing = &mut state.composite_listing;
            listed = listed.or_else(|| listing.value.as_ref().and_then(|l| find_listed(l, r)));
            // A type nobody lists may have been added since: ask again soon, not after the TTL.
            let max_age = if listed.is_some() { TTL } else { MISS_REFETCH };
            due.composite_listing = listing.claim(max_age);
            if listed.is_none() {
                pending |= listing.in_flight;
            }
            unreachable |= listing.unreachable;
        }
        if listed.is_none() {
            pending |= atomic.pending;
        }
        let best = listed.unwrap_or_else(|| NodeTypeInfo {
            kind: infer_kind(&r.node_type_id),
            constraints: None,
            sources_unreachable: unreachable || pending,
        });
        (best, pending)
    }

    async fn fetch_registry(self: Arc<Self>, key: (String, String)) {
        let Some(registry) = &self.registry else {
            return;
        };
        let result = registry.node_type(&key.0, &key.1).await;
        if let Err(err) = &result {
            tracing::debug!(node_type_id = %key.0, version = %key.1, error = %err, "node registry lookup failed");
        }
        {
            let mut state = self.state.lock().unwrap();
            let entry = state.registry.entry(key).or_default();
            entry.in_flight = false;
            entry.unreachable = matches!(result, Err(CallError::Transient { .. }));
            match result {
                Ok(node_type) => {
                    entry.value = Some(Some(NodeTypeInfo {
                        kind: Some(node_type.kind),
                        constraints: node_type.constraints,
                        sources_unreachable: false,
                    }));
                    entry.fetched_at = Some(Instant::now());
                }
                // Keep the last answer; the next lookup after MISS_REFETCH asks again.
                Err(CallError::Transient { .. }) => {}
                Err(CallError::Terminal(_)) => {
                    entry.value = Some(None);
                    entry.fetched_at = Some(Instant::now());
                }
            }
        }
        self.fetched.send_modify(|n| *n = n.wrapping_add(1));
    }

    async fn fetch_composite_listing(self: Arc<Self>) {
        let Some(composite) = &self.composite else {
            return;
        };
        let result = composite.node_types().await;
        {
            let mut state = self.state.lock().unwrap();
            let listing = &mut state.composite_listing;
            listing.in_flight = false;
            listing.unreachable = matches!(result, Err(CallError::Transient { .. }));
            match result {
                Ok(types) => {
                    let mut listed = Listing::new();
                    for t in types {
                        listed.entry(t.node_type_id.clone()).or_default().push(t);
                    }
                    listing.value = Some(listed);
                    listing.fetched_at = Some(Instant::now());
                }
                // Keep what an unreachable executor listed before.
                Err(CallError::Transient { reason, .. }) => {
                    tracing::debug!(reason, "composite node types unavailable");
                }
                Err(CallError::Terminal(error)) => {
                    tracing::debug!(code = error.code, "composite node types refused");
                    listing.value = Some(Listing::new());
                    listing.fetched_at = Some(Instant::now());
                }
            }
        }
        self.fetched.send_modify(|n| *n = n.wrapping_add(1));
    }
}

pub(crate) fn find_listed(listed: &Listing, r: &NodeTypeRef) -> Option<NodeTypeInfo> {
    let versions = listed.get(&r.node_type_id)?;
    // The exact version's constraints apply; any version tells the kind.
    let exact = versions.iter().find(|t| t.version == r.version);
    let node_type = exact.or_else(|| versions.first())?;
    Some(NodeTypeInfo {
        kind: Some(node_type.kind),
        constraints: exact.and_then(|t| t.constraints.clone()),
        sources_unreachable: false,
    })
}

/// `atomic.*` / `composite.*` prefixes, as the Python coordinator infers them.
pub fn infer_kind(node_type_id: &str) -> Option<NodeKind> {
    let lowered = node_type_id.to_ascii_lowercase();
    if lowered.starts_with("atomic.") {
        Some(NodeKind::Atomic)
    } else if lowered.starts_with("composite.") {
        Some(NodeKind::Composite)
    } else {
        None
    }
}
