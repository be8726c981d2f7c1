"""The systems `bench` times, each in the same way: diffusers' ZImagePipeline (eager, or with torch.compile of its
transformer, as a torch user would write it) and the runtime on a set of sessions.

Per generation: text encoder, all passes, VAE decode and end to end, plus one transformer pass timed on its own;
GPU stages with CUDA events on the stream that runs them, end to end with perf_counter after a sync. The peak of
PyTorch's allocator is kept per stage. Warm-up generations absorb lazy initialisation and compilation; the
compile time is reported beside the figures, never inside them.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from zimage_trt.common.peaks import release_memory
from zimage_trt.runtime.timing import Clock

STAGES = ("text encoder", "transformer x1", "all passes", "VAE decode", "end to end", "runtime overhead")


@dataclass
class Samples:
    """Times per stage, and the peak of PyTorch's allocator while each stage ran (GPU only)."""

    device: torch.device
    values: dict = field(default_factory=lambda: {s: [] for s in STAGES})
    peaks: dict = field(default_factory=dict)

    def add(self, stage: str, ms: float) -> None:
        self.values[stage].append(float(ms))

    def begin_stage(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()  # allocator bookkeeping on the host: no sync

    def end_stage(self, *stages: str) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated()
            for stage in stages + ("end to end",):
                self.peaks[stage] = max(self.peaks.get(stage, 0), peak)

    def summary(self) -> dict:
        out = {}
        for stage, vals in self.values.items():
            if vals:
                out[stage] = {"median_ms": statistics.median(vals), "p90_ms": float(np.percentile(vals, 90)),
                              "n": len(vals)}
                if stage in self.peaks:
                    out[stage]["peak_gb"] = self.peaks[stage] / 1e9
        return out


class TimedSession:
    """A session that times each run; the runtime sees the same interface."""

    def __init__(self, inner, clock: Clock):
        self.inner, self.clock = inner, clock
        self.name, self.device, self.precision = inner.name, inner.device, inner.precision
        self.capturable = False
        self.timers: list = []  # one per run since the caller last cleared it (guidance encodes two prompts)

    def run(self, inputs, outputs) -> None:
        begin = self.clock.start()
        self.inner.run(inputs, outputs)
        self.timers.append(self.clock.stop(begin))

    def release(self) -> None:  # --vram sequential passes through the timing wrapper
        getattr(self.inner, "release", lambda: None)()

    def acquire(self) -> None:
        getattr(self.inner, "acquire", lambda: None)()

    def use_graph_pool(self, pool) -> None:  # the runtime's memory pool, for the session's own CUDA graphs
        getattr(self.inner, "use_graph_pool", lambda _: None)(pool)

    def total_ms(self) -> float:
        return sum(t() for t in self.timers)


def memory_start(device):
    release_memory(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        free, total = torch.cuda.mem_get_info()
        return total - free
    return 0


def memory_end(device, base) -> dict:
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"torch_peak_gb": torch.cuda.max_memory_allocated() / 1e9, "device_used_gb": (total - free - base) / 1e9}


def bench_diffusers(model_dir, prompt, seed, height, width, steps, device, dtype, warmup, iters,
                    compile: bool = False) -> dict:
    """diffusers' pipeline, stages timed with hooks that record events on the stream (no extra syncs). compile:
    its transformer's forward through torch.compile (the hooks stay outside the compiled code); the first
    warm-up generation, which compiles, is timed apart."""
    from zimage_trt.export.checkpoint import load_pipeline

    base = memory_start(device)
    pipe = load_pipeline(model_dir, dtype, device)
    pipe.set_progress_bar_config(disable=True)
    if compile:
        from zimage_trt.runtime.torch_compile import prepare

        prepare()
        pipe.transformer.forward = torch.compile(pipe.transformer.forward)
    clock = Clock(device)
    marks: dict[str, list] = {"te": [], "dit": [], "vae": []}
    samples = Samples(device)

    def hooks(module, key, *stages):
        begin = {}

        def pre(m, a):
            samples.begin_stage()
            begin["t"] = clock.start()

        def post(m, a, o):
            marks[key].append(clock.stop(begin["t"]))
            samples.end_stage(*stages)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    hooks(pipe.text_encoder, "te", "text encoder")
    hooks(pipe.transformer, "dit", "transformer x1", "all passes")
    hooks(pipe.vae.decoder, "vae", "VAE decode")
    walls = []
    for i in range(warmup + iters):
        for v in marks.values():
            v.clear()
        clock.sync()
        t0 = time.perf_counter()
        generator = torch.Generator("cpu").manual_seed(seed)
        pipe(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=0.0, generator=generator)
        clock.sync()
        walls.append((time.perf_counter() - t0) * 1e3)
        if i < warmup:
            continue
        te, vae = marks["te"][0](), marks["vae"][0]()
        passes = [m() for m in marks["dit"]]
        samples.add("text encoder", te)
        samples.add("transformer x1", statistics.median(passes))
        samples.add("all passes", sum(passes))
        samples.add("VAE decode", vae)
        samples.add("end to end", walls[-1])
        samples.add("runtime overhead", walls[-1] - te - sum(passes) - vae)
    result = {"stages": samples.summary(), "memory": memory_end(device, base), "passes": steps}
    if compile and warmup:  # the first generation compiled; a steady one costs what the last one did
        result["compile_s"] = max(0.0, (walls[0] - walls[-1]) / 1e3)
    del pipe
    release_memory(device)
    return result


def bench_runtime(
    bundle, sessions: dict, prompt, seed, device, warmup, iters, size, guidance=None, loras=(), vram="all"
) -> dict:
    """The runtime's verbs timed one by one; the same calls `generate` makes, in the same order. With
    `guidance`, the text encoder stage encodes both prompts and each guided step is two passes."""
    from zimage_trt.runtime.memory import describe, vram_plan
    from zimage_trt.runtime.pipeline import ZImageRuntime

    clock = Clock(device)
    te, vae = TimedSession(sessions["text_encoder"], clock), TimedSession(sessions["vae_decoder"], clock)
    rt = ZImageRuntime(bundle, {"text_encoder": te, "transformer": sessions["transformer"], "vae_decoder": vae}, device,
                       vram=vram)
    rt.use_size(*size)
    predicted = describe(vram_plan(rt), vram)
    clock.stream = rt.stream  # the runtime's work runs on its own stream: time it there
    samples = Samples(device)
    switch = {}
    if loras:
        switch["to LoRA"] = rt.set_loras(list(loras)) * 1e3
        switch["to base"] = rt.set_loras([]) * 1e3
        switch["to LoRA again"] = rt.set_loras(list(loras)) * 1e3
    for i in range(warmup + iters):
        lpad, cfg = _one_generation(rt, te, vae, samples, clock, prompt, seed, guidance, timed=i >= warmup)
    _one_pass(rt, lpad, samples, clock, warmup, iters)
    passes = rt.schedule.passes + (sum(cfg.guided) if cfg else 0)
    result = {"stages": samples.summary(), "passes": passes, "lpad": lpad, "cuda_graph": rt.use_cuda_graph,
              "vram": vram, "predicted_vram": predicted, "tokens": len(rt.tokenize(prompt))}
    if loras:
        result["lora"] = {"stack": [(lo.name, s) for lo, s in loras], "switch_ms": switch}
        rt.set_loras([])  # the sessions go back with their base weights
    rt.close(sessions=False)  # the caller closes the sessions
    return result


def _one_generation(rt, te, vae, samples, clock, prompt, seed, guidance, timed: bool) -> tuple:
    """One image, its stages timed; returns (padded caption length, guidance layout)."""
    te.timers.clear()
    vae.timers.clear()
    clock.sync()
    t0 = time.perf_counter()
    samples.begin_stage()
    lpad = rt.encode_prompt(rt.tokenize(prompt))
    cfg = rt.encode_guidance(guidance)
    samples.end_stage("text encoder")
    rt.init_latents(seed)
    samples.begin_stage()
    begin = clock.start()
    rt.denoise(lpad, cfg=cfg)
    denoise = clock.stop(begin)
    samples.end_stage("all passes")
    samples.begin_stage()
    rt.decode()  # ends with the copy of the image to the host: the one sync
    samples.end_stage("VAE decode")
    wall = (time.perf_counter() - t0) * 1e3
    if timed:
        t_te, t_all, t_vae = te.total_ms(), denoise(), vae.total_ms()
        samples.add("text encoder", t_te)
        samples.add("all passes", t_all)
        samples.add("VAE decode", t_vae)
        samples.add("end to end", wall)
        samples.add("runtime overhead", wall - t_te - t_all - t_vae)
    return lpad, cfg


def _one_pass(rt, lpad, samples, clock, warmup, iters) -> None:
    """One transformer pass on its own, outside the recorded loop."""
    feeds = rt.feeds(lpad)
    for i in range(warmup + iters):
        clock.sync()
        samples.begin_stage()
        begin = clock.start()
        with rt.on_stream():
            rt.transformer.run(feeds, {"velocity": rt.velocity})
        one = clock.stop(begin)
        samples.end_stage("transformer x1")
        clock.sync()
        if i >= warmup:
            samples.add("transformer x1", one())
