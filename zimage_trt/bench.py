"""`zimage-trt bench`: per-stage latency and memory, diffusers beside the runtime, side by side in one process.

Systems, each timed the same way (bench_systems.py):

    diffusers eager              ZImagePipeline as shipped
    diffusers + torch.compile    its transformer's forward through torch.compile (--compile): what a torch user
                                 gets by hand
    runtime BACKEND              the runtime on each backend that runs here (torch: eager modules, the text
                                 encoder and VAE in CUDA graphs on a GPU, the loop in one)
    runtime torch compiled       the same, every network through torch.compile (--compile)
    runtime torch fp8            an fp8 bundle's transformer on FP8 tensor cores (--fp8-bundle; compiled with
                                 --compile); on a CPU its FP8 is emulated (a rehearsal, not a speed)

Stages:
    text encoder      the text encoder call (tokenizing included for the runtime)
    transformer x1    one transformer pass
    all passes        every pass with its Euler step (the runtime replays them as one CUDA graph on a GPU)
    VAE decode        the VAE call
    end to end        prompt in, 8-bit image out, wall clock
    runtime overhead  end to end minus the time inside the three networks: what the runtime itself costs

Memory: "peak GB" is the peak of PyTorch's allocator while the stage ran (engines' own weights are not in it);
"device GB" is the device memory the system holds after its runs (allocator cache and engines included).

Each figure is the median and p90 over the timed generations, and a multiple of its roofline floor
(bench_floors.py): the text encoder's, one pass's (the FP8 system's own), the passes', the VAE's, and for end to
end the whole image's (text encoder + passes + VAE). In the JSON, floor_ms["end to end"] is the passes' share
alone, floor_ms["image"] the whole. SGLang-diffusion's published figures for the same image are printed beside.
"""

from __future__ import annotations

import json
import platform
import time

import torch

from zimage_trt.common.errors import UserError
from zimage_trt.common.peaks import release_memory

from .bench_floors import matmul_rate, measure_rates, quantized_flops, stage_floors
from .bench_systems import STAGES, TimedSession, bench_diffusers, bench_runtime, memory_end, memory_start

__all__ = ["STAGES", "TimedSession", "format_table", "matmul_rate", "run_bench", "save"]

# What an H100 user runs instead, as published (facts: "What users pick instead")
SGLANG_SOURCE = ("SGLang-diffusion CI baselines, H100 80GB, 9 steps, batch 1 (python/sglang/multimodal_gen/test/"
                 "server/perf_baselines.json, 2026-04; 2048x2048: PR #16719)")
SGLANG = {(1024, 1024): "BF16 1027.9 ms end to end (denoise 675.8 ms, text encoder 173 ms); FP8 transformer 958.3 ms",
          (2048, 2048): "BF16 5.38 s end to end on one GPU (3.74 s on two)"}


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

                from zimage_trt.runtime.ort_cuda import gpu_build_missing

                missing = gpu_build_missing(ort)  # the one line that says how to install the GPU build
                if missing is None:
                    run.append(b)
                else:
                    skipped[b] = missing
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


def _runtime_systems(run: list[str], compile: bool, fp8_bundle, device) -> list[tuple[str, str, dict]]:
    """(label stem, backend, open_sessions options) of each runtime system, in the order they run."""
    systems = [(f"runtime {b}", b, {}) for b in run]
    if "torch" in run and compile:
        systems.append(("runtime torch compiled", "torch", {"compile": True}))
    if "torch" in run and fp8_bundle:
        how = " compiled" if compile else ""
        how += ", emulated" if device.type == "cpu" else ""  # no FP8 tensor cores: a rehearsal, not a speed
        systems.append((f"runtime torch fp8{how}", "torch", {"compile": compile, "fp8_on_cpu": True,
                                                              "bundle": fp8_bundle}))
    return systems


