"""`zimage-trt serve`: an OpenAI-compatible image API around the runtime.

    POST /v1/images/generations   {"prompt", "n", "size", "response_format": "b64_json", "seed", "num_inference_steps",
                                   "guidance_scale", "negative_prompt", "cfg_normalization", "cfg_truncation",
                                   "lora", "lora_scale"}
    GET  /health                  200 once the engines are loaded and warmed (with the sizes served), 503 before
    GET  /metrics                 Prometheus: request latency, per-stage latency, queue depth, rejections

One process owns the GPU: requests are validated in the event loop (a bad one never reaches the GPU), then wait
in a bounded queue for the single worker thread that runs the runtime. A full queue answers 429 with
Retry-After; a request still waiting at its deadline answers 503 and is skipped by the worker; a client that
disconnects while queued is skipped too. On shutdown the server stops taking requests and finishes the ones it
has. Prompts longer than the model's 512 tokens are truncated, as the reference pipeline truncates them; the
response says so (`prompt_truncated`).
"""


import asyncio
import base64
import io
import json
import os
import queue
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from zimage_trt.common.errors import UserError

MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 30.0  # far beyond any useful scale; a larger one is a client's mistake


@dataclass
class ServeOptions:
    bundle: str
    backend: str = "onnxruntime"
    engines: str | None = None
    model: str | None = None
    device: str = "auto"
    torch_dtype: str = "fp32"
    queue_size: int = 8  # requests waiting for the GPU, beyond the one it runs
    timeout_s: float = 120.0  # a request's deadline, from arrival
    max_n: int = 4
    max_steps: int = 50
    warmup: bool = True
    loras: dict | None = None  # name -> converted LoRA file (`zimage-trt lora`), loaded at start
    vram: str = "all"  # all | sequential (runtime.pipeline.VRAM_MODES)
    weight_budget: int | None = None  # bytes of transformer weights on the GPU (engines with weight streaming)


class ApiError(Exception):
    """An error answer in the OpenAI shape."""

    def __init__(self, status: int, message: str, param=None, code=None, kind="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    prompt: str
    seeds: list[int]
    steps: int
    size: tuple[int, int]  # (width, height)
    guidance: object  # runtime.pipeline.Guidance or None
    lora: tuple  # (name, strength), or () for the base weights
    deadline: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cancelled: str = ""  # why the HTTP side gave up on it: "disconnected" | "deadline"


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
        self.latency = Histogram("zimage_request_latency_seconds", "Request latency, arrival to answer", ["status"], buckets=buckets, registry=r)
        self.stage = Histogram("zimage_stage_latency_seconds", "Device time per stage of a generation", ["stage"], buckets=buckets, registry=r)
        self.queue_depth = Gauge("zimage_queue_depth", "Requests waiting for the GPU", registry=r)
        self.rejected = Counter("zimage_rejected_requests_total", "Requests answered without an image", ["reason"], registry=r)
        self.images = Counter("zimage_images_total", "Images generated for requests (warm-up excluded)", registry=r)
        self.skipped = Counter("zimage_skipped_jobs_total", "Queued requests dropped before the GPU saw them", ["reason"], registry=r)
        self.lora_switch = Histogram("zimage_lora_switch_seconds", "Time to change the LoRA in the transformer's weights (one weight update)", buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 20), registry=r)
        self.graph_failures = Gauge("zimage_cuda_graph_failures", "CUDA graph captures refused or failed (the loop then runs eagerly)", registry=r)


