#!/usr/bin/env python3
"""Load test of `zimage-trt serve` on loopback: bounded in requests and time, checks that nothing is lost.

    python scripts/loadtest.py --bundle BUNDLE [--backend onnxruntime --device cpu]   # starts a server itself
    python scripts/loadtest.py --url http://127.0.0.1:8000                            # an already running one

It first measures one request alone (the service time), then runs closed-loop clients, each sending its next
request as soon as the last one is answered, so the offered load is `--overload` times what the server holds
(its queue plus the request on the GPU). Every answer must be an image (a valid PNG of the served size) or an
explicit 429 / 503 in the OpenAI error shape: anything else counts as lost or malformed. The server's resident
memory is read from /metrics before and after; it must stay flat. Prints a report, writes it as JSON with
--json, and exits 1 if a request was lost or malformed or memory grew.

Only loopback addresses are accepted: this drives the project's own server, nothing else.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MEMORY_SLACK = 64 * 2**20  # RSS may move by allocator noise; more than this (and 10 %) is growth


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, host: str, port: int, timeout: float):
        self.host, self.port, self.timeout = host, port, timeout

    def request(self, method: str, path: str, body: dict | None = None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def rss(self) -> float | None:
        status, _, body = self.request("GET", "/metrics")
        for line in body.decode().splitlines():
            if line.startswith("process_resident_memory_bytes"):
                return float(line.split()[-1])
        return None


def wait_ready(client: Client, limit: float) -> dict:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            status, _, body = client.request("GET", "/health")
            if status == 200:
                return json.loads(body)
        except OSError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"the server was not ready within {limit:.0f} s")


def classify(status: int, headers: dict, body: bytes, size: tuple[int, int]) -> str:
    """ok | rejected_429 | rejected_503 | malformed."""
    from PIL import Image

    try:
        doc = json.loads(body)
    except ValueError:
        return "malformed"
    if status == 200:
        try:
            png = base64.b64decode(doc["data"][0]["b64_json"])
            image = Image.open(io.BytesIO(png))
            image.load()
        except Exception:  # noqa: BLE001 - any failure to decode is a malformed answer
            return "malformed"
        return "ok" if image.format == "PNG" and image.size == size and isinstance(doc.get("created"), int) else "malformed"
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict) or not error.get("message"):
        return "malformed"
    if status == 429:
        return "rejected_429" if headers.get("retry-after", headers.get("Retry-After", "")).isdigit() else "malformed"
    if status == 503:
        return "rejected_503"
    return "malformed"


def run(client: Client, clients: int, total: int, time_limit: float, size, steps: int) -> dict:
    counts = {"ok": 0, "rejected_429": 0, "rejected_503": 0, "malformed": 0, "lost": 0}
    latencies: list[float] = []
    lock = threading.Lock()
    sent = 0
    stop_at = time.monotonic() + time_limit

    def one_client(k: int) -> None:
        nonlocal sent
        while True:
            with lock:
                if sent >= total or time.monotonic() > stop_at:
                    return
                i = sent
                sent += 1
            body = {"prompt": f"load test image {i}, a red fox in the snow", "seed": i, "num_inference_steps": steps}
            start = time.monotonic()
            try:
                status, headers, raw = client.request("POST", "/v1/images/generations", body)
                kind = classify(status, headers, raw, size)
            except (OSError, http.client.HTTPException):
                kind = "lost"
            with lock:
                counts[kind] += 1
                if kind == "ok":
                    latencies.append(time.monotonic() - start)
                elif kind == "rejected_429":
                    time.sleep(0.05)  # a polite client backs off a little before its next request

    threads = [threading.Thread(target=one_client, args=(k,)) for k in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else None

    return {
        "sent": sent,
        **counts,
        "seconds": elapsed,
        "throughput_images_per_s": counts["ok"] / elapsed if elapsed else 0.0,
        "p50_s": pct(0.50),
        "p99_s": pct(0.99),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    where.add_argument("--bundle", help="start `zimage-trt serve` on this bundle, on a free loopback port")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--engines")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--queue-size", type=int, default=2, help="queue of the server this script starts (default 2)")
    ap.add_argument("--overload", type=float, default=4.0, help="offered load / what the server holds (default 4)")
    ap.add_argument("--requests", type=int, default=40, help="requests in all (default 40)")
    ap.add_argument("--time-limit", type=float, default=120.0, help="stop sending after this many seconds (default 120)")
    ap.add_argument("--steps", type=int, default=9, help="num_inference_steps of each request (default 9)")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args()

    server = None
    if args.bundle:
        port = free_port()
        cmd = [sys.executable, "-m", "zimage_trt.cli", "serve", "--bundle", args.bundle, "--backend", args.backend,
               "--device", args.device, "--host", "127.0.0.1", "--port", str(port), "--queue-size", str(args.queue_size)]
        if args.engines:
            cmd += ["--engines", args.engines]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        host, queue_size = "127.0.0.1", args.queue_size
    else:
        url = urlparse(args.url)
        if url.hostname not in LOOPBACK:
            ap.error(f"{args.url}: only loopback addresses (127.0.0.1, localhost, ::1) are load-tested")
        host, port, queue_size = url.hostname, url.port or 80, args.queue_size
    client = Client(host, port, timeout=args.time_limit + 60)
    try:
        health = wait_ready(client, 300)
        width, height = (int(v) for v in health["size"].split("x"))
        t0 = time.monotonic()
        status, headers, raw = client.request("POST", "/v1/images/generations", {"prompt": "warm", "seed": 0,
                                                                                 "num_inference_steps": args.steps})
        service_time = time.monotonic() - t0
        if classify(status, headers, raw, (width, height)) != "ok":
            raise SystemExit(f"a single request failed: {status} {raw[:200]!r}")
        rss_before = client.rss()
        clients = max(1, round(args.overload * (queue_size + 1)))
        report = run(client, clients, args.requests, args.time_limit, (width, height), args.steps)
        rss_after = client.rss()
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    report.update(
        clients=clients,
        server_capacity_in_flight=queue_size + 1,
        service_time_s=service_time,
        rss_before_mb=rss_before / 2**20 if rss_before else None,
        rss_after_mb=rss_after / 2**20 if rss_after else None,
    )
    flat = rss_before is None or rss_after - rss_before <= max(MEMORY_SLACK, 0.10 * rss_before)
    report["memory_flat"] = flat
    report["passed"] = report["lost"] == 0 and report["malformed"] == 0 and report["ok"] > 0 and flat
    print(f"{report['sent']} requests from {clients} clients in {report['seconds']:.1f} s "
          f"(server holds {queue_size + 1}; one request alone {service_time:.2f} s)")
    print(f"  images {report['ok']}  429 {report['rejected_429']}  503 {report['rejected_503']}  "
          f"lost {report['lost']}  malformed {report['malformed']}")
    if report["ok"]:
        print(f"  latency p50 {report['p50_s']:.2f} s  p99 {report['p99_s']:.2f} s  "
              f"throughput {report['throughput_images_per_s']:.2f} images/s")
    if rss_before:
        print(f"  server RSS {report['rss_before_mb']:.0f} MB -> {report['rss_after_mb']:.0f} MB "
              f"({'flat' if flat else 'GREW'})")
    print("PASSED" if report["passed"] else "FAILED")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
