"""The GPU side of the server: the runtime behind a bounded queue and the one worker thread that owns it.

It takes validated jobs (serve_requests.py made them; nothing here sees HTTP), admits at most queue_size + 1 at a
time (429 with Retry-After beyond), skips jobs whose client left or whose deadline passed before the GPU reached
them, and answers each job's future on the event loop. On stop it finishes what it has, then closes the runtime.
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass

from zimage_trt.common.errors import UserError

from .serve_metrics import Metrics
from .serve_options import ApiError, ServeOptions
from .serve_tokens import PromptCounter


@dataclass
class Job:
    ids: list[int]  # the prompt's token ids (the first max_length of its chat turn)
    seeds: list[int]
    steps: int
    size: tuple[int, int]  # (width, height)
    guidance: object  # runtime.pipeline.Guidance or None
    lora: tuple  # (name, strength), or () for the base weights
    deadline: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cancelled: str = ""  # why the HTTP side gave up on it: "disconnected" | "deadline"


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
        from zimage_trt.runtime.memory import describe, vram_plan
        from zimage_trt.runtime.pipeline import ZImageRuntime
        from zimage_trt.sessions import open_sessions, resolve_device

        o = self.opts
        self.bundle = Bundle.open(o.bundle)
        device = resolve_device(o.device)
        _use_device(device)  # engines and torch allocations land on the current device of the loading thread
        sessions = open_sessions(o.backend, self.bundle, device, model_dir=o.model, engines=o.engines,
                                 torch_dtype=o.torch_dtype, weight_budget=o.weight_budget, vram=o.vram)
        self.runtime = ZImageRuntime(self.bundle, sessions, device, vram=o.vram)
        print(describe(vram_plan(self.runtime), o.vram), flush=True)
        self.sizes = self.runtime.sizes  # the bundle's range, narrowed to what the engines cover
        self.loras = self._load_loras()
        self.counter = PromptCounter(self.runtime.tokenizer, self.bundle.root / "tokenizer" / "tokenizer.json")
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
        _trim_heap()

    def sizes_info(self) -> dict:
        from zimage_trt.runtime.sizes import SIDE_MULTIPLE, format_size

        r = self.sizes
        return {"min": format_size(r.min_width, r.min_height), "max": format_size(*r.largest),
                "opt": format_size(*r.opt), "multiple": SIDE_MULTIPLE, "text": r.describe()}

    def model_card(self) -> dict:
        """The bundle as GET /v1/models lists it: OpenAI's model object plus what a client may ask of it."""
        import datetime as dt
        from pathlib import Path

        manifest, o = self.bundle.manifest, self.opts
        try:
            created = int(dt.datetime.fromisoformat(manifest.get("created", "")).timestamp())
        except (TypeError, ValueError):
            created = 0
        return {
            "id": Path(self.opts.bundle).resolve().name, "object": "model", "created": created,
            "owned_by": "zimage-trt", "backend": self.opts.backend, "sizes": self.sizes_info(),
            # guidance 0 is Z-Image-Turbo's own setting; guidance_scale > 0 runs the classifier-free pipeline
            "pipelines": ["text-to-image", "text-to-image-cfg"],
            "precisions": {name: net.get("precision") for name, net in manifest.get("networks", {}).items()},
            "loras": sorted(self.loras), "max_n": self.opts.max_n, "max_steps": self.opts.max_steps,
            "default_steps": self.runtime.default_steps, "max_prompt_tokens": self.bundle.max_caption_tokens,
            "limits": {"max_body_bytes": o.max_body_bytes, "max_prompt_chars": o.max_prompt_chars,
                       "body_timeout_s": o.body_timeout_s, "header_timeout_s": o.header_timeout_s},
        }

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
        lpad = rt.encode_prompt(job.ids)  # tokenized at validation (serve_tokens), off this thread
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

    # ------------------------------------------------------------ admission
    def check_room(self) -> None:
        """429 at once when the queue is full, before the request is validated: under overload most requests are
        turned away, and tokenizing each first would take CPU from the worker. submit() still decides."""
        if not self.slots.acquire(blocking=False):
            raise self._queue_full()
        self.slots.release()

    def _queue_full(self) -> ApiError:
        retry = max(1, round(self.avg_seconds * (self.opts.queue_size + 1)))
        return ApiError(429, f"the queue is full ({self.opts.queue_size} waiting); retry in about {retry} s",
                        code="queue_full", kind="rate_limit_error", headers={"Retry-After": str(retry)})

    def submit(self, req, loop) -> Job:
        """Queue a validated request (serve_requests.Generation); 503 when not serving, 429 when full."""
        if self.draining or not self.ready:
            raise ApiError(503, "the server is not ready" if not self.draining else "the server is shutting down",
                           code="unavailable", kind="server_error")
        job = Job(req.ids, [req.seed + i for i in range(req.n)], req.steps, req.size, req.guidance, req.lora,
                  time.monotonic() + self.opts.timeout_s, loop, loop.create_future())
        if not self.slots.acquire(blocking=False):
            raise self._queue_full()
        self.queue.put(job)
        self.metrics.queue_depth.set(self.queue.qsize())
        return job


def _trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc): a LoRA switch frees a whole set of weights (onnxruntime on
    a CPU rebuilds its session), and glibc would keep those pages, so RSS would wander by that much and a leak would
    hide in the noise. A no-op where there is no glibc."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: glibc's, where it is the C library
    except (OSError, AttributeError):
        pass


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
