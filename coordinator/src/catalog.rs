//! Node kind and node-type constraints: the Node Registry, else the executors' own catalogs, else the id prefix.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arp_types::{ConstraintEnvelope, NodeKind, NodeType, NodeTypeRef};

use crate::clients::{
    AtomicExecutorClient, CallError, CompositeExecutorClient, NodeRegistryClient,
};

/// How long a fetched node type (or executor listing) is trusted.
const TTL: Duration = Duration::from_secs(30);
/// A miss refetches the executor listings at most this often.
const MISS_REFETCH: Duration = Duration::from_secs(1);

/// What the coordinator needs to know about a node type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeTypeInfo {
    /// `None` when no source knows the type and its id has no `atomic.`/`composite.` prefix.
    pub kind: Option<NodeKind>,
    pub constraints: Option<ConstraintEnvelope>,
    /// A source could not be reached: an unknown kind may become known later.
    pub sources_unreachable: bool,
}

#[derive(Debug)]
pub struct NodeCatalog {
    registry: Option<NodeRegistryClient>,
    atomic: Option<AtomicExecutorClient>,
    composite: Option<CompositeExecutorClient>,
    registry_cache: RwLock<HashMap<(String, String), (Instant, NodeTypeInfo)>>,
    listing: tokio::sync::Mutex<Option<Instant>>,
    /// Node types the executors list, by id then version.
    listed: RwLock<HashMap<String, Vec<NodeType>>>,
    listing_unreachable: AtomicBool,
    registry_unreachable: AtomicBool,
}

impl NodeCatalog {
    pub fn new(
        registry: Option<NodeRegistryClient>,
        atomic: Option<AtomicExecutorClient>,
        composite: Option<CompositeExecutorClient>,
    ) -> Self {
        Self {
            registry,
            atomic,
            composite,
            registry_cache: RwLock::default(),
            listing: tokio::sync::Mutex::new(None),
            listed: RwLock::default(),
            listing_unreachable: AtomicBool::new(false),
            registry_unreachable: AtomicBool::new(false),
        }
    }

    pub async fn lookup(&self, node_type_ref: &NodeTypeRef) -> NodeTypeInfo {
        if let Some(info) = self.lookup_registry(node_type_ref).await {
            return info;
        }
        if let Some(info) = self.lookup_executors(node_type_ref).await {
            return info;
        }
        NodeTypeInfo {
            kind: infer_kind(&node_type_ref.node_type_id),
            constraints: None,
            sources_unreachable: self.registry_unreachable.load(Ordering::Relaxed)
                || self.listing_unreachable.load(Ordering::Relaxed),
        }
    }

    async fn lookup_registry(&self, r: &NodeTypeRef) -> Option<NodeTypeInfo> {
        let registry = self.registry.as_ref()?;
        let key = (r.node_type_id.clone(), r.version.clone());
        if let Some((at, info)) = self.registry_cache.read().unwrap().get(&key)
            && at.elapsed() < TTL
        {
            return Some(info.clone());
        }
        match registry.node_type(&r.node_type_id, &r.version).await {
            Ok(node_type) => {
                self.registry_unreachable.store(false, Ordering::Relaxed);
                let info = NodeTypeInfo {
                    kind: Some(node_type.kind),
                    constraints: node_type.constraints,
                    sources_unreachable: false,
                };
                self.registry_cache
                    .write()
                    .unwrap()
                    .insert(key, (Instant::now(), info.clone()));
                Some(info)
            }
            Err(err) => {
                let unreachable = matches!(err, CallError::Transient { .. });
                self.registry_unreachable
                    .store(unreachable, Ordering::Relaxed);
                tracing::debug!(node_type_id = %r.node_type_id, error = %err, "node registry lookup failed");
                None
            }
        }
    }

    async fn lookup_executors(&self, r: &NodeTypeRef) -> Option<NodeTypeInfo> {
        if self.atomic.is_none() && self.composite.is_none() {
            return None;
        }
        let fresh = {
            let last = self.listing.lock().await;
            last.is_some_and(|at| at.elapsed() < TTL)
        };
        if !fresh {
            self.refresh_listing(TTL).await;
        }
        if let Some(info) = self.find_listed(r) {
            return Some(info);
        }
        self.refresh_listing(MISS_REFETCH).await;
        self.find_listed(r)
    }

    fn find_listed(&self, r: &NodeTypeRef) -> Option<NodeTypeInfo> {
        let listed = self.listed.read().unwrap();
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

    /// Refetches the listings unless the last fetch is younger than `min_age`;
    /// concurrent callers wait for one fetch instead of each making their own.
    async fn refresh_listing(&self, min_age: Duration) {
        let mut last = self.listing.lock().await;
        if last.is_some_and(|at| at.elapsed() < min_age) {
            return;
        }
        let mut listed: HashMap<String, Vec<NodeType>> = HashMap::new();
        let mut unreachable = false;
        let mut add = |result: Result<Vec<NodeType>, CallError>, service: &str| match result {
            Ok(types) => types
                .into_iter()
                .for_each(|t| listed.entry(t.node_type_id.clone()).or_default().push(t)),
            Err(err) => {
                unreachable |= matches!(err, CallError::Transient { .. });
                tracing::debug!(error = %err, service, "node types unavailable");
            }
        };
        if let Some(atomic) = &self.atomic {
            add(atomic.node_types().await, "atomic executor");
        }
        if let Some(composite) = &self.composite {
            add(composite.node_types().await, "composite executor");
        }
        self.listing_unreachable
            .store(unreachable, Ordering::Relaxed);
        if unreachable {
            // Keep what an unreachable executor listed before.
            let mut old = self.listed.write().unwrap();
            for (id, types) in listed {
                old.insert(id, types);
            }
            *last = Some(Instant::now());
            return;
        }
        *self.listed.write().unwrap() = listed;
        *last = Some(Instant::now());
    }
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