class ImageService:
    """The runtime behind a bounded queue and one worker thread."""

    def __init__(self, opts: ServeOptions):
        self.opts = opts
        self.metrics = Metrics()
        self.queue: queue.Queue = queue.Queue()
        # Admission: a job holds a slot from submit until the worker is done with it, released *before* its answer
        # is sent, so a client (or Ray's router, at max_ongoing_requests = queue_size + 1) that sends the next
        # request on an answer always finds a slot; the queue's own length lags behind the worker.
        self.slots = threading.BoundedSemaphore(opts.queue_size + 1)
        self.ready = False
        self.draining = False
        self.worker: threading.Thread | None = None
        self.runtime = None
        self.current_lora: tuple = ()  # the (name, strength) in the transformer's weights now; () the base
        self.avg_seconds = 1.0  # running estimate of one job, for Retry-After
        self.served_by = f"{socket.gethostname()}:{os.getpid()}"

    # ------------------------------------------------------------ lifecycle
    def load(self) -> None:
        from zimage_trt.runtime.bundle import Bundle
        from zimage_trt.runtime.pipeline import ZImageRuntime
        from zimage_trt.sessions import open_sessions, resolve_device

        o = self.opts
        self.bundle = Bundle.open(o.bundle)
        device = resolve_device(o.device)
        _use_device(device)  # engines and torch allocations land on the current device of the loading thread
        sessions = open_sessions(o.backend, self.bundle, device, model_dir=o.model, engines=o.engines,
                                 torch_dtype=o.torch_dtype, weight_budget=o.weight_budget, vram=o.vram)
        self.runtime = ZImageRuntime(self.bundle, sessions, device, vram=o.vram)
        from zimage_trt.runtime.memory import describe, vram_plan

        print(describe(vram_plan(self.runtime), o.vram), flush=True)
        self.sizes = self.runtime.sizes  # the bundle's range, narrowed to what the engines cover
        self.loras = self._load_loras()
        if o.warmup:
            start = time.monotonic()
            self.runtime.generate("warm-up", 0)
            self.avg_seconds = time.monotonic() - start
        self.worker = threading.Thread(target=self._work, name="zimage-gpu-worker", daemon=True)
        self.worker.start()
        self.ready = True

    def stop(self) -> None:
        """Stop taking requests; the worker finishes what is queued and running, then exits."""
        self.draining = True
        self.ready = False
        if self.worker is not None:
            self.queue.put(None)  # after everything queued
            self.worker.join()
            self.worker = None
        if self.runtime is not None:  # its tokenizer stays for a late request's validation (answered 503)
            self.runtime.close()  # engines, contexts, the shared block, graphs (and the RTX runtime cache, saved)

    def _load_loras(self) -> dict:
        """The LoRAs a request may pick by name, read once at start (a bad file stops the server there)."""
        from zimage_trt.runtime.lora import load_lora

        if self.opts.loras and not hasattr(self.runtime.transformer, "set_weights"):
            raise UserError(f"--lora: the {self.opts.backend} backend cannot change weights at run time")
        return {name: load_lora(path, self.bundle) for name, path in (self.opts.loras or {}).items()}

    def _use_lora(self, lora: tuple) -> None:
        """Switch the transformer's weights to this (name, strength), if they are not already: one weight update."""
        if lora == self.current_lora:
            return
        stack = [(self.loras[lora[0]], lora[1])] if lora else []
        self.metrics.lora_switch.observe(self.runtime.set_loras(stack))
        self.current_lora = lora

    # ------------------------------------------------------------ the GPU side
    def _work(self) -> None:
        from zimage_trt.runtime.timing import Clock

        _use_device(self.runtime.device)  # this thread's CUDA calls go to the runtime's GPU (--device cuda:N)
        clock = Clock(self.runtime.device, self.runtime.stream)
        while True:
            job = self.queue.get()
            if job is None:
                return
            self.metrics.queue_depth.set(self.queue.qsize())
            if job.cancelled:
                self.metrics.skipped.labels(job.cancelled).inc()
                self.slots.release()
                continue
            if time.monotonic() > job.deadline:
                self.metrics.skipped.labels("deadline").inc()
                self._answer(job, None, ApiError(
                    503, "the request waited past its deadline", code="timeout", kind="server_error"))
                continue
            start = time.monotonic()
            try:
                images = [self._generate(job, seed, clock) for seed in job.seeds]
                result, error = images, None
            except Exception as exc:  # noqa: BLE001 - the request fails, the worker lives on
                result, error = None, ApiError(500, f"generation failed: {exc}", code="internal", kind="server_error")
            self.avg_seconds = 0.8 * self.avg_seconds + 0.2 * (time.monotonic() - start)
            self._answer(job, result, error)

    def _answer(self, job: Job, result, error) -> None:
        self.slots.release()  # first: the next request may arrive the moment this answer is sent
        job.loop.call_soon_threadsafe(_resolve, job.future, result, error)

    def _generate(self, job: Job, seed: int, clock):
        rt = self.runtime
        marks = {}
        self._use_lora(job.lora)
        begin = clock.start()
        rt.use_size(*job.size)
        lpad = rt.encode_prompt(rt.tokenize(job.prompt))
        cfg = rt.encode_guidance(job.guidance, job.steps)
        marks["text_encoder"] = clock.stop(begin)
        rt.init_latents(seed)
        begin = clock.start()
        rt.denoise(lpad, job.steps, cfg)
        marks["denoise"] = clock.stop(begin)
        begin = clock.start()
        pixels = rt.decode()  # syncs: every mark above is complete now
        marks["vae_decode"] = clock.stop(begin)
        for stage, elapsed in marks.items():
            self.metrics.stage.labels(stage).observe(elapsed() / 1e3)
        self.metrics.graph_failures.set(rt.cuda_graph_failures)
        self.metrics.images.inc()
        return pixels

    # ------------------------------------------------------------ the HTTP side
    def validate(self, body) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string", "prompt", "invalid_prompt")
        if not prompt.strip():
            raise ApiError(400, "'prompt' is empty", "prompt", "invalid_prompt")
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.opts.max_n:
            raise ApiError(400, f"'n' must be an integer from 1 to {self.opts.max_n}", "n", "invalid_n")
        size = self.parse_size(body.get("size", "auto"))
        fmt = body.get("response_format", "b64_json")
        if fmt != "b64_json":
            raise ApiError(400, f"response_format {fmt!r} is not supported; use 'b64_json'", "response_format",
                           "unsupported_response_format")
        steps = body.get("num_inference_steps", self.runtime.default_steps)
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= self.opts.max_steps:
            raise ApiError(400, f"'num_inference_steps' must be an integer from 1 to {self.opts.max_steps}",
                           "num_inference_steps", "invalid_steps")
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**31)
        elif not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED - self.opts.max_n:
            raise ApiError(400, "'seed' must be a non-negative integer", "seed", "invalid_seed")
        try:
            n_tokens = len(self.runtime.tokenizer.encode(prompt, truncate=False))
        except UserError as exc:  # text the tokenizer cannot take is the client's mistake, never a 500
            raise ApiError(400, str(exc), "prompt", "invalid_prompt") from None
        limit = self.runtime.tokenizer.max_length
        return {
            "prompt": prompt,
            "n": n,
            "size": size,
            "steps": steps,
            "guidance": self.parse_guidance(body),
            "lora": self.parse_lora(body),
            "seed": seed,
            "prompt_tokens": min(n_tokens, limit),
            "prompt_truncated": n_tokens > limit,
        }

    def parse_lora(self, body: dict) -> tuple:
        """"lora": a name given to `serve --lora NAME=FILE`, "lora_scale": its strength (default 1.0)."""
        from zimage_trt.runtime.lora import check_strength

        name, scale = body.get("lora"), body.get("lora_scale", 1.0)
        if name is None:
            if "lora_scale" in body and scale is not None:
                raise ApiError(400, "'lora_scale' needs 'lora'", "lora_scale", "invalid_lora_scale")
            return ()
        served = ", ".join(sorted(self.loras)) or "none (start the server with --lora NAME=FILE)"
        if not isinstance(name, str) or name not in self.loras:
            raise ApiError(400, f"'lora' must be one of the server's LoRAs: {served}", "lora", "unknown_lora")
        try:
            scale = check_strength(1.0 if scale is None else scale, "'lora_scale'")
        except UserError as exc:
            raise ApiError(400, str(exc), "lora_scale", "invalid_lora_scale") from None
        return (name, scale) if scale != 0 else ()

    def parse_guidance(self, body: dict):
        """guidance_scale (default 0: none, the Turbo model's setting), negative_prompt, cfg_normalization and
        cfg_truncation, as diffusers' ZImagePipeline takes them; None when guidance is off."""
        from zimage_trt.runtime.pipeline import Guidance

        def number(name, default, lo, hi):
            value = body.get(name, default)
            if value is None:
                value = default
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ApiError(400, f"'{name}' must be a number from {lo:g} to {hi:g}", name, f"invalid_{name}")
            return float(value)

        scale = number("guidance_scale", 0.0, 0.0, MAX_GUIDANCE)
        normalization = number("cfg_normalization", 0.0, 0.0, 10.0)
        truncation = number("cfg_truncation", 1.0, 0.0, 1e9)
        negative = body.get("negative_prompt", "")
        if negative is None:
            negative = ""
        if not isinstance(negative, str):
            raise ApiError(400, "'negative_prompt' must be a string", "negative_prompt", "invalid_negative_prompt")
        if scale == 0.0:
            return None
        try:
            self.runtime.tokenizer.encode(negative, allow_empty=True)
        except UserError as exc:
            raise ApiError(400, str(exc), "negative_prompt", "invalid_negative_prompt") from None
        return Guidance(scale, negative, normalization, truncation)

    def parse_size(self, size) -> tuple[int, int]:
        """'auto' (the opt size) or 'WIDTHxHEIGHT' within the served range; a 400 that states the range."""
        from zimage_trt.runtime.sizes import parse_size

        if size is None or size == "auto":
            return self.sizes.opt
        try:
            width, height = parse_size(size) if isinstance(size, str) else (None, None)
        except UserError:
            width = None
        if width is None:
            raise ApiError(400, f"'size' must be 'auto' or 'WIDTHxHEIGHT' such as '1024x1024'; served: "
                           f"{self.sizes.describe()}", "size", "invalid_size")
        try:
            self.sizes.check(width, height, "the served range")  # off the 16-pixel grid or out of range
        except UserError as exc:
            raise ApiError(400, str(exc), "size", "unsupported_size") from None
        return width, height

    def sizes_info(self) -> dict:
        from zimage_trt.runtime.sizes import SIDE_MULTIPLE, format_size

        r = self.sizes
        return {"min": format_size(r.min_width, r.min_height), "max": format_size(*r.largest),
                "opt": format_size(*r.opt), "multiple": SIDE_MULTIPLE, "text": r.describe()}

    def submit(self, req: dict, loop) -> Job:
        if self.draining or not self.ready:
            raise ApiError(503, "the server is not ready" if not self.draining else "the server is shutting down",
                           code="unavailable", kind="server_error")
        job = Job(req["prompt"], [req["seed"] + i for i in range(req["n"])], req["steps"], req["size"],
                  req["guidance"], req["lora"], time.monotonic() + self.opts.timeout_s, loop, loop.create_future())
        if not self.slots.acquire(blocking=False):
            retry = max(1, round(self.avg_seconds * (self.opts.queue_size + 1)))
            raise ApiError(429, f"the queue is full ({self.opts.queue_size} waiting); retry in about {retry} s",
                           code="queue_full", kind="rate_limit_error", headers={"Retry-After": str(retry)})
        self.queue.put(job)
        self.metrics.queue_depth.set(self.queue.qsize())
        return job


