"""`zimage-trt bench`: per-stage latency and memory, diffusers' eager pipeline beside the runtime, in one run.

For each system (diffusers' ZImagePipeline, then the runtime on every backend that can run here) it times
whole generations and, inside them, the stages:

    text encoder      the text encoder call (tokenizing included for the runtime)
    transformer x1    one transformer pass
    all passes        every pass with its Euler step (the runtime replays them as one CUDA graph on a GPU)
    VAE decode        the VAE call
    end to end        prompt in, 8-bit image out, wall clock
    runtime overhead  end to end minus the time inside the three networks: what the runtime itself costs

Memory: "peak GB" is the peak of PyTorch's allocator while the stage ran (engines' own weights are not in it);
"device GB" is the device memory the system holds after its runs (allocator cache and engines included).

GPU stages are timed with CUDA events on the stream, wall clock with perf_counter after a sync. Each figure is
the median and p90 over the timed generations. The roofline floor is the transformer's matmul FLOPs per pass,
counted from the config, over the matmul rate measured on this device; figures are shown as multiples of it.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from zimage_trt.common.errors import UserError
from zimage_trt.runtime.timing import Clock
from zimage_trt.common.peaks import release_memory

STAGES = ("text encoder", "transformer x1", "all passes", "VAE decode", "end to end", "runtime overhead")
BARS = {"text encoder": 5.0, "VAE decode": 40.0}  # ms, the project's bar on an H100/H200-class GPU
E2E_BAR = 1.2  # end to end within 1.2x of the roofline floor
OVERHEAD_BAR = 0.01  # runtime work between network calls under 1% of the total


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
                out[stage] = {"median_ms": statistics.median(vals), "p90_ms": float(np.percentile(vals, 90)), "n": len(vals)}
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

    def total_ms(self) -> float:
        return sum(t() for t in self.timers)


def matmul_rate(device: torch.device) -> tuple[float, str]:
    """Sustained dense matmul FLOP/s on this device: bf16 8192^3 on a GPU, fp32 1024^3 on a CPU."""
    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 20
    else:
        n, dtype, reps = 1024, torch.float32, 10
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    clock = Clock(device)
    clock.sync()
    begin = clock.start()
    for _ in range(reps):
        a @ b
    elapsed = clock.stop(begin)
    clock.sync()
    seconds = elapsed() / 1e3
    return 2 * n**3 * reps / seconds, f"{str(dtype).split('.')[-1]} {n}^3"


def _memory_start(device):
    release_memory(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        free, total = torch.cuda.mem_get_info()
        return total - free
    return 0


def _memory_end(device, base) -> dict:
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"torch_peak_gb": torch.cuda.max_memory_allocated() / 1e9, "device_used_gb": (total - free - base) / 1e9}


def bench_diffusers(model_dir, prompt, seed, height, width, steps, device, dtype, warmup, iters) -> dict:
    """diffusers' pipeline, stages timed with hooks that record events on the stream (no extra syncs)."""
    from zimage_trt.export.checkpoint import load_pipeline

    base = _memory_start(device)
    pipe = load_pipeline(model_dir, dtype, device)
    pipe.set_progress_bar_config(disable=True)
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
    for i in range(warmup + iters):
        for v in marks.values():
            v.clear()
        clock.sync()
        t0 = time.perf_counter()
        generator = torch.Generator("cpu").manual_seed(seed)
        pipe(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=0.0, generator=generator)
        clock.sync()
        wall = (time.perf_counter() - t0) * 1e3
        if i < warmup:
            continue
        te, vae = marks["te"][0](), marks["vae"][0]()
        passes = [m() for m in marks["dit"]]
        samples.add("text encoder", te)
        samples.add("transformer x1", statistics.median(passes))
        samples.add("all passes", sum(passes))
        samples.add("VAE decode", vae)
        samples.add("end to end", wall)
        samples.add("runtime overhead", wall - te - sum(passes) - vae)
    result = {"stages": samples.summary(), "memory": _memory_end(device, base), "passes": steps}
    del pipe
    release_memory(device)
    return result