def run_bench(
    model_dir, bundle_dir, backends, engines, device, prompt, seed, warmup, iters, diffusers=True, size=None,
    guidance=None, lora_args=(), vram="all", weight_budget=None, compile=False, fp8_bundle=None,
) -> dict:
    """With `guidance`, each runtime system is measured twice, without and with it, to show what it costs. With
    LoRAs (`lora_args`: 'FILE[:STRENGTH]' of converted files), they are applied before timing, and the time of
    switching to them and back (one weight update each) is reported. `compile` adds the torch.compile systems,
    `fp8_bundle` (an fp8 bundle of the same model) the FP8 one."""
    from zimage_trt.runtime.bundle import Bundle
    from zimage_trt.runtime.lora import load_lora, parse_lora_arg

    bundle = Bundle.open(bundle_dir)
    loras = [(load_lora(path, bundle), strength) for path, strength in map(parse_lora_arg, lora_args)]
    width, height = size or bundle.sizes.opt
    bundle.sizes.check(width, height, f"bundle {bundle.root}")
    fp8 = Bundle.open(fp8_bundle) if fp8_bundle else None
    if fp8 is not None:
        fp8.sizes.check(width, height, f"--fp8-bundle {fp8.root}")
    torch_dtype = "bf16" if device.type == "cuda" else "fp32"
    rates = measure_rates(device)
    run, skipped = available_backends(backends, device, engines)
    results: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "matmul_rate_tflops": rates["matmul"] / 1e12, "matmul_rate_measured_with": rates["matmul_how"],
        "fp8_rate_tflops": rates["fp8"] / 1e12 if rates["fp8"] else None,
        "bandwidth_gbs": rates["bandwidth"] / 1e9, "height": height, "width": width, "prompt": prompt,
        "systems": {}, "skipped": skipped, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
    }
    steps = bundle.scheduler["default_steps"]
    if diffusers:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        kinds = [("diffusers eager", False)] + ([("diffusers + torch.compile", True)] if compile else [])
        for label, compiled in kinds:
            results["systems"][f"{label} ({torch_dtype})"] = bench_diffusers(
                model_dir, prompt, seed, height, width, steps, device, dtype, warmup, iters, compile=compiled)
    for stem, backend, opts in _runtime_systems(run, compile, fp8_bundle, device):
        system_bundle = fp8 if "bundle" in opts else bundle
        opts = {k: v for k, v in opts.items() if k != "bundle"}
        _bench_system(results, stem, backend, system_bundle, opts, model_dir, engines, device, torch_dtype,
                      weight_budget, prompt, seed, warmup, iters, (width, height), guidance, loras, vram)
    _add_floors(results, bundle, fp8, model_dir, rates, steps, torch_dtype)
    return results


def _bench_system(results, stem, backend, bundle, opts, model_dir, engines, device, torch_dtype, weight_budget,
                  prompt, seed, warmup, iters, size, guidance, loras, vram) -> None:
    """One runtime system (and its guided twin): its sessions opened, timed, described and closed."""
    from zimage_trt.sessions import open_sessions

    base = memory_start(device)
    sessions = open_sessions(backend, bundle, device, model_dir=model_dir, engines=engines, torch_dtype=torch_dtype,
                             weight_budget=weight_budget if backend == "tensorrt" else None, vram=vram, **opts)
    precision = "/".join(sorted({s.precision for s in sessions.values()}))
    quantized = bundle.network("transformer").get("quantization") is not None
    runs = [None] + ([guidance] if guidance is not None else [])
    for g in runs:
        r = bench_runtime(bundle, sessions, prompt, seed, device, warmup, iters, size, g,
                          loras=() if quantized else loras, vram=vram)
        r["memory"] = memory_end(device, base)
        r["sessions"] = {n: s.describe() for n, s in sessions.items() if hasattr(s, "describe")}
        r["compile_s"] = sum(getattr(s, "compile_log", None).total for s in sessions.values()
                             if getattr(s, "compiled", False))
        r["quantized"] = quantized
        results["systems"][f"{stem} ({precision})" + (f" cfg {g.scale:g}" if g else "")] = r
    for s in sessions.values():
        s.close()
    del sessions
    release_memory(device)


