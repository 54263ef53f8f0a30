//! A pack's `describe` and `needs` answers, each copied out of the guest within a byte budget.
//!
//! Wasmtime copies the whole answer into host memory before anything can be
//! checked, and the canonical ABI lets a guest point every node's schema at
//! the same string, so a few megabytes of guest memory could expand into
//! gigabytes of host copies. The store's hostcall fuel bounds what one lift
//! copies (each string's bytes, each list's host-side elements, aliased or
//! not): the answer fails before the copying goes past the budget. The
//! guest's own memory limit bounds the rest. A lazily lifted answer
//! (`WasmStr`) is no way out: wasmtime runs the guest's post-return, which
//! may free the strings, before the host could read them.

use wasmtime::Store;
use wasmtime::component::Instance;

use super::spec::{MAX_NEEDS_PER_LIST, MAX_TAGS, PackLimits};
use crate::world::{NeedsFunc, NodeNeeds, NodePack, NodeSpec, PackInfo};

/// What copying an answer within `limits` may cost: its text, plus the host
/// records of the largest allowed list of nodes with all their tags.
pub fn describe_budget(limits: &PackLimits) -> usize {
    let per_node = size_of::<NodeSpec>() + MAX_TAGS * size_of::<String>();
    limits
        .max_describe_bytes
        .saturating_add(limits.max_nodes.saturating_mul(per_node))
}

/// What copying a `needs` answer within `limits` may cost: as much text as
/// `describe` may return, plus the host records of one entry per node and
/// one for `*`, each with full lists.
pub fn needs_budget(limits: &PackLimits) -> usize {
    let per_entry = size_of::<NodeNeeds>() + 3 * MAX_NEEDS_PER_LIST * size_of::<String>();
    limits
        .max_describe_bytes
        .saturating_add(limits.max_nodes.saturating_add(1).saturating_mul(per_entry))
}

/// Calls a pack's `needs`, copying at most [`needs_budget`] bytes.
pub(crate) async fn needs<T: Send + 'static>(
    store: &mut Store<T>,
    func: NeedsFunc,
    limits: &PackLimits,
) -> Result<Vec<NodeNeeds>, String> {
    let budget = needs_budget(limits);
    store.set_hostcall_fuel(budget);
    match func.call_async(&mut *store, ()).await {
        Ok((needs,)) => Ok(needs),
        Err(e) => Err(fuel_message(format!("{e:#}"), budget, limits)),
    }
}

/// The error of an answer's copy, saying which budget an exhausted fuel was.
fn fuel_message(message: String, budget: usize, limits: &PackLimits) -> String {
    if message.contains("fuel allocated for hostcalls has been exhausted") {
        format!(
            "the answer is more than {budget} bytes, the limit for {} nodes and {} bytes of text",
            limits.max_nodes, limits.max_describe_bytes
        )
    } else {
        message
    }
}

/// Calls `describe` on `instance`, copying at most [`describe_budget`] bytes.
pub(crate) async fn describe<T: Send + 'static>(
    store: &mut Store<T>,
    instance: &Instance,
    limits: &PackLimits,
) -> Result<PackInfo, String> {
    let budget = describe_budget(limits);
    store.set_hostcall_fuel(budget);
    let bindings = NodePack::new(&mut *store, instance).map_err(|e| format!("{e:#}"))?;
    bindings
        .call_describe(&mut *store)
        .await
        .map_err(|e| fuel_message(format!("{e:#}"), budget, limits))
}
