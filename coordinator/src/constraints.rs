//! Constraint merging: the strictest combination of run, node-type and request constraints.

use std::collections::BTreeSet;

use arp_types::ConstraintEnvelope;
use arp_types::core::{
    BudgetConstraints, CandidateConstraints, GateConstraints, StructuralConstraints,
};

/// Merges envelopes so that every limit is at least as strict as in any input:
/// numbers take the minimum, allowed lists intersect, denied lists unite,
/// `require_approval` is true if any input requires it, and the side-effect
/// class is the most dangerous one named. `None` when nothing constrains.
pub fn merge<'a>(
    envelopes: impl IntoIterator<Item = Option<&'a ConstraintEnvelope>>,
) -> Option<ConstraintEnvelope> {
    let items: Vec<&ConstraintEnvelope> = envelopes.into_iter().flatten().collect();
    if items.is_empty() {
        return None;
    }

    let budgets: Vec<&BudgetConstraints> =
        items.iter().filter_map(|c| c.budgets.as_ref()).collect();
    let budgets = (!budgets.is_empty()).then(|| BudgetConstraints {
        max_wall_time_ms: min(budgets.iter().map(|b| b.max_wall_time_ms)),
        max_steps: min(budgets.iter().map(|b| b.max_steps)),
        max_external_calls: min(budgets.iter().map(|b| b.max_external_calls)),
        max_cost: budgets.iter().filter_map(|b| b.max_cost).reduce(f64::min),
    });

    let candidates: Vec<&CandidateConstraints> =
        items.iter().filter_map(|c| c.candidates.as_ref()).collect();
    let candidates = (!candidates.is_empty()).then(|| {
        let allowed = candidates
            .iter()
            .filter_map(|c| c.allowed_node_type_ids.as_ref())
            .map(|ids| ids.iter().cloned().collect::<BTreeSet<_>>())
            .reduce(|a, b| a.intersection(&b).cloned().collect());
        let denied = candidates
            .iter()
            .filter_map(|c| c.denied_node_type_ids.as_ref())
            .map(|ids| ids.iter().cloned().collect::<BTreeSet<_>>())
            .reduce(|a, b| a.union(&b).cloned().collect());
        CandidateConstraints {
            max_candidates_per_subtask: min(candidates
                .iter()
                .map(|c| c.max_candidates_per_subtask)),
            allowed_node_type_ids: allowed.map(|s| s.into_iter().collect()),
            denied_node_type_ids: denied.map(|s| s.into_iter().collect()),
        }
    });

    let structural: Vec<&StructuralConstraints> =
        items.iter().filter_map(|c| c.structural.as_ref()).collect();
    let structural = (!structural.is_empty()).then(|| StructuralConstraints {
        max_depth: min(structural.iter().map(|s| s.max_depth)),
        max_children_per_composite: min(structural.iter().map(|s| s.max_children_per_composite)),
        max_total_nodes_per_run: min(structural.iter().map(|s| s.max_total_nodes_per_run)),
        max_decomposition_rounds_per_node: min(structural
            .iter()
            .map(|s| s.max_decomposition_rounds_per_node)),
    });

    let gates: Vec<&GateConstraints> = items.iter().filter_map(|c| c.gates.as_ref()).collect();
    let gates = (!gates.is_empty()).then(|| {
        let requires: Vec<bool> = gates.iter().filter_map(|g| g.require_approval).collect();
        GateConstraints {
            require_approval: (!requires.is_empty()).then(|| requires.iter().any(|r| *r)),
            // `SideEffectClass` orders read < write < irreversible.
            side_effect_class: gates.iter().filter_map(|g| g.side_effect_class).max(),
        }
    });

    if budgets.is_none() && candidates.is_none() && structural.is_none() && gates.is_none() {
        return None;
    }
    Some(ConstraintEnvelope {
        structural,
        candidates,
        budgets,
        gates,
        extensions: None,
    })
}

fn min(values: impl Iterator<Item = Option<u64>>) -> Option<u64> {
    values.flatten().min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(json: serde_json::Value) -> ConstraintEnvelope {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn merge_takes_the_strictest_side() {
        let run = env(serde_json::json!({
            "budgets": {"max_wall_time_ms": 5000, "max_cost": 2.5},
            "candidates": {"allowed_node_type_ids": ["a", "b", "c"], "denied_node_type_ids": ["x"]},
            "structural": {"max_children_per_composite": 10},
            "gates": {"side_effect_class": "write", "require_approval": false}
        }));
        let node = env(serde_json::json!({
            "budgets": {"max_wall_time_ms": 1000, "max_steps": 3},
            "candidates": {"allowed_node_type_ids": ["b", "c", "d"], "denied_node_type_ids": ["y"]},
            "structural": {"max_children_per_composite": 3, "max_depth": 2},
            "gates": {"side_effect_class": "irreversible"}
        }));
        let merged = merge([Some(&run), None, Some(&node)]).unwrap();
        assert_eq!(
            serde_json::to_value(&merged).unwrap(),
            serde_json::json!({
                "budgets": {"max_wall_time_ms": 1000, "max_steps": 3, "max_cost": 2.5},
                "candidates": {"allowed_node_type_ids": ["b", "c"], "denied_node_type_ids": ["x", "y"]},
                "structural": {"max_children_per_composite": 3, "max_depth": 2},
                "gates": {"side_effect_class": "irreversible", "require_approval": false}
            })
        );
    }

    #[test]
    fn merge_of_nothing_is_none() {
        assert_eq!(merge([None, None]), None);
        assert_eq!(merge([Some(&ConstraintEnvelope::default())]), None);
    }
}