def _use_device(device) -> None:
    """Make `device` this thread's current CUDA device (a no-op on a CPU): TensorRT places engines, and torch
    places unqualified allocations, on the current device, which is per thread."""
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)


def _resolve(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _png_b64(pixels) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def create_app(opts: ServeOptions):
    """The FastAPI app; the runtime loads at startup (in a thread, so /health answers 503 meanwhile)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    service = ImageService(opts)

    @asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(service.load)
        yield
        await asyncio.to_thread(service.stop)

    app = FastAPI(title="zimage-trt", lifespan=lifespan)
    app.state.service = service

    def error_response(err: ApiError, started: float) -> JSONResponse:
        reason = err.code or "invalid"
        service.metrics.rejected.labels(reason).inc()
        service.metrics.latency.labels(str(err.status)).observe(time.monotonic() - started)
        headers = dict(err.headers, **{"X-Served-By": service.served_by})
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        started = time.monotonic()
        try:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, or nesting too deep to parse
                why = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
                raise ApiError(400, f"the request body is not valid JSON ({why})", code="invalid_json") from None
            if not service.ready:
                raise ApiError(503, "the server is not ready", code="unavailable", kind="server_error")
            req = service.validate(body)
            job = service.submit(req, asyncio.get_running_loop())
            while not job.future.done():
                await asyncio.wait({job.future}, timeout=0.1)
                if job.future.done():
                    break
                if await request.is_disconnected():
                    job.cancelled = "disconnected"
                    service.metrics.rejected.labels("disconnected").inc()
                    return Response(status_code=499)
                if time.monotonic() > job.deadline:
                    job.cancelled = "deadline"
                    raise ApiError(503, f"no image within the {opts.timeout_s:g} s deadline", code="timeout", kind="server_error")
            images = job.future.result()  # raises the worker's ApiError
            data = []
            for pixels, seed in zip(images, job.seeds):
                data.append({"b64_json": await asyncio.to_thread(_png_b64, pixels), "seed": seed})
        except ApiError as err:
            return error_response(err, started)
        service.metrics.latency.labels("200").observe(time.monotonic() - started)
        body = {
            "created": int(time.time()),
            "data": data,
            "seed": req["seed"],
            "size": f"{req['size'][0]}x{req['size'][1]}",
            "num_inference_steps": req["steps"],
            "prompt_tokens": req["prompt_tokens"],
            "prompt_truncated": req["prompt_truncated"],
        }
        return JSONResponse(body, headers={"X-Served-By": service.served_by})

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
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

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
    uvicorn.run(create_app(opts), host=host, port=port, log_level="warning", timeout_graceful_shutdown=opts.timeout_s)
