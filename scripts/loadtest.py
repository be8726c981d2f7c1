#!/usr/bin/env python3
"""Load test and soak of `zimage-trt serve` on loopback: bounded in requests and time, checks that nothing is lost.

    python scripts/loadtest.py --bundle BUNDLE [--backend onnxruntime --device cpu]   # starts a server itself
    python scripts/loadtest.py --url http://127.0.0.1:8000 --api-key KEY             # an already running one
    python scripts/loadtest.py --bundle BUNDLE --lora a=A.safetensors --minutes 10    # the soak

It first measures one request alone (the service time), then runs closed-loop clients, each sending its next
request as soon as the last one is answered, so the offered load is `--overload` times what the server holds
(its queue plus the request on the GPU). Every answer must be an image (a valid PNG/JPEG/WebP of the size asked)
or an explicit 429 / 503 in the OpenAI error shape: anything else counts as lost or malformed. The server's
resident memory is read from /metrics; it must stay flat.

--minutes makes it a soak: requests of mixed sizes, guidance on and off, LoRA switches (the server's LoRAs, from
/v1/models) and output formats; a 429 is retried (backing off as OpenAI's clients do) until the request is served
or the time is up. Beside them, hostile requests (--hostile, default 5 % of the requests): a 200 MB body streamed
and one declared, an 8 MB prompt, clients that send their body or headers a byte a second, broken JSON, a prompt
over the character limit, a wrong key; each must get its own 4xx (tricklers: 408 at the server's timeout). Before
the measured minutes each size runs once alone and the full load runs unrecorded (--warmup). It passes with 0 lost,
0 5xx, every hostile request answered as expected, the server alive, RSS flat (the floor of RSS sampled each
second: the last window's at most --rss-tolerance, 2 %, above the first's) and p50/p90 latency stable (last vs
first window within --latency-tolerance, 25 %, + 0.25 s). Windows are minutes (halves of the run when it is shorter
than 4 minutes). Prints a report and the windows' table, writes JSON with --json, exits 1 on a failure.

Only loopback addresses are accepted: this drives the project's own server, nothing else.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import secrets
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

from zimage_trt.serve_probe import LOOPBACK, Client, Trickler, classify, free_port, stream_body, wait_ready

__all__ = ["Client", "Trickler", "classify", "free_port", "stream_body", "wait_ready", "LOOPBACK"]
MEMORY_SLACK = 64 * 2**20  # RSS may move by allocator noise; more than this (and 10 %) is growth (load mode)
RSS_FLAT = 0.02  # soak: the RSS floor of the last window at most 2 % above the first's
LATENCY_DRIFT, LATENCY_SLACK = 0.25, 0.25  # soak: last window's p50/p90 within 25 % + 0.25 s of the first's
LONG_PROMPT = "an ornate baroque ceiling fresco with gold leaf and cherubs, " * 50  # ~3,000 chars: truncated
LORA_BLOCK = 24  # consecutive requests with the same LoRA setting
HOSTILE = ("stream_200mb", "declared_200mb", "prompt_8mb", "trickle_body", "trickle_headers", "bad_json",
           "prompt_too_long", "bad_key")


class Mix:
    """The soak's requests: sizes across the served range, guidance on and off, LoRAs, formats, prompt lengths."""

    def __init__(self, health: dict, card: dict | None, steps: int):
        self.steps = steps
        sizes = health["sizes"]
        lo, hi, opt = (tuple(int(v) for v in sizes[k].split("x")) for k in ("min", "max", "opt"))
        self.sizes = list(dict.fromkeys([opt, lo, hi, (hi[0], opt[1])]))
        self.loras = (card or {}).get("loras", [])

    def body(self, i: int, heavy: bool = False) -> tuple[dict, tuple[int, int], str]:
        """Request i of a fixed cycle (so every window of the soak gets the same mix): each size, guidance off and
        on, PNG/JPEG/WebP, one prompt in ten over 512 tokens; the base weights and each LoRA at two strengths
        taking turns in blocks of LORA_BLOCK requests (a service switches LoRAs, it does not alternate them per
        request). `heavy`: everything on at once (the warm-up's)."""
        size = self.sizes[i % len(self.sizes)]
        guided = heavy or (i // len(self.sizes)) % 2 == 1
        loras = [()] + [(name, scale) for name in self.loras for scale in (0.5, 1.0)]
        lora = loras[-1] if heavy else loras[(i // LORA_BLOCK) % len(loras)]
        fmt = "jpeg" if heavy else (["png"] * 7 + ["jpeg"] * 2 + ["webp"])[i % 10]
        body = {"prompt": LONG_PROMPT if heavy or i % 10 == 3 else f"a red fox in the snow, image {i}",
                "seed": i, "num_inference_steps": self.steps, "size": f"{size[0]}x{size[1]}", "output_format": fmt}
        if fmt != "png":
            body["output_compression"] = (60, 80, 95)[i % 3]
        if guided:
            body.update(guidance_scale=3.0, negative_prompt="blurry, low quality")
        if lora:
            body.update(lora=lora[0], lora_scale=lora[1])
        return body, size, fmt


class Soak:
    """Closed-loop clients plus hostile requests; every answer recorded with its time."""

    def __init__(self, client: Client, mix: Mix, limits: dict, hostile: float, key: str | None, retry: bool):
        self.client, self.mix, self.limits, self.hostile, self.key = client, mix, limits, hostile, key
        self.retry = retry  # soak: a 429 is retried with the same request until served or the time is up
        self.retries = 0
        self.lock = threading.Lock()
        self.records: list[tuple[float, float, str]] = []  # (start, latency, outcome)
        self.hostile_results: list[dict] = []
        self.trickler = Trickler(client.host, client.port, key)
        self.sent = self.hostile_sent = 0

    def _normal(self, i: int, give_up: float) -> None:
        body, size, fmt = self.mix.body(i)
        for attempt in itertools.count():
            start = time.monotonic()
            try:
                status, headers, raw = self.client.request("POST", "/v1/images/generations", body)
                kind = classify(status, headers, raw, size, fmt)
            except OSError:
                kind = "lost"
            if kind == "rejected_429":
                if not self.retry:
                    time.sleep(0.05)  # a polite client backs off a little before its next request
                elif time.monotonic() < give_up:  # as OpenAI's clients do: exponential, jittered, <= Retry-After
                    wait = min(float(headers.get("retry-after", 1)), 0.1 * 2**attempt)
                    time.sleep(wait * random.uniform(0.5, 1.0))
                    with self.lock:
                        self.retries += 1
                    continue
            with self.lock:  # the answer that settled the request: its start, latency and kind
                self.records.append((start, time.monotonic() - start, kind))
            return

    def _hostile(self, kind: str) -> None:
        host, port, lim = self.client.host, self.client.port, self.limits
        start = time.monotonic()
        if kind.startswith("trickle"):
            timeout = lim["body_timeout_s"] if kind == "trickle_body" else lim["header_timeout_s"]
            self.trickler.add(kind.split("_")[1], timeout + 3.0, self._record_hostile)
            return
        if kind == "bad_key" and not self.key:
            kind = "bad_json"  # a server without keys has no 401 to give
        if kind in ("stream_200mb", "declared_200mb", "prompt_8mb"):
            total = 8 * 2**20 if kind == "prompt_8mb" else 200 * 2**20
            out = stream_body(host, port, total, self.key, declare=kind != "stream_200mb")
            got, expect = out["status"], 413
        else:
            client = Client(host, port, 30, key="sk-wrong-key-000" if kind == "bad_key" else self.key)
            body = {"prompt": "x" * (lim["max_prompt_chars"] + 1)} if kind == "prompt_too_long" else None
            raw = b'{"prompt": "broken' if kind == "bad_json" else None
            try:
                got = client.request("POST", "/v1/images/generations", body, raw=raw)[0]
            except OSError:
                got = None
            expect = {"bad_key": 401}.get(kind, 400)
        self._record_hostile({"kind": kind, "expect": expect, "status": got, "seconds": time.monotonic() - start,
                              "ok": got == expect, "at": start})

    def _record_hostile(self, result: dict) -> None:
        with self.lock:
            self.hostile_results.append(result)

    def run(self, clients: int, total: int | None, seconds: float) -> float:
        """`clients` closed-loop clients of normal requests; beside them one client sends a hostile request after
        every 1/hostile normal ones (so they spread evenly over the run and take no normal client's turn)."""
        stop_at = time.monotonic() + seconds

        def one_client() -> None:
            while True:
                with self.lock:
                    if (total is not None and self.sent >= total) or time.monotonic() > stop_at:
                        return
                    i = self.sent
                    self.sent += 1
                self._normal(i, stop_at)  # retried until the end; then a 429 is its answer

        def hostile_client() -> None:
            while time.monotonic() < stop_at:
                if self.sent >= (self.hostile_sent + 1) / self.hostile:
                    self._hostile(HOSTILE[self.hostile_sent % len(HOSTILE)])
                    self.hostile_sent += 1
                time.sleep(0.05)

        self.trickler.start()
        threads = [threading.Thread(target=one_client) for _ in range(clients)]
        if self.hostile > 0:
            threads.append(threading.Thread(target=hostile_client))
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.trickler.finish()
        return start


def by_kind(results: list[dict]) -> dict:
    """Hostile requests by kind: how many, how many answered as expected, and the slowest answer (seconds)."""
    out: dict = {}
    for h in results:
        row = out.setdefault(h["kind"], {"sent": 0, "ok": 0, "expect": h["expect"], "max_seconds": 0.0})
        row["sent"] += 1
        row["ok"] += bool(h["ok"])
        row["max_seconds"] = round(max(row["max_seconds"], h["seconds"]), 2)
    return out


def pct(values: list[float], p: float) -> float | None:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] if values else None


def table(records, rss, hostile, start: float, end: float, width: float) -> list[dict]:
    rows = []
    n = max(1, round((end - start) / width))  # the last window takes the stragglers answered after the end
    for w in range(n):
        lo, hi = start + w * width, start + (w + 1) * width if w < n - 1 else float("inf")
        mine = [r for r in records if lo <= r[0] < hi]
        lat = [r[1] for r in mine if r[2] == "ok"]
        mem = [m for t, m in rss if lo <= t < hi]
        rows.append({"window": w + 1, "requests": len(mine), "images": len(lat),
                     "rejected_429": sum(r[2] == "rejected_429" for r in mine),
                     "failed": sum(r[2] not in ("ok", "rejected_429") for r in mine),
                     "hostile": sum(lo <= h["at"] < hi for h in hostile),
                     "p50_s": pct(lat, 0.5), "p90_s": pct(lat, 0.9),
                     # RSS sampled each second: its floor is what the server keeps; above it, what is in flight
                     # (a LoRA switch on onnxruntime's CPU backend rebuilds the session: ~100 MB for a moment)
                     "rss_mb": min(mem) / 2**20 if mem else None,
                     "rss_mean_mb": sum(mem) / len(mem) / 2**20 if mem else None,
                     "rss_max_mb": max(mem) / 2**20 if mem else None})
    return rows


def sample_rss(client: Client, out: list, stop: threading.Event, every: float = 1.0) -> None:
    while not stop.wait(every):
        try:
            value = client.rss()
        except OSError:
            continue
        if value:
            out.append((time.monotonic(), value))


def start_server(args, key: str | None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "zimage_trt.cli", "serve", "--bundle", args.bundle, "--backend", args.backend,
           "--device", args.device, "--host", "127.0.0.1", "--port", str(port), "--queue-size", str(args.queue_size)]
    for item in args.lora or []:
        cmd += ["--lora", item]
    if args.engines:
        cmd += ["--engines", args.engines]
    env = dict(os.environ, ZIMAGE_TRT_API_KEYS=key) if key else None  # the key stays out of the process list
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env), port


def soak_verdict(rows: list[dict], rss_tolerance: float, latency_tolerance: float) -> dict:
    first, last = rows[0], rows[-1]
    # Flat: the last window's floor at most rss_tolerance above the first's (below it is memory handed back)
    rss_flat = bool(first["rss_mb"] and last["rss_mb"]) and last["rss_mb"] / first["rss_mb"] - 1 <= rss_tolerance

    def stable(key):
        a, b = first[key], last[key]
        return a is not None and b is not None and abs(b - a) <= latency_tolerance * a + LATENCY_SLACK

    return {"rss_flat": rss_flat, "latency_stable": stable("p50_s") and stable("p90_s"),
            "rss_first_mb": first["rss_mb"], "rss_last_mb": last["rss_mb"]}


def report_kinds(r: dict):
    return sorted(r.get("hostile_by_kind", {}).items())


def print_report(r: dict, rows: list[dict]) -> None:
    print(f"{r['sent']} requests from {r['clients']} clients in {r['seconds']:.1f} s "
          f"(server holds {r['server_capacity_in_flight']}; one request alone {r['service_time_s']:.2f} s)")
    print(f"  images {r['ok']}  429 {r['rejected_429']}  503 {r['rejected_503']}  5xx {r['errors_5xx']}  "
          f"lost {r['lost']}  malformed {r['malformed']}  429s retried {r['retries_after_429']}  "
          f"hostile {r['hostile_sent']} "
          f"(answered as expected: {r['hostile_ok']})")
    if r["ok"]:
        print(f"  latency p50 {r['p50_s']:.2f} s  p90 {r['p90_s']:.2f} s  p99 {r['p99_s']:.2f} s  "
              f"throughput {r['throughput_images_per_s']:.2f} images/s")
    if r.get("rss_before_mb"):
        print(f"  server RSS {r['rss_before_mb']:.0f} MB -> {r['rss_after_mb']:.0f} MB")
    if r.get("soak"):
        print("  window | requests | images | 429 | failed | hostile | p50 s | p90 s | RSS MB floor / mean / peak")
        for w in rows:
            p50, p90 = (f"{w[k]:.2f}" if w[k] is not None else "-" for k in ("p50_s", "p90_s"))
            rss = " / ".join(f"{w[k]:.0f}" if w[k] is not None else "-"
                             for k in ("rss_mb", "rss_mean_mb", "rss_max_mb"))
            print(f"  {w['window']:6} | {w['requests']:8} | {w['images']:6} | {w['rejected_429']:3} | "
                  f"{w['failed']:6} | {w['hostile']:7} | {p50:>5} | {p90:>5} | {rss}")
        for kind, row in report_kinds(r):
            print(f"  hostile {kind}: {row['ok']}/{row['sent']} answered {row['expect']}, "
                  f"slowest {row['max_seconds']} s")
        print(f"  RSS floor, first vs last window: {'flat' if r['rss_flat'] else 'NOT FLAT'}; p50/p90: "
              f"{'stable' if r['latency_stable'] else 'NOT STABLE'}; server alive: {r['alive']}")
    print("PASSED" if r["passed"] else "FAILED")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    where.add_argument("--bundle", help="start `zimage-trt serve` on this bundle, on a free loopback port")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--engines")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--lora", action="append", metavar="NAME=FILE", help="with --bundle: a LoRA for the server")
    ap.add_argument("--api-key", help="with --url: the server's key (default: ZIMAGE_TRT_API_KEY); with --bundle a "
                    "random key is made")
    ap.add_argument("--queue-size", type=int, default=2, help="queue of the server this script starts (default 2)")
    ap.add_argument("--overload", type=float, default=4.0, help="offered load / what the server holds (default 4)")
    ap.add_argument("--requests", type=int, default=40, help="requests in all (default 40; not with --minutes)")
    ap.add_argument("--time-limit", type=float, default=120.0,
                    help="stop sending after this many seconds (default 120)")
    ap.add_argument("--minutes", type=float, help="soak: send for this many minutes (mixed and hostile requests)")
    ap.add_argument("--warmup", type=float, metavar="S", help="soak: seconds of full load before the measured "
                    "minutes (default 60, or 10 for a soak under 4 minutes)")
    ap.add_argument("--hostile", type=float, help="share of hostile requests (default 0.05 with --minutes, else 0)")
    ap.add_argument("--rss-tolerance", type=float, default=RSS_FLAT,
                    help="soak: how far the last window's RSS floor may rise above the first's (default 0.02)")
    ap.add_argument("--latency-tolerance", type=float, default=LATENCY_DRIFT,
                    help="soak: p50/p90, last vs first window, as a fraction (+0.25 s) (default 0.25)")
    ap.add_argument("--steps", type=int, default=9, help="num_inference_steps of each request (default 9)")
    ap.add_argument("--json", help="write the report here")
    return ap, ap.parse_args()


