"""A small JARVIS pack SDK for Python packs built with componentize-py.

It keeps the shape of `jarvis_atomic_nodes.sdk`: decorate a function with
`@atomic_node(...)`, list the nodes in a `NodePack`, and the glue in `app.py`
answers the executor's `describe` and `invoke` from it. Handlers may be plain
or `async def` functions taking `(inputs, ctx)`, so JARVIS nodes port as they
are, except that a pack has no asyncio event loop and no WASI: wait with
`ctx.sleep`, read time with `ctx.now`, say things with `ctx.log`, call an HTTP
API with `ctx.fetch` (wasi:http; the executor sends only what the operator's
grants allow, see the README's "Outbound HTTP").

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
from urllib.parse import urlsplit

from componentize_py_types import Err
from wit_world.imports import clock, log, outgoing_handler, random, streams, timer
from wit_world.imports import types as http


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

    def fetch(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        max_bytes: int = 1 << 20,
    ) -> HttpResponse:
        """One HTTP request through the host (redirects are returned, not followed).

        Raises `HttpError` (a `NodeFailure`, so an uncaught one fails the call
        with its code) when the host refuses the request or it fails, and when
        the body is longer than `max_bytes`.
        """
        return fetch(url, method=method, headers=headers, body=body, max_bytes=max_bytes)


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class HttpError(NodeFailure):
    """A request the host refused or that failed, with a code of ours."""


# The host's refusals get the codes jarvis.web.fetch reports; see the README.
_ERROR_CODES = {
    "ErrorCode_HttpRequestDenied": "http_denied",
    "ErrorCode_DestinationIpProhibited": "http_address_not_public",
    "ErrorCode_ConnectionLimitReached": "http_call_budget_exceeded",
    "ErrorCode_HttpResponseBodySize": "http_response_too_large",
    "ErrorCode_ConnectionTimeout": "http_timeout",
    "ErrorCode_ConnectionReadTimeout": "http_timeout",
    "ErrorCode_HttpResponseTimeout": "http_timeout",
}

_METHODS = {
    "GET": http.Method_Get,
    "HEAD": http.Method_Head,
    "POST": http.Method_Post,
    "PUT": http.Method_Put,
    "DELETE": http.Method_Delete,
    "OPTIONS": http.Method_Options,
    "PATCH": http.Method_Patch,
}

# A write of the wasi output stream takes at most this many bytes.
_WRITE_CHUNK = 4096


def _http_error(code: Any) -> HttpError:
    name = type(code).__name__
    return HttpError(_ERROR_CODES.get(name, "http_error"), f"{name.removeprefix('ErrorCode_')}: {code}")


def fetch(
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    max_bytes: int = 1 << 20,
) -> HttpResponse:
    """A blocking HTTP request over wasi:http; see `NodeContext.fetch`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("url must be http or https with a host")
    kind = _METHODS.get(method.upper())
    fields = http.Fields()
    for name, value in (headers or {}).items():
        fields.append(name, value.encode())
    request = http.OutgoingRequest(fields)
    request.set_method(kind() if kind else http.Method_Other(method))
    request.set_scheme(http.Scheme_Https() if parts.scheme == "https" else http.Scheme_Http())
    request.set_authority(parts.netloc)
    request.set_path_with_query((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    outgoing = request.body()
    try:
        future = outgoing_handler.handle(request, None)
    except Err as refused:
        raise _http_error(refused.value) from None
    if body:
        with outgoing.write() as stream:
            for start in range(0, len(body), _WRITE_CHUNK):
                stream.blocking_write_and_flush(body[start : start + _WRITE_CHUNK])
    http.OutgoingBody.finish(outgoing, None)
    with future:
        with future.subscribe() as ready:
            ready.block()
        answer = future.get()
    # Ready, it is Ok(Ok(response)), or Ok(Err(code)) when the request failed.
    if answer is None or isinstance(answer, Err):
        raise HttpError("http_error", "the response was not available")
    if isinstance(answer.value, Err):
        raise _http_error(answer.value.value)
    with answer.value.value as response:
        status = response.status()
        with response.headers() as fields:
            pairs = [(name, value.decode("latin-1")) for name, value in fields.entries()]
        data = bytearray()
        with response.consume() as incoming:
            with incoming.stream() as stream:
                while True:
                    try:
                        chunk = stream.blocking_read(65536)
                    except Err as end:
                        if isinstance(end.value, streams.StreamError_Closed):
                            break
                        raise HttpError("http_error", f"reading the body failed: {end.value}") from None
                    data += chunk
                    if len(data) > max_bytes:
                        raise HttpError("http_response_too_large", f"the body is over {max_bytes} bytes")
    return HttpResponse(status=status, headers=pairs, body=bytes(data))


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
