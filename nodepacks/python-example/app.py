"""Glue between the `jarvis:node/node-pack` world and the pack in `nodes.py`.

componentize-py builds this module into a component; the class below is the
component's export. Nothing here is specific to one pack except the import.
"""

from __future__ import annotations

import json

import wit_world
from componentize_py_types import Err
from wit_world import Invocation, NodeError, NodeSpec, PackInfo, SideEffect

from jarvis_pack import NodeContext, NodeFailure, dumps
from nodes import pack

_SIDE_EFFECTS = {
    "read": SideEffect.READ,
    "write": SideEffect.WRITE,
    "irreversible": SideEffect.IRREVERSIBLE,
}


class WitWorld(wit_world.WitWorld):
    def describe(self) -> PackInfo:
        return PackInfo(
            pack_id=pack.pack_id,
            pack_version=pack.version,
            nodes=[
                NodeSpec(
                    node_type_id=node.name,
                    version=pack.version,
                    description=node.description,
                    input_schema=dumps(node.input_schema),
                    output_schema=dumps(node.output_schema),
                    side_effect=_SIDE_EFFECTS[node.side_effect],
                    trust_tier=node.trust_tier,
                    egress_policy=node.egress_policy,
                    tags=node.tags,
                    max_wall_time_ms=None,
                )
                for node in pack.nodes
            ],
        )

    def invoke(self, call: Invocation) -> str:
        node = pack.find(call.node_type_id)
        if node is None or call.version != pack.version:
            raise Err(NodeError("unknown_node_type", f"{call.node_type_id}@{call.version}", None))
        ctx = NodeContext(
            run_id=call.run_id,
            node_run_id=call.node_run_id,
            trace_id=call.trace_id,
            deadline_unix_ms=call.deadline_unix_ms,
        )
        try:
            outputs = node.run(json.loads(call.inputs), ctx)
        except NodeFailure as failure:
            details = dumps(failure.details) if failure.details is not None else None
            raise Err(NodeError(failure.code, failure.message, details))
        except Exception as error:  # noqa: BLE001 - every failure becomes a node error
            raise Err(NodeError("handler_error", f"{type(error).__name__}: {error}", None))
        return dumps(outputs)