def main() -> int:
    ap, args = parse_args()
    server = None
    if args.bundle:
        key = secrets.token_urlsafe(24)
        server, port = start_server(args, key)
        host = "127.0.0.1"
    else:
        url = urlparse(args.url)
        if url.hostname not in LOOPBACK:
            ap.error(f"{args.url}: only loopback addresses (127.0.0.1, localhost, ::1) are load-tested")
        host, port, key = url.hostname, url.port or 80, args.api_key or os.environ.get("ZIMAGE_TRT_API_KEY")
    soak = args.minutes is not None
    seconds = 60 * args.minutes if soak else args.time_limit
    client = Client(host, port, timeout=seconds + 120, key=key)
    rss: list = []
    stop = threading.Event()
    try:
        health = wait_ready(client, 300)
        status, _, card = client.request("GET", "/v1/models")
        card = json.loads(card)["data"][0] if status == 200 else None
        limits = (card or {}).get("limits") or {"body_timeout_s": 10, "header_timeout_s": 10,
                                                 "max_prompt_chars": 32000}
        mix = Mix(health, card, args.steps)
        t0 = time.monotonic()
        body, size, fmt = mix.body(0)
        status, headers, raw = client.request("POST", "/v1/images/generations", dict(body, size="auto",
                                                                                     output_format="png"))
        service_time = time.monotonic() - t0
        if classify(status, headers, raw, tuple(int(v) for v in health["size"].split("x"))) != "ok":
            raise SystemExit(f"a single request failed: {status} {raw[:200]!r}")
        clients = max(1, round(args.overload * (args.queue_size + 1)))
        if soak:  # each size at its heaviest and its lightest, then the full load unrecorded: steady state
            for i, _ in enumerate(mix.sizes):
                client.request("POST", "/v1/images/generations", mix.body(i, heavy=True)[0])
                client.request("POST", "/v1/images/generations", mix.body(i)[0])
            warm = args.warmup if args.warmup is not None else (60.0 if seconds >= 240 else 10.0)
            if warm > 0:
                Soak(client, mix, limits, 0.0, key, retry=True).run(clients, None, warm)
        rss.append((time.monotonic(), client.rss()))
        sampler = threading.Thread(target=sample_rss, args=(client, rss, stop), daemon=True)
        sampler.start()
        hostile = args.hostile if args.hostile is not None else (0.05 if soak else 0.0)
        run = Soak(client, mix, limits, hostile, key, retry=soak)
        start = run.run(clients, None if soak else args.requests, seconds)
        end = time.monotonic()
        stop.set()
        rss.append((end, client.rss()))
        alive = client.request("GET", "/health")[0] == 200 and (server is None or server.poll() is None)
    finally:
        stop.set()
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    counts = {k: sum(r[2] == k for r in run.records) for k in
              ("ok", "rejected_429", "rejected_503", "rejected_5xx", "malformed", "lost")}
    lat = [r[1] for r in run.records if r[2] == "ok"]
    report = dict(sent=run.sent, **counts, seconds=end - start, clients=clients,
                  server_capacity_in_flight=args.queue_size + 1, service_time_s=service_time,
                  throughput_images_per_s=counts["ok"] / (end - start), p50_s=pct(lat, 0.5), p90_s=pct(lat, 0.9),
                  p99_s=pct(lat, 0.99), retries_after_429=run.retries, hostile_sent=len(run.hostile_results),
                  hostile_ok=sum(h["ok"] for h in run.hostile_results),
                  hostile_failures=[h for h in run.hostile_results if not h["ok"]][:10],
                  hostile_by_kind=by_kind(run.hostile_results), alive=alive,
                  rss_before_mb=rss[0][1] / 2**20 if rss[0][1] else None,
                  rss_after_mb=rss[-1][1] / 2**20 if rss[-1][1] else None, soak=soak)
    report["errors_5xx"] = counts["rejected_5xx"] + (counts["rejected_503"] if soak else 0)
    before, after = rss[0][1], rss[-1][1]
    report["memory_flat"] = not before or after - before <= max(MEMORY_SLACK, 0.10 * before)
    good = (counts["lost"] == 0 and counts["malformed"] == 0 and counts["ok"] > 0 and counts["rejected_5xx"] == 0
            and report["hostile_ok"] == report["hostile_sent"] and alive)
    rows = []
    if soak:
        width = 60.0 if seconds >= 240 else seconds / 2
        rows = table(run.records, rss[1:-1] or rss, run.hostile_results, start, start + seconds, width)
        report.update(soak_verdict(rows, args.rss_tolerance, args.latency_tolerance), windows=rows,
                      rss_samples=[(round(t - start, 1), round(m / 2**20, 1)) for t, m in rss if m])
        report["passed"] = good and report["errors_5xx"] == 0 and report["rss_flat"] and report["latency_stable"]
    else:
        report["passed"] = good and report["memory_flat"]
    print_report(report, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
