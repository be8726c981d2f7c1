"""`zimage-trt serve`: an OpenAI-compatible image API around the runtime. This module is the app and its routes.

    POST /v1/images/generations   {"prompt", "n", "size", "response_format": "b64_json", "output_format",
                                   "output_compression", "seed", "num_inference_steps", "guidance_scale",
                                   "negative_prompt", "cfg_normalization", "cfg_truncation", "lora", "lora_scale",
                                   "user", "moderation"}
    GET  /v1/models               the bundle: sizes, pipelines, precisions, LoRAs
    GET  /health                  200 once the engines are loaded and warmed (with the sizes served), 503 before;
                                  open to load balancers even with keys
    GET  /metrics                 Prometheus; needs a key when the server has keys, unless --metrics-public

A request is checked in this order, each step bounded, and refused at the first failure in the OpenAI error shape:
its key (401, serve_auth), its body's size and read time (413, 408, serve_limits), its JSON and fields (400,
serve_requests; the prompt's tokens counted on a bounded prefix, serve_tokens). Then it waits in the bounded queue
of the one worker thread that runs the runtime (serve_worker): a full queue answers 429 with Retry-After, a request
still waiting at its deadline 503, and a client that disconnects while queued is skipped. On shutdown the server
stops taking requests and finishes the ones it has. Prompts longer than the model's 512 tokens are truncated, as
the reference pipeline truncates them; the response says so (`prompt_truncated`).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) as objects.
import asyncio
import base64
import io
import json
import logging
import time

from zimage_trt.common.errors import UserError

from .serve_auth import KeyCheck, auth_error, check_exposure
from .serve_limits import guarded_protocol, read_body
from .serve_options import ApiError, ServeOptions
from .serve_requests import RequestParser
from .serve_worker import ImageService, Job

__all__ = ["ApiError", "ImageService", "Job", "ServeOptions", "create_app", "serve"]
log = logging.getLogger("zimage_trt.server")
ENDPOINTS = "POST /v1/images/generations, GET /v1/models, GET /health, GET /metrics"
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(pixels, output_format: str = "png", quality: int = 100) -> str:
    """An HxWx3 uint8 image as base64 PNG, JPEG or WebP (quality: output_compression, for JPEG and WebP)."""
    from PIL import Image

    buf = io.BytesIO()
    options = {} if output_format == "png" else {"quality": quality}
    Image.fromarray(pixels).save(buf, format=PIL_FORMATS[output_format], **options)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def parse_json(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, nesting too deep, a 5,000-digit number
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise ApiError(400, f"the request body is not valid JSON ({why})", code="invalid_json") from None


def create_app(opts: ServeOptions):
    """The FastAPI app; the runtime loads at startup (in a thread, so /health answers 503 meanwhile)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    service = ImageService(opts)
    parser = RequestParser(service, opts)
    keys = KeyCheck(opts.api_keys)

    @asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(service.load)
        yield
        await asyncio.to_thread(service.stop)

    app = FastAPI(title="zimage-trt", lifespan=lifespan)
    app.state.service = service

    def error_response(err: ApiError, started: float | None = None) -> JSONResponse:
        service.metrics.rejected.labels(err.code or "invalid").inc()
        if started is not None:
            service.metrics.latency.labels(str(err.status)).observe(time.monotonic() - started)
        headers = dict(err.headers, **{"X-Served-By": service.served_by})
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    def authorize(request: Request) -> None:
        if keys.enabled:
            reason = keys.failure(request.headers.get("authorization"))
            if reason:
                service.metrics.auth_failures.labels(reason).inc()
                raise auth_error(reason)

    async def admit(request: Request) -> tuple[Job, object]:
        """Key, body, fields, queue: the job and its validated request (the raw body is not kept past here)."""
        authorize(request)
        body = parse_json(await read_body(request, opts.max_body_bytes, opts.body_timeout_s))
        if not service.ready:
            raise ApiError(503, "the server is not ready", code="unavailable", kind="server_error")
        req = parser.check(body)
        service.check_room()  # a full queue answers before the prompt is tokenized
        req = await parser.tokenize(req)
        return service.submit(req, asyncio.get_running_loop()), req

    async def wait(job: Job, request: Request) -> bool:
        """True once the job is answered; False if the client left first (the worker then skips the job)."""
        while not job.future.done():
            await asyncio.wait({job.future}, timeout=0.1)
            if job.future.done():
                break
            if await request.is_disconnected():
                job.cancelled = "disconnected"
                service.metrics.rejected.labels("disconnected").inc()
                return False
            if time.monotonic() > job.deadline:
                job.cancelled = "deadline"
                raise ApiError(503, f"no image within the {opts.timeout_s:g} s deadline", code="timeout",
                               kind="server_error")
        return True

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        started = time.monotonic()
        try:
            job, req = await admit(request)
            if not await wait(job, request):
                return Response(status_code=499)
            images = job.future.result()  # raises the worker's ApiError
            data = [{"b64_json": await asyncio.to_thread(encode_image, pixels, req.output_format, req.quality),
                     "seed": seed} for pixels, seed in zip(images, job.seeds)]
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            service.metrics.rejected.labels("disconnected").inc()
            return Response(status_code=499)
        except ApiError as err:
            return error_response(err, started)
        except Exception:  # noqa: BLE001 - a bug: logged with its traceback, answered in the error shape
            log.exception("unexpected error in /v1/images/generations")
            return error_response(ApiError(500, "internal error", code="internal", kind="server_error"), started)
        service.metrics.latency.labels("200").observe(time.monotonic() - started)
        body = {
            "created": int(time.time()), "data": data, "seed": req.seed,
            "size": f"{req.size[0]}x{req.size[1]}", "output_format": req.output_format,
            "num_inference_steps": req.steps, "prompt_tokens": req.prompt_tokens,
            "prompt_truncated": req.prompt_truncated,
        }
        return JSONResponse(body, headers={"X-Served-By": service.served_by})

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            authorize(request)
            if not service.ready:
                raise ApiError(503, "the server is not ready", code="unavailable", kind="server_error")
        except ApiError as err:
            return error_response(err)
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/health")
    async def health():
        if service.ready:
            info = service.sizes_info()
            # "size": the default (opt) size, for clients that send "auto"; "sizes": everything served
            return {"status": "ready", "backend": opts.backend, "size": info["opt"], "sizes": info,
                    "queue_depth": service.queue.qsize()}
        status = "draining" if service.draining else "loading"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def metrics(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if not opts.metrics_public:
            try:
                authorize(request)
            except ApiError as err:
                return error_response(err)
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        """Routing's own answers (404, 405) in the OpenAI shape too."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        err = ApiError(exc.status_code, f"{exc.detail}: this server has {ENDPOINTS}", code=code,
                       headers=dict(exc.headers or {}))
        return error_response(err)

    return app


def serve(opts: ServeOptions, host: str, port: int) -> None:
    """Run the app with uvicorn until SIGINT/SIGTERM; in-flight requests are finished first."""
    import uvicorn

    from zimage_trt.runtime.bundle import Bundle
    from zimage_trt.sessions import resolve_device

    # A bad path or device fails here, with one line, before uvicorn starts (inside its startup it would be a
    # traceback and "Application startup failed").
    Bundle.open(opts.bundle)
    resolve_device(opts.device)
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port")
    check_exposure(host, opts.api_keys, opts.no_auth)
    app = create_app(opts)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=opts.timeout_s,
                http=guarded_protocol(opts, app.state.service.metrics), ws="none",
                timeout_keep_alive=opts.keep_alive_s)