def _add_floors(results, bundle, fp8, model_dir, rates, steps, torch_dtype) -> None:
    """The roofline floors: the bf16 system's in results["floor_ms"], an FP8 system's own beside its figures."""
    from zimage_trt.export.configs import dit_flops_per_pass
    from zimage_trt.export.fp16 import block_names

    width, height = results["width"], results["height"]
    lpad = next((r["lpad"] for r in results["systems"].values() if "lpad" in r), 128)
    tokens = next((r["tokens"] for r in results["systems"].values() if "tokens" in r), lpad)
    cfg = bundle.manifest["config"]["transformer"]
    flops = dit_flops_per_pass(cfg, (height // 16) * (width // 16), lpad)
    weight_bytes = 2 if torch_dtype in ("bf16", "fp16") else 4
    floor = stage_floors(model_dir, rates, (width, height), tokens, flops, weight_bytes)
    results["flops_per_pass"] = flops
    results["floor_ms"] = _with_totals(floor, steps)
    if fp8 is not None:
        skip = set(fp8.network("transformer")["quantization"]["skip"])
        blocks = [b for b in block_names(cfg) if b not in skip]
        quantized = quantized_flops(cfg, (height // 16) * (width // 16), lpad, blocks)
        fp8_floor = _with_totals(stage_floors(model_dir, rates, (width, height), tokens, flops, weight_bytes,
                                              quantized), steps)
        for r in results["systems"].values():
            if r.get("quantized"):
                r["floor_ms"] = fp8_floor


def _with_totals(floor: dict, steps: int) -> dict:
    return {**floor, "all passes": steps * floor["transformer x1"], "end to end": steps * floor["transformer x1"],
            "image": floor["text encoder"] + steps * floor["transformer x1"] + floor["VAE decode"]}


def _si(value: float) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= factor:
            return f"{value / factor:.3g} {prefix}"
    return f"{value:.3g} "


def _header(results: dict) -> list[str]:
    floor = results["floor_ms"]
    fp8 = results.get("fp8_rate_tflops")
    return [
        f"device: {results['device']}   {results['width']}x{results['height']}   matmul rate "
        f"{_si(results['matmul_rate_tflops'] * 1e12)}FLOP/s ({results['matmul_rate_measured_with']})"
        + (f", fp8 {_si(fp8 * 1e12)}FLOP/s" if fp8 else ", fp8 rate: not measured here")
        + f", bandwidth {results.get('bandwidth_gbs', 0):.0f} GB/s",
        f"roofline floors: text encoder {floor['text encoder']:.3g} ms, transformer pass "
        f"{_si(results['flops_per_pass'])}FLOP = {floor['transformer x1']:.3g} ms, VAE {floor['VAE decode']:.3g} ms, "
        f"image {floor['image']:.3g} ms",
        "",
    ]


def _rows(results: dict) -> list[list[str]]:
    rows = [["system", "stage", "median ms", "p90 ms", "x floor", "peak GB", "device GB", "passes"]]
    for system, r in results["systems"].items():
        floor = r.get("floor_ms", results["floor_ms"])
        mem = r.get("memory", {})
        mem_s = f"{mem['device_used_gb']:.1f}" if mem else "-"
        passes = r.get("passes", results.get("passes", 1))
        for stage in STAGES:
            s = r["stages"].get(stage)
            if not s:
                continue
            # the floor of a system's loop is its own number of passes (guidance doubles the guided ones)
            loop = passes * floor["transformer x1"]
            stage_floor = {"all passes": loop, "end to end": floor["text encoder"] + loop + floor["VAE decode"]}.get(
                stage, floor.get(stage))
            ratio = f"{s['median_ms'] / stage_floor:.2f}" if stage_floor else ""
            if stage == "runtime overhead":
                ratio = f"{100 * s['median_ms'] / r['stages']['end to end']['median_ms']:.2f}% of e2e"
            peak = f"{s['peak_gb']:.1f}" if "peak_gb" in s else "-"
            rows.append([system, stage, f"{s['median_ms']:.2f}", f"{s['p90_ms']:.2f}", ratio, peak,
                         mem_s if stage == "end to end" else "", str(passes) if stage == "end to end" else ""])
    return rows


def _notes(results: dict) -> list[str]:
    lines = []
    for system, r in results["systems"].items():
        if r.get("compile_s"):
            lines.append(f"{system}: compiled in {r['compile_s']:.1f} s (first runs, kept out of the timed ones)")
        for name, how in r.get("sessions", {}).items():
            lines.append(f"{system}: {name}: {how}")
        if r.get("predicted_vram") and "CPU run" not in r["predicted_vram"]:
            lines.append(f"{system}: {r['predicted_vram']}")
        if "lora" in r:
            sw = ", ".join(f"{k} {v:.1f} ms" for k, v in r["lora"]["switch_ms"].items())
            stack = ", ".join(f"{n}:{s:g}" for n, s in r["lora"]["stack"])
            lines.append(f"{system}: LoRA {stack} (timed with it); switching is one weight update: {sw}")
    for b, why in results["skipped"].items():
        lines.append(f"not measured: runtime {b}: {why}")
    published = SGLANG.get((results["width"], results["height"]))
    if published:
        lines.append(f"published, for comparison: {published} ({SGLANG_SOURCE})")
    return lines


def format_table(results: dict) -> str:
    rows = _rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = _header(results)
    for k, r in enumerate(rows):
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(len(r))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines + _notes(results))


def save(results: dict, path) -> None:
    from zimage_trt.common.files import write_atomic, writing

    with writing(path, "pass another --json"):
        write_atomic(path, (json.dumps(results, indent=2) + "\n").encode())
