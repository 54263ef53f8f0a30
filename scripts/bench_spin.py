"""Spinning-guest load against a running executor: N concurrent calls to a
node that never returns, while /v1/health is polled. Prints health latency
(over the whole run, and over the part where every call is admitted and
spinning, without the arrival of the calls and their answers at the deadline)
and how far past its deadline each call was answered (client-side, from the
moment the request was written on an open connection, and from the result's
started_at/ended_at). Only 127.0.0.1."""

import argparse
import asyncio
import datetime
import http.client as httpclient
import json
import multiprocessing
import statistics
import sys
import time


async def http(reader, writer, method, path, body=b""):
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head + body)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, await reader.readexactly(length)


def poll_health(port, ready, stop, results):
    """Polls GET /v1/health every 10 ms on one keep-alive connection until
    `stop` is set; puts the list of (start, latency in ms) on `results`
    (start by time.perf_counter, CLOCK_MONOTONIC, comparable across processes).
    One request first, not counted, opens the connection (and warms this
    process up), then `ready` is set."""
    conn = httpclient.HTTPConnection("127.0.0.1", port)
    conn.request("GET", "/v1/health")
    conn.getresponse().read()
    ready.set()
    samples = []
    while not stop.is_set():
        began = time.perf_counter()
        conn.request("GET", "/v1/health")
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
        samples.append((began, (time.perf_counter() - began) * 1000))
        time.sleep(0.01)
    results.put(samples)


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def summary(name, values_ms):
    return (
        f"{name}: n={len(values_ms)} p50={pct(values_ms, 50):.2f} ms "
        f"p99={pct(values_ms, 99):.2f} ms max={max(values_ms):.2f} ms"
    )


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--limit-ms", type=int, default=2000)
    ap.add_argument("--node", default="bench.spin")
    args = ap.parse_args()

    conns = []
    for _ in range(args.calls):
        conns.append(await asyncio.open_connection("127.0.0.1", args.port))

    overshoot = []
    served = []
    sent = []
    codes = {}

    async def spin(i, conn):
        body = json.dumps(
            {
                "node_run_id": f"spin-{time.time_ns()}-{i}",
                "run_id": "bench-spin",
                "node_type_ref": {"node_type_id": args.node, "version": "1.0.0"},
                "inputs": {},
                "constraints": {"budgets": {"max_wall_time_ms": args.limit_ms}},
            }
        ).encode()
        began = time.perf_counter()
        sent.append(began)
        status, text = await http(*conn, "POST", "/v1/atomic-node-runs:execute", body)
        took = (time.perf_counter() - began) * 1000
        result = json.loads(text)
        code = (result.get("error") or {}).get("code", result.get("state", status))
        codes[code] = codes.get(code, 0) + 1
        overshoot.append(took - args.limit_ms)
        # The server's own timestamps: without the client's processing of
        # 1,000 answers arriving at once.
        started, ended = (
            datetime.datetime.fromisoformat(result[k].replace("Z", "+00:00"))
            for k in ("started_at", "ended_at")
        )
        served.append((ended - started).total_seconds() * 1000 - args.limit_ms)

    # Health is polled from a process of its own, so the figure is the
    # server's: this event loop is busy with 1,000 answers at the deadline.
    ready = multiprocessing.Event()
    stop = multiprocessing.Event()
    results = multiprocessing.Queue()
    poller = multiprocessing.Process(
        target=poll_health, args=(args.port, ready, stop, results)
    )
    poller.start()
    if not ready.wait(30):
        sys.exit("the health poller could not reach the executor")
    await asyncio.wait_for(
        asyncio.gather(*(spin(i, c) for i, c in enumerate(conns))),
        timeout=args.limit_ms / 1000 + 60,
    )
    stop.set()
    samples = results.get()
    poller.join()
    health = [ms for _, ms in samples]
    # While every call spins: from 100 ms after the last was sent (admitted
    # by then) to 50 ms before the first deadline.
    spin_from = max(sent) + 0.1
    spin_to = min(sent) + args.limit_ms / 1000 - 0.05
    spinning = [ms for at, ms in samples if spin_from <= at <= spin_to]
    for _, writer in conns:
        writer.close()
    print(f"calls: {args.calls} spinning, limit {args.limit_ms} ms; outcomes {codes}")
    print(summary("health latency", health))
    if spinning:
        print("  " + summary("of which while all calls spin", spinning))
    print(summary("deadline overshoot (client)", overshoot))
    print(summary("deadline overshoot (server timestamps)", served))
    print(f"  (overshoot min {min(overshoot):.2f} ms, mean {statistics.mean(overshoot):.2f} ms)")
    return 0 if set(codes) == {"timeout"} else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
