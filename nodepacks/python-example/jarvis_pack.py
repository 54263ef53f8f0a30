"""A small JARVIS pack SDK for Python packs built with componentize-py.

It keeps the shape of `jarvis_atomic_nodes.sdk`: decorate a function with
`@atomic_node(...)`, list the nodes in a `NodePack`, and the glue in `app.py`
answers the executor's `describe` and `invoke` from it. Handlers may be plain
or `async def` functions taking `(inputs, ctx)`, so JARVIS nodes port as they
are, except that a pack has no asyncio event loop and no WASI: wait with
`ctx.sleep`, read time with `ctx.now`, say things with `ctx.log`.

A handler that raises fails the call with code `handler_error` (what the JARVIS
Python executor reports) and the exception's message; raise `NodeFailure` to
choose another code.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from wit_world.imports import clock, log, random, timer


class NodeFailure(Exception):
    """A failure with a code of the node's choosing."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


@dataclass
class NodeContext:
    """What a handler knows about the execution, and what the host grants it."""

    run_id: str
    node_run_id: str
    trace_id: str | None
    deadline_unix_ms: int

    def now(self) -> datetime:
        t = clock.now()
        return datetime.fromtimestamp(t.seconds + t.nanoseconds / 1e9, tz=timezone.utc)

    def sleep(self, seconds: float) -> None:
        # Round up: never wake early.
        timer.sleep(max(0, -int(-seconds * 1000 // 1)))

    def random_bytes(self, n: int) -> bytes:
        return bytes(random.get_random_bytes(n))

    def log(self, message: str, **fields: Any) -> None:
        log.log(log.Level.INFO, message, [log.Field(key=k, value=str(v)) for k, v in fields.items()])


@dataclass(frozen=True)
class AtomicNode:
    name: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    fn: Callable[..., Any]
    side_effect: str = "read"
    trust_tier: str = "first_party"
    egress_policy: str | None = None
    tags: list[str] = field(default_factory=list)

    def run(self, inputs: dict[str, Any], ctx: NodeContext) -> Any:
        result = self.fn(inputs, ctx)
        if inspect.iscoroutine(result):
            # No event loop here: drive the coroutine; awaiting real asyncio
            # machinery (asyncio.sleep, network) cannot work in a pack.
            try:
                result.send(None)
            except StopIteration as done:
                return done.value
            result.close()
            raise RuntimeError(f"{self.name} awaited asyncio; use ctx.sleep and friends instead")
        return result


def atomic_node(
    *,
    name: str,
    input_schema: dict[str, Any],
    output_schema: dict[str, Any],
    description: str | None = None,
    side_effect: str = "read",
    trust_tier: str = "first_party",
    egress_policy: str | None = None,
    tags: list[str] | None = None,
) -> Callable[[Callable[..., Any]], AtomicNode]:
    """Declare a node, as `jarvis_atomic_nodes.sdk.atomic_node` does."""

    def wrap(fn: Callable[..., Any]) -> AtomicNode:
        desc = description or (inspect.getdoc(fn) or "").strip() or f"Atomic node: {fn.__name__}"
        return AtomicNode(
            name=name,
            description=desc,
            input_schema=dict(input_schema),
            output_schema=dict(output_schema),
            fn=fn,
            side_effect=side_effect,
            trust_tier=trust_tier,
            egress_policy=egress_policy,
            tags=list(tags or []),
        )

    return wrap


@dataclass(frozen=True)
class NodePack:
    pack_id: str
    version: str
    nodes: list[AtomicNode]

    def find(self, name: str) -> AtomicNode | None:
        return next((node for node in self.nodes if node.name == name), None)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
