"""The example nodes: ordinary JARVIS-style Python, as a pack author writes it."""

from __future__ import annotations

from typing import Any

from jarvis_pack import NodeContext, NodePack, atomic_node


@atomic_node(
    name="jarvis.example.py.word_count",
    input_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
    },
    output_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "characters": {"type": "integer"},
            "words": {"type": "integer"},
            "lines": {"type": "integer"},
        },
        "required": ["characters", "words", "lines"],
    },
    tags=["example", "text"],
)
async def word_count(inputs: dict[str, Any], ctx: NodeContext) -> dict[str, Any]:
    """Count the characters, words and lines of a text."""
    _ = ctx
    text = inputs["text"]
    if not text.strip():
        raise ValueError("text must not be blank")
    return {"characters": len(text), "words": len(text.split()), "lines": len(text.splitlines())}


@atomic_node(
    name="jarvis.example.py.stamp",
    input_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "label": {"type": "string"},
            "wait_seconds": {"type": "number", "minimum": 0},
        },
        "required": ["label"],
    },
    output_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "label": {"type": "string"},
            "at": {"type": "string"},
            "nonce": {"type": "string"},
        },
        "required": ["label", "at", "nonce"],
    },
    tags=["example"],
)
def stamp(inputs: dict[str, Any], ctx: NodeContext) -> dict[str, Any]:
    """Optionally wait, then stamp a label with the host's time and a random nonce."""
    ctx.sleep(inputs.get("wait_seconds", 0))
    ctx.log("stamping", label=inputs["label"])
    return {
        "label": inputs["label"],
        "at": ctx.now().isoformat(),
        "nonce": ctx.random_bytes(8).hex(),
    }


@atomic_node(
    name="jarvis.example.py.fetch_text",
    input_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "url": {"type": "string"},
            "max_bytes": {"type": "integer", "minimum": 0},
        },
        "required": ["url"],
    },
    output_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "status": {"type": "integer"},
            "content_type": {"type": ["string", "null"]},
            "text": {"type": "string"},
        },
        "required": ["status", "content_type", "text"],
    },
    egress_policy="external_http",
    tags=["example", "http"],
)
def fetch_text(inputs: dict[str, Any], ctx: NodeContext) -> dict[str, Any]:
    """GET a URL the operator granted and return its status and body as text."""
    response = ctx.fetch(inputs["url"], max_bytes=inputs.get("max_bytes", 1 << 20))
    content_type = next((v for k, v in response.headers if k.lower() == "content-type"), None)
    return {
        "status": response.status,
        "content_type": content_type,
        "text": response.body.decode("utf-8", errors="replace"),
    }


pack = NodePack(
    pack_id="jarvis.example.py", version="0.1.0", nodes=[word_count, stamp, fetch_text]
)
