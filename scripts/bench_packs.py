#!/usr/bin/env python3
"""Startup and reload figures for the release executor (scripts/bench-startup.sh,
scripts/bench-reload.sh). Only 127.0.0.1; every server started here is stopped.

Packs are copies of the checked-in core pack (nodepacks/jarvis.core.wasm):
- `distinct(i)`: every `jarvis.core` replaced by `jarvis.cNNN` (same length, so the
  component stays valid): its own pack id and node ids, and its own compile.
- `variant(i)`: the core pack with a custom section appended: the same nodes in
  different bytes, so the executor really reloads it.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXE = os.environ.get("JARVIS_EXECUTOR") or os.path.join(ROOT, "target", "release",
                                                        "jarvis-atomic-executor")
CORE = os.path.join(ROOT, "nodepacks", "jarvis.core.wasm")


def core_bytes():
    with open(CORE, "rb") as f:
        return f.read()


def distinct(core, i):
    new = b"jarvis.c%03d" % i
    assert len(new) == len(b"jarvis.core")
    return core.replace(b"jarvis.core", new)


def leb128(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def variant(core, i):
    name = b"bench-reload"
    payload = leb128(len(name)) + name + b"%08d" % i
    return core + b"\x00" + leb128(len(payload)) + payload


def install(path, data):
    """Write-then-rename, as deployment tools do."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def http(method, url, body=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def execute(base, node, version="0.3.8", inputs=None, run=[0]):
    run[0] += 1
    body = {"node_run_id": "bench-%d-%d" % (os.getpid(), run[0]), "run_id": "bench",
            "node_type_ref": {"node_type_id": node, "version": version},
            "inputs": inputs if inputs is not None else {"echo": "hi"}}
    return http("POST", base + "/v1/atomic-node-runs:execute", body)


class Server:
    def __init__(self, packs, port, cache=None, log=None, env=None):
        args = [EXE, "--host", "127.0.0.1", "--port", str(port), "--packs", packs]
        args += ["--compile-cache-dir", cache] if cache else ["--no-compile-cache"]
        full_env = dict(os.environ, ARP_AUTH_PROFILE="dev-insecure", **(env or {}))
        self.base = "http://127.0.0.1:%d" % port
        self.log = open(log or os.devnull, "ab")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(args, env=full_env, stdout=self.log, stderr=self.log)

    def wait_ready(self, limit=120.0):
        """Seconds from process start to health `ok` (every pack loaded)."""
        while True:
            if self.proc.poll() is not None:
                sys.exit("the executor exited early (status %s)" % self.proc.returncode)
            try:
                status, body = http("GET", self.base + "/v1/health", timeout=2)
                if status == 200 and body.get("status") == "ok":
                    return time.perf_counter() - self.started
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.perf_counter() - self.started > limit:
                sys.exit("not ready after %.0f s" % limit)
            time.sleep(0.002)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def summary(xs):
    xs = sorted(xs)
    return "median %.0f ms, min %.0f, max %.0f (n=%d)" % (
        1000 * statistics.median(xs), 1000 * xs[0], 1000 * xs[-1], len(xs))


def startup(args):
    core = core_bytes()
    work = tempfile.mkdtemp(prefix="bench-startup-")
    try:
        packs = os.path.join(work, "packs")
        os.mkdir(packs)
        for i in range(args.packs):
            install(os.path.join(packs, "p%03d.wasm" % i), distinct(core, i))
        cold, cached = [], []
        for r in range(args.rounds):
            cache = os.path.join(work, "cache-%d" % r)
            for kind, out in (("cold", cold), ("cached", cached)):
                server = Server(packs, args.port, cache=cache)
                try:
                    ready = server.wait_ready()
                    status, body = execute(server.base, "jarvis.c%03d.echo" % (args.packs - 1))
                    if status != 200 or body.get("state") != "succeeded":
                        sys.exit("last pack not served: %s %s" % (status, body))
                finally:
                    server.stop()
                out.append(ready)
                print("round %d %-6s ready in %.0f ms" % (r + 1, kind, 1000 * ready), flush=True)
        print("%d packs (copies of the core pack, %d bytes each), process start -> health ok:"
              % (args.packs, len(core)))
        print("  cold (empty compile cache): " + summary(cold))
        print("  cached (second start):      " + summary(cached))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def reload_latency(args):
    core = core_bytes()
    work = tempfile.mkdtemp(prefix="bench-reload-")
    try:
        packs = os.path.join(work, "packs")
        os.mkdir(packs)
        server = Server(packs, args.port, cache=os.path.join(work, "cache"),
                        env={"JARVIS_PACKS_SETTLE_MS": str(args.settle_ms)})
        try:
            server.wait_ready()
            latencies = []
            for i in range(args.trials):
                node = "jarvis.c%03d.echo" % i
                path = os.path.join(packs, "reload.wasm")
                written = time.perf_counter()
                install(path, distinct(core, i))
                while True:
                    status, body = execute(server.base, node)
                    if status == 200 and body.get("state") == "succeeded":
                        break
                    if time.perf_counter() - written > 30:
                        sys.exit("%s not served 30 s after its file was written" % node)
                    time.sleep(0.002)
                latencies.append(time.perf_counter() - written)
                print("trial %d: %.0f ms" % (i + 1, 1000 * latencies[-1]), flush=True)
            lat = sorted(latencies)
            print("reload latency, file renamed into place -> new node served, settle time %d ms: "
                  "p50 %.0f ms, max %.0f ms (n=%d)" % (args.settle_ms, 1000 * statistics.median(lat),
                                                        1000 * lat[-1], len(lat)))
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def replace_loop(args):
    """Replaces `path` with `count` variants of the core pack, `interval` s apart."""
    core = core_bytes()
    for i in range(args.count):
        time.sleep(args.interval)
        install(args.path, variant(core, i + 1))
        print("replaced %d" % (i + 1), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("startup")
    s.add_argument("--packs", type=int, default=20)
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--port", type=int, default=18087)
    s.set_defaults(fn=startup)
    r = sub.add_parser("reload-latency")
    r.add_argument("--trials", type=int, default=20)
    r.add_argument("--settle-ms", type=int, default=500)
    r.add_argument("--port", type=int, default=18088)
    r.set_defaults(fn=reload_latency)
    v = sub.add_parser("replace")
    v.add_argument("path")
    v.add_argument("--count", type=int, default=20)
    v.add_argument("--interval", type=float, default=1.0)
    v.set_defaults(fn=replace_loop)
    w = sub.add_parser("install-core")
    w.add_argument("path")
    w.set_defaults(fn=lambda a: install(a.path, core_bytes()))
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
