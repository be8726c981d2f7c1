"""Start `zimage-trt serve` on a free loopback port for a test, and talk to it (the load test's client); the
server's resident memory read from /proc."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "loadtest.py"
_spec = importlib.util.spec_from_file_location("loadtest", _SCRIPT)
loadtest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loadtest)


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, key: str | None = None, log: Path | None = None):
        self.proc, self.port, self.key, self.log = proc, port, key, log
        self.client = loadtest.Client("127.0.0.1", port, timeout=120, key=key)

    def post(self, body, raw: bytes | None = None, key: str | None = None):
        """(status, headers, parsed JSON or None); `key` overrides the server's key ("" sends none)."""
        client = self.client if key is None else loadtest.Client("127.0.0.1", self.port, 120, key=key or None)
        status, headers, data = client.request("POST", "/v1/images/generations", body, raw=raw)
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

    def memory_mb(self) -> dict:
        """The server's resident memory now and its peak (VmRSS, VmHWM), in MB."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024
        return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}

    def reset_peak(self) -> None:
        """Start the peak (VmHWM) over from the current RSS (Linux: clear_refs 5)."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")


@contextlib.contextmanager
def running_server(bundle, *extra: str, key: str | None = None, log: Path | None = None):
    """The server on a free port; `key`: its API key (through ZIMAGE_TRT_API_KEYS, as an operator would keep it
    out of the process list); `log`: a file for its stderr (readable while it runs), else a pipe."""
    port = loadtest.free_port()
    cmd = [sys.executable, "-m", "zimage_trt.cli", "serve", "--bundle", str(bundle), "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(port), *extra]
    env = dict(os.environ, ZIMAGE_TRT_API_KEYS=key) if key else None
    stderr = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 - closed below, after the server
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True, env=env)
    server = Server(proc, port, key, log)
    try:
        loadtest.wait_ready(server.client, 120)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
        if log:
            stderr.close()
