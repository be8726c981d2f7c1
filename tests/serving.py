"""Start `zimage-trt serve` on a free loopback port for a test, and talk to it (the load test's client)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("loadtest", Path(__file__).resolve().parents[1] / "scripts" / "loadtest.py")
loadtest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loadtest)


class Server:
    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.port = proc, port
        self.client = loadtest.Client("127.0.0.1", port, timeout=120)

    def post(self, body, raw: bytes | None = None):
        """(status, headers, parsed JSON or None)."""
        if raw is not None:
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            conn.request("POST", "/v1/images/generations", body=raw, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            status, headers, data = resp.status, dict(resp.getheaders()), resp.read()
            conn.close()
        else:
            status, headers, data = self.client.request("POST", "/v1/images/generations", body)
        try:
            return status, headers, json.loads(data)
        except ValueError:
            return status, headers, None

    def get(self, path):
        return self.client.request("GET", path)

    def metric(self, name: str, **labels) -> float:
        """A sample's value from /metrics (0 if absent)."""
        _, _, body = self.get("/metrics")
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in body.decode().splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == name or key == f"{name}{{{want}}}":
                return float(value)
        return 0.0


@contextlib.contextmanager
def running_server(bundle, *extra: str):
    port = loadtest.free_port()
    cmd = [sys.executable, "-m", "zimage_trt.cli", "serve", "--bundle", str(bundle), "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server = Server(proc, port)
    try:
        loadtest.wait_ready(server.client, 120)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
