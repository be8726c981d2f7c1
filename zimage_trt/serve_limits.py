"""Bounded input: the request body (size and read time, enforced while reading) and the connection itself (header
timeout, a cap on open connections, no draining of a body nobody will read).

uvicorn's own settings cover what they can: `timeout_keep_alive` (idle keep-alive), h11's 16 KiB cap on the request
line and headers. What uvicorn lacks is added by a subclass of its h11 protocol (GuardedProtocol):
- a header timeout: the request line and headers must be complete within header_timeout_s of the connection (or of
  the previous answer); uvicorn has none, and a client trickling a header byte a second would be held forever;
- a connection cap answered in the OpenAI error shape (uvicorn's limit_concurrency answers text/plain);
- an answer sent before the client finished its body (413, 408, 401, ...) ends the connection: the server sends a
  FIN after the answer and drops what still arrives for LINGER_S, then closes. Without it uvicorn reads the rest of a
  500 MB body to keep the connection alive, and a plain close would reset the connection before the client reads
  the answer.
"""

from __future__ import annotations

import asyncio
import json

from .serve_options import ApiError

LINGER_S = 2.0  # after an answer to an unfinished body: time the client gets to read it before the close


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over the server's limit of {limit} bytes (serve --max-body)",
                    code="request_too_large")


async def read_body(request, limit: int, timeout_s: float) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit` bytes, from Content-Length before reading
    or while streaming, and refused (408) if it has not all arrived `timeout_s` after the headers."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:  # h11 refuses a non-numeric length
        raise body_too_large(limit)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    body = bytearray()
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), max(0.0, deadline - loop.time()))
        except StopAsyncIteration:
            return bytes(body)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s (serve --body-timeout)",
                           code="request_timeout") from None
        body += chunk
        if len(body) > limit:
            raise body_too_large(limit)


def _raw_answer(status: int, reason: str, err: ApiError) -> bytes:
    """A whole HTTP answer as bytes, for a connection that has no request to answer through ASGI."""
    body = json.dumps(err.body()).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


def _over_capacity(limit: int):
    err = ApiError(503, f"the server has {limit} connections open, its limit; retry shortly",
                   code="too_many_connections", kind="server_error")
    body = json.dumps(err.body()).encode()

    async def app(scope, receive, send):  # the ASGI app of a connection over the cap: no route runs
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": body})

    return app


def guarded_protocol(opts, metrics):
    """uvicorn's h11 protocol with the header timeout, the connection cap and the lingering close above."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    busy = _over_capacity(opts.max_connections)
    slow = _raw_answer(408, "Request Timeout", ApiError(
        408, f"the request headers did not arrive within {opts.header_timeout_s:g} s", code="request_timeout"))

    class GuardedProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.header_timer = self.linger_timer = None
            self.lingering = False
            self.over_capacity = len(self.connections) > opts.max_connections
            if self.over_capacity:
                self.app = busy  # answered 503 once its headers are in, then closed
            self.arm_header_timer()

        def connection_lost(self, exc) -> None:
            self.disarm()
            if self.linger_timer is not None:
                self.linger_timer.cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self.lingering:  # after the answer, the rest of an unread body is dropped, not parsed
                super().data_received(data)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are complete: its body has its own deadline
                self.disarm()

        def on_response_complete(self) -> None:
            if self.over_capacity or self.conn.their_state is h11.SEND_BODY:
                self.linger("over_capacity" if self.over_capacity else "unread_body")
                return
            super().on_response_complete()
            if not self.transport.is_closing() and self.cycle is not None and self.cycle.response_complete:
                self.arm_header_timer()  # the next request on this connection is due within the header timeout

        def arm_header_timer(self) -> None:
            self.disarm()
            self.header_timer = self.loop.call_later(opts.header_timeout_s, self.headers_too_slow)

        def disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def headers_too_slow(self) -> None:
            self.header_timer = None
            if self.transport.is_closing():
                return
            metrics.connections_closed.labels("header_timeout").inc()
            if self.conn.trailing_data[0]:  # part of a request came: say why it is cut (an idle one just closes)
                self.transport.write(slow)
            self.transport.close()

        def linger(self, reason: str) -> None:
            metrics.connections_closed.labels(reason).inc()
            self.server_state.total_requests += 1
            self.lingering = True
            self.disarm()
            self._unset_keepalive_if_required()
            if self.transport.is_closing():
                return
            if self.transport.can_write_eof():
                self.transport.write_eof()  # FIN after the answer: the client stops sending and reads it
            self.flow.resume_reading()  # keep taking (and dropping) what is in flight, so the client is not stuck
            self.linger_timer = self.loop.call_later(LINGER_S, self.transport.close)

    return GuardedProtocol
