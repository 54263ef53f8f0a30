//! The caller's `constraints.gates.side_effect_class`: a node that may change
//! more than the request allows fails before it runs.

use jarvis_atomic_executor::watpack::{WatNode, WatPack};
use serde_json::json;

use crate::support::{assert_outcome, config, pack_with, request, start};

const ECHO: &str = "(call $ok_inputs (local.get $call))";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_more_dangerous_than_the_gate_fails_before_it_runs() {
    let mut node = WatNode::new("test.writer", "1.0.0");
    node.side_effect = 1; // write
    let t = start(
        config(),
        &[(
            "writer.wasm",
            pack_with(WatPack::new("test.writer", "1.0.0"), node, ECHO),
        )],
    )
    .await;
    let gated = |id: &str, class: &str| {
        let mut body = request(id, "test.writer", "1.0.0", json!({ "x": 1 }));
        body["constraints"] = json!({ "gates": { "side_effect_class": class } });
        body
    };

    let before = t.invocations();
    let result = t.result(&gated("nr-read", "read")).await;
    assert_outcome(&result, "failed", Some("side_effect_not_allowed"));
    assert_eq!(
        result["error"]["details"]["side_effect"], "write",
        "{result}"
    );
    assert_eq!(result["error"]["details"]["allowed"], "read", "{result}");
    assert_eq!(t.invocations(), before, "the guest must not run");

    for (id, class) in [("nr-write", "write"), ("nr-irr", "irreversible")] {
        let result = t.result(&gated(id, class)).await;
        assert_outcome(&result, "succeeded", None);
        assert_eq!(result["outputs"], json!({ "x": 1 }));
    }
    // No gate, no check.
    let result = t
        .result(&request(
            "nr-none",
            "test.writer",
            "1.0.0",
            json!({ "x": 2 }),
        ))
        .await;
    assert_outcome(&result, "succeeded", None);
}
