"""Loopback clients that drive `zimage-trt serve` for the load test, the soak and the tests: a JSON client, the
answer's check, a body streamed in chunks (200 MB without holding it), and clients that send a byte a second.

Only loopback addresses: these exist to test the project's own server.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import selectors
import socket
import threading
import time

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PATH = "/v1/images/generations"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_loopback(host: str) -> None:
    if host not in LOOPBACK:
        raise ValueError(f"{host}: only loopback addresses are driven")


class Client:
    def __init__(self, host: str, port: int, timeout: float, key: str | None = None):
        _check_loopback(host)
        self.host, self.port, self.timeout, self.key = host, port, timeout, key

    def headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self.key:
            h["Authorization"] = f"Bearer {self.key}"
        return h

    def request(self, method: str, path: str, body: dict | None = None, raw: bytes | None = None):
        """(status, headers with lower-case names, body bytes)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            data = raw if raw is not None else None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers=self.headers())
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
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


def classify(status: int, headers: dict, body: bytes, size: tuple[int, int], output_format: str = "png") -> str:
    """ok | rejected_429 | rejected_503 | rejected_5xx | malformed."""
    from PIL import Image

    try:
        doc = json.loads(body)
    except ValueError:
        return "malformed"
    if status == 200:
        try:
            image = Image.open(io.BytesIO(base64.b64decode(doc["data"][0]["b64_json"])))
            image.load()
        except Exception:  # noqa: BLE001 - any failure to decode is a malformed answer
            return "malformed"
        good = image.format == output_format.upper() and image.size == size and isinstance(doc.get("created"), int)
        return "ok" if good else "malformed"
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict) or not error.get("message"):
        return "malformed"
    if status == 429:
        return "rejected_429" if headers.get("retry-after", "").isdigit() else "malformed"
    if status == 503:
        return "rejected_503"
    return "rejected_5xx" if status >= 500 else "malformed"


def _head(host: str, key: str | None, framing: str) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return f"POST {PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}{framing}\r\n".encode()


def read_answer(sock: socket.socket, timeout: float = 30.0) -> tuple[int | None, dict | None]:
    """The status and JSON body of the answer on `sock` (None, None if the server closed without one)."""
    sock.settimeout(timeout)
    resp = http.client.HTTPResponse(sock)
    try:
        resp.begin()
        body = resp.read()
    except (OSError, http.client.HTTPException):
        return None, None
    try:
        return resp.status, json.loads(body)
    except ValueError:
        return resp.status, None


def _answered(sock: socket.socket) -> bool:
    """Has the server sent something (or closed)? poll, not select: a busy test process may hold fds past 1024."""
    return bool(_poll(sock, 0))


def _poll(sock: socket.socket, timeout_s: float):
    import select

    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return poller.poll(int(timeout_s * 1000))


def stream_body(host: str, port: int, total: int, key: str | None = None, declare: bool = False,
                chunk: int = 1 << 16) -> dict:
    """POST a JSON body of `total` bytes (a prompt of x's) in chunks, made as they are sent, chunked or with its
    Content-Length declared; stop sending as soon as the server answers. Returns status, code, sent, seconds."""
    _check_loopback(host)
    start = time.monotonic()
    sent = 0
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(_head(host, key, f"Content-Length: {total}\r\n" if declare else "Transfer-Encoding: chunked\r\n"))
        filler = b'{"prompt": "' + b"x" * (chunk - 12)
        try:
            while sent < total and not _answered(sock):
                data = filler[: total - sent]
                sock.sendall(data if declare else b"%x\r\n%s\r\n" % (len(data), data))
                sent += len(data)
                filler = b"x" * chunk
            if sent >= total and not declare:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server stopped reading; its answer is still there to read
        status, doc = read_answer(sock)
    code = (doc or {}).get("error", {}).get("code") if isinstance(doc, dict) else None
    return {"status": status, "code": code, "sent": sent, "seconds": time.monotonic() - start}


class Trickler:
    """Clients that send their request a byte a second, watched in one thread until the server answers or closes.
    mode "body": the headers whole (Content-Length 1 MiB), then the body a byte at a time; mode "headers": the
    request line, then one header a byte at a time."""

    def __init__(self, host: str, port: int, key: str | None = None, interval: float = 1.0):
        _check_loopback(host)
        self.host, self.port, self.key, self.interval = host, port, key, interval
        self.lock = threading.Lock()
        self.live: dict[socket.socket, tuple] = {}  # sock -> (mode, started, limit, on_done)
        self.selector = selectors.DefaultSelector()
        self.results: list[dict] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="trickler", daemon=True)

    def start(self) -> "Trickler":
        self.thread.start()
        return self

    def add(self, mode: str, limit: float, on_done=None) -> None:
        """Open one trickling client; `limit`: seconds after which it counts as not cut (and is dropped)."""
        sock = socket.create_connection((self.host, self.port), timeout=10)
        first = (_head(self.host, self.key, f"Content-Length: {1 << 20}\r\n") + b'{"prompt": "' if mode == "body"
                 else f"POST {PATH} HTTP/1.1\r\nHost: {self.host}\r\nX-Slow: ".encode())
        sock.sendall(first)
        sock.setblocking(False)
        with self.lock:
            self.live[sock] = (mode, time.monotonic(), limit, on_done)
            self.selector.register(sock, selectors.EVENT_READ)

    def _done(self, sock: socket.socket, status: int | None, cut: bool) -> None:
        mode, started, _, on_done = self.live.pop(sock)
        self.selector.unregister(sock)
        sock.close()
        result = {"kind": f"trickle_{mode}", "status": status, "seconds": time.monotonic() - started, "cut": cut,
                  "expect": 408, "ok": cut and status == 408, "at": started}
        self.results.append(result)
        if on_done:
            on_done(result)

    def _loop(self) -> None:
        next_tick = time.monotonic()
        while not (self.stopping.is_set() and not self.live):
            with self.lock:
                events = self.selector.select(0) if self.live else []
                for key, _ in events:  # the server answered or closed: read what it said
                    key.fileobj.setblocking(True)
                    self._done(key.fileobj, read_answer(key.fileobj, 5.0)[0], True)
                now = time.monotonic()
                for sock, (_, started, limit, _) in list(self.live.items()):
                    if now - started > limit:
                        self._done(sock, None, False)
                if now >= next_tick:
                    next_tick = now + self.interval
                    for sock in self.live:
                        try:
                            sock.send(b"a")
                        except OSError:
                            pass  # closed by the server: the selector reports it on the next pass
            time.sleep(0.02)

    def finish(self, timeout: float = 120.0) -> list[dict]:
        """Wait until every client is cut (or past its limit) and return the results."""
        self.stopping.set()
        self.thread.join(timeout)
        return self.results