def bench_runtime(
    bundle, sessions: dict, prompt, seed, device, warmup, iters, size, guidance=None, loras=(), vram="all"
) -> dict:
    """The runtime's verbs timed one by one; the same calls `generate` makes, in the same order. With
    `guidance`, the text encoder stage encodes both prompts and each guided step is two passes."""
    from zimage_trt.runtime.pipeline import ZImageRuntime

    clock = Clock(device)
    te, vae = TimedSession(sessions["text_encoder"], clock), TimedSession(sessions["vae_decoder"], clock)
    rt = ZImageRuntime(bundle, {"text_encoder": te, "transformer": sessions["transformer"], "vae_decoder": vae}, device,
                       vram=vram)
    rt.use_size(*size)
    from zimage_trt.runtime.memory import describe, vram_plan

    predicted = describe(vram_plan(rt), vram)
    clock.stream = rt.stream  # the runtime's work runs on its own stream: time it there
    samples = Samples(device)
    switch = {}
    if loras:
        switch["to LoRA"] = rt.set_loras(list(loras)) * 1e3
        switch["to base"] = rt.set_loras([]) * 1e3
        switch["to LoRA again"] = rt.set_loras(list(loras)) * 1e3
    for i in range(warmup + iters):
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
        if i < warmup:
            continue
        t_te, t_all, t_vae = te.total_ms(), denoise(), vae.total_ms()
        samples.add("text encoder", t_te)
        samples.add("all passes", t_all)
        samples.add("VAE decode", t_vae)
        samples.add("end to end", wall)
        samples.add("runtime overhead", wall - t_te - t_all - t_vae)
    # One pass on its own, outside the recorded loop.
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
    passes = rt.schedule.passes + (sum(cfg.guided) if cfg else 0)
    result = {"stages": samples.summary(), "passes": passes, "lpad": lpad, "cuda_graph": rt.use_cuda_graph,
              "vram": vram, "predicted_vram": predicted}
    if loras:
        result["lora"] = {"stack": [(lo.name, s) for lo, s in loras], "switch_ms": switch}
        rt.set_loras([])  # the sessions go back with their base weights
    rt.close(sessions=False)  # the caller closes the sessions
    return result


def available_backends(requested: list[str], device: torch.device, engines) -> tuple[list[str], dict]:
    """The backends to run and, for the others, why not."""
    import importlib.util

    run, skipped = [], {}
    for b in requested:
        if b == "torch":
            run.append(b)
        elif b == "onnxruntime":
            if importlib.util.find_spec("onnxruntime") is None:
                skipped[b] = "onnxruntime is not installed"
            elif device.type == "cuda":
                import onnxruntime as ort

                if "CUDAExecutionProvider" in ort.get_available_providers():
                    run.append(b)
                else:
                    skipped[b] = "this onnxruntime has no CUDA provider (CPU-only build)"
            else:
                run.append(b)
        elif b == "tensorrt":
            if engines is None:
                skipped[b] = "no --engines given"
            elif device.type != "cuda":
                skipped[b] = "engines run on a GPU"
            else:
                run.append(b)
        else:
            raise UserError(f"unknown backend {b!r} for bench")
    return run, skipped


