#!/usr/bin/env python3
"""Constant HTTP load through kubesim's mesh, counted per second.

Sends RATE requests per second to the mesh entry with `Host: HOST`, each on its own thread so a slow
answer does not slow the load, and appends one JSON line per second to OUT:

    {"t": 12, "at": 1795312345, "ok": {"v1": 16, "v2": 4}, "failed": 0}

`t` is seconds since the start of the load and `at` the same second as Unix time; `ok` counts 2xx answers by the pod's `version`
label (kubesim's pods name it in their answers); `failed` counts everything else (5xx, resets,
timeouts). A second is written once it is over; answers that arrive later (slow or timed out) are
written in another line with the same `t`: add lines up by `t`.
Runs until SIGTERM or SIGINT. Used by hack/demo.sh; needs only Python's standard library.
"""

import argparse
import http.client
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", required=True, help="mesh entry as host:port, from kubesim's endpoints.json")
    parser.add_argument("--host", required=True, help="Host header naming the Service, e.g. podinfo.shop")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second (default 20)")
    parser.add_argument("--out", required=True, help="file the per-second JSON lines are appended to")
    args = parser.parse_args()

    host, port = args.mesh.rsplit(":", 1)
    lock = threading.Lock()
    buckets: dict[int, dict] = {}
    start = time.monotonic()
    epoch = time.time()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def count(second: int, version: str | None) -> None:
        with lock:
            bucket = buckets.setdefault(second, {"ok": {}, "failed": 0})
            if version is None:
                bucket["failed"] += 1
            else:
                bucket["ok"][version] = bucket["ok"].get(version, 0) + 1

    def one(second: int) -> None:
        version = None
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
            conn.request("GET", "/", headers={"Host": args.host})
            response = conn.getresponse()
            body = response.read()
            conn.close()
            if 200 <= response.status < 300:
                version = json.loads(body or b"{}").get("version") or "unversioned"
        except (OSError, http.client.HTTPException, ValueError):
            version = None
        count(second, version)

    def flush(upto: int) -> None:
        with lock:
            done = sorted(s for s in buckets if s < upto)
            lines = [json.dumps({"t": s, "at": int(epoch) + s, **buckets.pop(s)}) for s in done]
        if lines:
            with open(args.out, "a", encoding="utf-8") as out:
                out.write("\n".join(lines) + "\n")

    interval = 1.0 / args.rate
    sent = 0
    with ThreadPoolExecutor(max_workers=64) as pool:
        while not stop.is_set():
            now = time.monotonic() - start
            pool.submit(one, int(now))
            sent += 1
            flush(int(now))
            delay = start + sent * interval - time.monotonic()
            if delay > 0:
                stop.wait(delay)
    flush(1 << 62)


if __name__ == "__main__":
    main()
