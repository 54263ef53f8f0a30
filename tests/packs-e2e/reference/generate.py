"""Record what the JARVIS reference core nodes do, for the end-to-end tests.

Runs each case through arp-jarvis-atomic-nodes 0.3.8 (the Python reference)
and writes core_cases.json: the inputs, whether they pass the node's input
schema (the Rust executor validates before calling a node; the Python one
does not), and the outputs or the exception the reference produced.

    /tmp/arpvenv/bin/python tests/packs-e2e/reference/generate.py
"""

import asyncio
import json
import pathlib
from importlib.metadata import version

import jsonschema
from jarvis_atomic_nodes import core_nodes
from jarvis_atomic_nodes.sdk import NodeContext

NODES = {
    node.spec.name: node
    for node in (
        core_nodes.core_echo,
        core_nodes.core_sleep,
        core_nodes.core_uuid4,
        core_nodes.core_time_now,
        core_nodes.core_hash_sha256,
    )
}

# Outputs that differ from call to call; the tests check their format.
NONDETERMINISTIC = {"jarvis.core.uuid4", "jarvis.core.time.now"}


def h(**kw):
    base = {"content_base64": None, "text": None, "encoding": None}
    base.update(kw)
    return base


def s(seconds, duration_seconds=None):
    return {"seconds": seconds, "duration_seconds": duration_seconds}


CASES = [
    ("jarvis.core.echo", {"echo": "hello"}),
    ("jarvis.core.echo", {"echo": ""}),
    ("jarvis.core.echo", {"echo": "üñí 🎉 \"quoted\"\n"}),
    ("jarvis.core.echo", {}),
    ("jarvis.core.echo", {"echo": 5}),
    ("jarvis.core.echo", {"echo": None}),
    ("jarvis.core.echo", {"echo": "x", "extra": 1}),
    ("jarvis.core.sleep", s(0)),
    ("jarvis.core.sleep", s(0.05)),
    ("jarvis.core.sleep", s(None, 0.02)),
    ("jarvis.core.sleep", s(None, None)),
    ("jarvis.core.sleep", s(None, 0)),
    ("jarvis.core.sleep", s(0, 5)),
    ("jarvis.core.sleep", s(-1)),
    ("jarvis.core.sleep", s(None, -0.5)),
    ("jarvis.core.sleep", s(-0.0)),
    ("jarvis.core.sleep", s("1")),
    ("jarvis.core.sleep", s(True)),
    ("jarvis.core.sleep", {"seconds": 0}),
    ("jarvis.core.sleep", {}),
    ("jarvis.core.sleep", {"seconds": 0, "duration_seconds": None, "x": 1}),
    ("jarvis.core.uuid4", {}),
    ("jarvis.core.uuid4", {"x": 1}),
    ("jarvis.core.time.now", {}),
    ("jarvis.core.time.now", {"x": 1}),
    ("jarvis.core.hash.sha256", h(text="hello")),
    ("jarvis.core.hash.sha256", h(text="")),
    ("jarvis.core.hash.sha256", h(text="héllo wörld ☃ 🎉")),
    ("jarvis.core.hash.sha256", h(content_base64="aGVsbG8=")),
    ("jarvis.core.hash.sha256", h(content_base64="")),
    ("jarvis.core.hash.sha256", h(content_base64="aGVsbG8=", text="ignored")),
    ("jarvis.core.hash.sha256", h(content_base64="AAAA=")),
    ("jarvis.core.hash.sha256", h(content_base64="YR==")),
    ("jarvis.core.hash.sha256", h(content_base64="+/+/")),
    ("jarvis.core.hash.sha256", h(content_base64="aGVsbG8=", encoding="klingon")),
    ("jarvis.core.hash.sha256", h()),
    ("jarvis.core.hash.sha256", h(content_base64="YQ")),
    ("jarvis.core.hash.sha256", h(content_base64="Y")),
    ("jarvis.core.hash.sha256", h(content_base64="YQ==YQ==")),
    ("jarvis.core.hash.sha256", h(content_base64="=")),
    ("jarvis.core.hash.sha256", h(content_base64="Y Q==")),
    ("jarvis.core.hash.sha256", h(content_base64="A=AA")),
    ("jarvis.core.hash.sha256", h(content_base64="aGVsbG8-")),
    ("jarvis.core.hash.sha256", h(text="héllo", encoding="latin-1")),
    ("jarvis.core.hash.sha256", h(text="héllo", encoding="ascii")),
    ("jarvis.core.hash.sha256", h(text="☃", encoding="latin-1")),
    ("jarvis.core.hash.sha256", h(text="hello", encoding="klingon")),
    ("jarvis.core.hash.sha256", h(text="hello", encoding="")),
    ("jarvis.core.hash.sha256", h(text="héllo", encoding="UTF 8")),
    ("jarvis.core.hash.sha256", h(text="héllo 🎉", encoding="utf-16")),
    ("jarvis.core.hash.sha256", h(text="héllo 🎉", encoding="utf_16_be")),
    ("jarvis.core.hash.sha256", h(text="héllo 🎉", encoding="UTF-32")),
    ("jarvis.core.hash.sha256", h(text="héllo 🎉", encoding="utf-32le")),
    ("jarvis.core.hash.sha256", h(text="hello", encoding="US-ASCII")),
    ("jarvis.core.hash.sha256", {"text": "hello"}),
    ("jarvis.core.hash.sha256", h(text=5)),
    ("jarvis.core.hash.sha256", h(text="x", extra=1)),
]


async def run(name, inputs):
    node = NODES[name]
    ctx = NodeContext(run_id="run", node_run_id="node-run")
    try:
        return {"outputs": await node.ainvoke(json.loads(json.dumps(inputs)), ctx)}
    except Exception as error:  # the reference executor's `except Exception`
        return {"error_type": type(error).__name__, "error": str(error)}


async def main():
    cases = []
    for name, inputs in CASES:
        schema = NODES[name].spec.input_schema
        valid = jsonschema.Draft202012Validator(schema).is_valid(inputs)
        cases.append(
            {
                "node_type_id": name,
                "inputs": inputs,
                "schema_valid": valid,
                "deterministic": name not in NONDETERMINISTIC,
                "python": await run(name, inputs),
            }
        )
    schemas = {
        name: {"input_schema": node.spec.input_schema, "output_schema": node.spec.output_schema,
               "description": node.spec.description, "side_effect": node.spec.side_effect}
        for name, node in NODES.items()
    }
    out = {
        "reference": f"arp-jarvis-atomic-nodes {version('arp-jarvis-atomic-nodes')}",
        "nodes": schemas,
        "cases": cases,
    }
    path = pathlib.Path(__file__).with_name("core_cases.json")
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases to {path}")


asyncio.run(main())
