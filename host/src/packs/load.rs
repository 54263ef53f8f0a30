//! A pack's `describe` answer, read out of guest memory within bounds.
//!
//! The answer is lifted lazily ([`WasmStr`], [`WasmList`]): the canonical ABI
//! lets a guest point every node's schema at the same string, so a list of a
//! few megabytes in guest memory could otherwise expand into gigabytes of
//! host copies before anything is checked. Here counts are checked before
//! any element is read, and every string's length before it is copied; what
//! the host copies in total is at most [`PackLimits::max_describe_bytes`].
//! What the guest can make the host *read* (UTF-8 checks) is bounded by its
//! linear memory, which the execution memory limit caps.

use wasmtime::AsContextMut;
use wasmtime::component::{ComponentType, Instance, Lift, WasmList, WasmStr};

use super::spec::{self, PackLimits};
use crate::world::{NodeSpec, PackInfo, SideEffect};

#[derive(ComponentType, Lift)]
#[component(record)]
struct RawNodeSpec {
    #[component(name = "node-type-id")]
    node_type_id: WasmStr,
    version: WasmStr,
    description: WasmStr,
    #[component(name = "input-schema")]
    input_schema: WasmStr,
    #[component(name = "output-schema")]
    output_schema: WasmStr,
    #[component(name = "side-effect")]
    side_effect: SideEffect,
    #[component(name = "trust-tier")]
    trust_tier: WasmStr,
    #[component(name = "egress-policy")]
    egress_policy: Option<WasmStr>,
    tags: WasmList<WasmStr>,
    #[component(name = "max-wall-time-ms")]
    max_wall_time_ms: Option<u32>,
}

#[derive(ComponentType, Lift)]
#[component(record)]
struct RawPackInfo {
    #[component(name = "pack-id")]
    pack_id: WasmStr,
    #[component(name = "pack-version")]
    pack_version: WasmStr,
    nodes: WasmList<RawNodeSpec>,
}

/// Calls `describe` on `instance` and copies its answer out within `limits`.
pub(crate) async fn describe<T: Send + 'static>(
    mut store: impl AsContextMut<Data = T>,
    instance: &Instance,
    limits: &PackLimits,
) -> Result<PackInfo, String> {
    let func = instance
        .get_typed_func::<(), (RawPackInfo,)>(&mut store, "describe")
        .map_err(|e| format!("{e:#}"))?;
    let (raw,) = func
        .call_async(&mut store, ())
        .await
        .map_err(|e| format!("{e:#}"))?;
    Reader {
        store: store.as_context_mut(),
        budget: limits.max_describe_bytes,
        limits,
    }
    .pack(raw)
}

struct Reader<'l, S> {
    store: S,
    /// Bytes the answer may still copy.
    budget: usize,
    limits: &'l PackLimits,
}

impl<T: 'static, S: AsContextMut<Data = T>> Reader<'_, S> {
    fn pack(mut self, raw: RawPackInfo) -> Result<PackInfo, String> {
        let count = raw.nodes.len();
        if count > self.limits.max_nodes {
            return Err(format!(
                "declares {count} nodes, more than the limit of {}",
                self.limits.max_nodes
            ));
        }
        let pack_id = self.string(&raw.pack_id, "pack-id", spec::MAX_ID_BYTES)?;
        let pack_version =
            self.string(&raw.pack_version, "pack-version", spec::MAX_VERSION_BYTES)?;
        let mut nodes = Vec::with_capacity(count);
        for index in 0..count {
            let node = raw
                .nodes
                .get(&mut self.store, index)
                .expect("index within the list")
                .map_err(|e| format!("node #{index}: {e:#}"))?;
            nodes.push(self.node(node).map_err(|e| format!("node #{index}: {e}"))?);
        }
        Ok(PackInfo {
            pack_id,
            pack_version,
            nodes,
        })
    }

    fn node(&mut self, raw: RawNodeSpec) -> Result<NodeSpec, String> {
        let schema = self.limits.max_schema_bytes;
        let tag_count = raw.tags.len();
        if tag_count > spec::MAX_TAGS {
            return Err(format!(
                "{tag_count} tags, more than the limit of {}",
                spec::MAX_TAGS
            ));
        }
        let mut tags = Vec::with_capacity(tag_count);
        for index in 0..tag_count {
            let tag = raw
                .tags
                .get(&mut self.store, index)
                .expect("index within the list")
                .map_err(|e| format!("tag #{index}: {e:#}"))?;
            tags.push(self.string(&tag, "a tag", spec::MAX_TAG_BYTES)?);
        }
        Ok(NodeSpec {
            node_type_id: self.string(&raw.node_type_id, "node-type-id", spec::MAX_ID_BYTES)?,
            version: self.string(&raw.version, "version", spec::MAX_VERSION_BYTES)?,
            description: self.string(
                &raw.description,
                "description",
                spec::MAX_DESCRIPTION_BYTES,
            )?,
            input_schema: self.string(&raw.input_schema, "input-schema", schema)?,
            output_schema: self.string(&raw.output_schema, "output-schema", schema)?,
            side_effect: raw.side_effect,
            trust_tier: self.string(&raw.trust_tier, "trust-tier", spec::MAX_TRUST_TIER_BYTES)?,
            egress_policy: raw
                .egress_policy
                .map(|p| self.string(&p, "egress-policy", spec::MAX_EGRESS_POLICY_BYTES))
                .transpose()?,
            tags,
            max_wall_time_ms: raw.max_wall_time_ms,
        })
    }

    /// Copies one string out of guest memory if it fits both its own limit
    /// and what is left of the answer's budget.
    fn string(&mut self, raw: &WasmStr, what: &str, max: usize) -> Result<String, String> {
        let text = raw
            .to_str(self.store.as_context())
            .map_err(|e| format!("{what}: {e:#}"))?;
        spec::check_len(what, &text, max)?;
        self.budget = self.budget.checked_sub(text.len()).ok_or_else(|| {
            format!(
                "the describe answer is more than {} bytes in all",
                self.limits.max_describe_bytes
            )
        })?;
        Ok(text.into_owned())
    }
}