def run_bench(
    model_dir, bundle_dir, backends, engines, device, prompt, seed, warmup, iters, diffusers=True, size=None,
    guidance=None, lora_args=(), vram="all", weight_budget=None,
) -> dict:
    """With `guidance`, each runtime backend is measured twice, without and with it, to show what it costs. With
    LoRAs (`lora_args`: 'FILE[:STRENGTH]' of converted files), they are applied before timing, and the time of
    switching to them and back (one weight update each) is reported."""
    from zimage_trt.runtime.lora import load_lora, parse_lora_arg

    from zimage_trt.export.configs import dit_flops_per_pass
    from zimage_trt.runtime.bundle import Bundle
    from zimage_trt.sessions import open_sessions

    bundle = Bundle.open(bundle_dir)
    loras = [(load_lora(path, bundle), strength) for path, strength in map(parse_lora_arg, lora_args)]
    width, height = size or bundle.sizes.opt
    bundle.sizes.check(width, height, f"bundle {bundle.root}")
    torch_dtype = "bf16" if device.type == "cuda" else "fp32"
    rate, rate_how = matmul_rate(device)
    run, skipped = available_backends(backends, device, engines)
    results: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "matmul_rate_tflops": rate / 1e12,
        "matmul_rate_measured_with": rate_how,
        "height": height,
        "width": width,
        "prompt": prompt,
        "systems": {},
        "skipped": skipped,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }
    steps = bundle.scheduler["default_steps"]
    if diffusers:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        results["systems"][f"diffusers eager ({torch_dtype})"] = bench_diffusers(
            model_dir, prompt, seed, height, width, steps, device, dtype, warmup, iters
        )
    for backend in run:
        base = _memory_start(device)
        sessions = open_sessions(backend, bundle, device, model_dir=model_dir, engines=engines, torch_dtype=torch_dtype,
                                 weight_budget=weight_budget if backend == "tensorrt" else None, vram=vram)
        precision = "/".join(sorted({s.precision for s in sessions.values()}))
        r = bench_runtime(bundle, sessions, prompt, seed, device, warmup, iters, (width, height), loras=loras,
                          vram=vram)
        r["memory"] = _memory_end(device, base)
        results["systems"][f"runtime {backend} ({precision})"] = r
        if guidance is not None:
            r = bench_runtime(bundle, sessions, prompt, seed, device, warmup, iters, (width, height), guidance,
                              loras=loras, vram=vram)
            r["memory"] = _memory_end(device, base)
            results["systems"][f"runtime {backend} ({precision}) cfg {guidance.scale:g}"] = r
        for s in sessions.values():
            s.close()
        del sessions
        release_memory(device)
    lpad = next((r["lpad"] for r in results["systems"].values() if "lpad" in r), 128)
    cfg = bundle.manifest["config"]["transformer"]
    image_tokens = (height // 16) * (width // 16)
    flops = dit_flops_per_pass(cfg, image_tokens, lpad)
    results["flops_per_pass"] = flops
    results["floor_ms"] = {
        "transformer x1": flops / rate * 1e3,
        "all passes": steps * flops / rate * 1e3,
        "end to end": steps * flops / rate * 1e3,
    }
    return results


def _si(value: float) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= factor:
            return f"{value / factor:.3g} {prefix}"
    return f"{value:.3g} "


def format_table(results: dict) -> str:
    floor = results["floor_ms"]
    lines = [
        f"device: {results['device']}   {results['width']}x{results['height']}   matmul rate "
        f"{_si(results['matmul_rate_tflops'] * 1e12)}FLOP/s ({results['matmul_rate_measured_with']})   "
        f"transformer pass {_si(results['flops_per_pass'])}FLOP   roofline floor: pass "
        f"{floor['transformer x1']:.3g} ms, end to end {floor['end to end']:.3g} ms",
        "",
    ]
    head = ["system", "stage", "median ms", "p90 ms", "x floor", "peak GB", "device GB", "passes"]
    rows = [head]
    for system, r in results["systems"].items():
        mem = r.get("memory", {})
        mem_s = f"{mem['device_used_gb']:.1f}" if mem else "-"
        for stage in STAGES:
            s = r["stages"].get(stage)
            if not s:
                continue
            # the floor of a system's loop is its own number of passes (guidance doubles the guided ones)
            passes = r.get("passes", results.get("passes", 1))
            stage_floor = floor["transformer x1"] * (passes if stage in ("all passes", "end to end") else 1)
            ratio = f"{s['median_ms'] / stage_floor:.2f}" if stage in floor else ""
            if stage == "runtime overhead":
                e2e = r["stages"]["end to end"]["median_ms"]
                ratio = f"{100 * s['median_ms'] / e2e:.2f}% of e2e"
            peak = f"{s['peak_gb']:.1f}" if "peak_gb" in s else "-"
            rows.append([system, stage, f"{s['median_ms']:.2f}", f"{s['p90_ms']:.2f}", ratio, peak,
                         mem_s if stage == "end to end" else "", str(passes) if stage == "end to end" else ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for k, r in enumerate(rows):
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(len(head))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    for system, r in results["systems"].items():
        if r.get("predicted_vram") and "CPU run" not in r["predicted_vram"]:
            lines.append(f"{system}: {r['predicted_vram']}")
        if "lora" in r:
            sw = ", ".join(f"{k} {v:.1f} ms" for k, v in r["lora"]["switch_ms"].items())
            stack = ", ".join(f"{n}:{s:g}" for n, s in r["lora"]["stack"])
            lines.append(f"{system}: LoRA {stack} (timed with it); switching is one weight update: {sw}")
    for b, why in results["skipped"].items():
        lines.append(f"not measured: runtime {b}: {why}")
    return "\n".join(lines)


def save(results: dict, path) -> None:
    from zimage_trt.common.files import write_atomic, writing

    with writing(path, "pass another --json"):
        write_atomic(path, (json.dumps(results, indent=2) + "\n").encode())
