#!/usr/bin/env python3
"""Full-size Z-Image-Turbo on one GPU machine, every stage of the project at scale, in one run.

    gpu-tests        the CUDA-graph loop equals the eager loop (tests/test_engines_gpu.py, tiny model); FP8 scaled_mm,
                     graph replays and the compiled loop against their references (tests/test_torch_fast.py)
    make             the real architecture with random weights, in the real checkpoint's layout
                     (zimage-trt make-tiny --size full)
    export-cpu       zimage-trt export --device cpu --fp16-scales FILE (no calibration, no GPU), in the background
                     beside the stages that follow; its bundle is deleted once measured (--cpu-bundle DIR)
    export-fp8       zimage-trt export --dit-precision fp8 (ModelOpt FP8 calibration, Q/DQ graph), checked on the
                     GPU, uncapped (its peaks say what it needs), in the background beside the stages that follow
                     (--fp8-bundle DIR)
    build-fp8        then, in the same background thread: TensorRT-RTX builds its transformer for sm89
    export-nvfp4     then, in the same thread (or in a thread of its own beside it: --quant-side-by-side):
                     zimage-trt export --dit-precision nvfp4 (--nvfp4-bundle DIR)
    build-nvfp4      then: TensorRT-RTX builds its transformer for sm120 (a failed export skips only its build)
    export           zimage-trt export (fp16 DiT and text encoder, bf16 VAE), checked on the GPU, under
                     --max-gpu-memory (--export-cap); one size, or with --size-range every size in a range
    ort-check        the exported transformer.onnx run once by onnxruntime on the CPU beside its eager twin and
                     the float32 reference (scripts/ort_transformer_check.py)
    vram-all         the torch backend generating at the bundle's size under a --vram-cap allocator cap
    vram-sequential  the same with --vram sequential; the two images must be equal
    bench            zimage-trt bench: diffusers' eager pipeline beside the runtime
    build            zimage-trt build with TensorRT-RTX for an RTX target (sm89) over the bundle's whole range
    build-one        the same for the opt size alone (--sizes), from the same ONNX: what the range costs
    fast-bench       the fastest torch paths side by side (issue 30): zimage-trt bench --compile --fp8-bundle at
                     each of --fast-sizes (default 1024x1024,2048x2048; the bundles must cover them: --size-range),
                     diffusers eager and compiled, the runtime's torch backend eager, compiled and FP8; then the
                     FP8 transformer's error against bf16 and float32 (scripts/pass_bench.py --fp8-error); raw logs
                     and JSON in WORK/results/fast-bench/, one table printed and kept there (table.txt). It keeps
                     the fp8 bundle until it has run.
    pass-bench       one eager transformer pass per image size, with its roofline floor (scripts/pass_bench.py)

Each stage runs as its own process; its wall time, peak host memory (the child's max RSS) and peak GPU memory
(sampled with NVML every 0.2 s: the device's, and the stage's own process where NVML lists it, which tells two
stages running side by side apart; the export also records PyTorch's allocator peaks in its manifest) are
recorded in WORK/results/stages.json as soon as it ends, so a run cut short keeps what it measured. The model
folder is deleted before the build to leave disk for the engines.

    python scripts/full_size_run.py --work /root/work --size-range 512:2048 --skip bench
    python scripts/full_size_run.py --work /root/work --size-range 1024:2048 --only make,export,export-fp8,fast-bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


STAGE_NAMES = {"gpu-tests", "make", "export-cpu", "export", "export-fp8", "build-fp8", "export-nvfp4", "build-nvfp4",
               "ort-check", "vram-all", "vram-sequential", "bench", "fast-bench", "build", "build-one", "pass-bench"}


class GpuPeak:
    """Highest device memory in use while a stage runs (NVML, else nvidia-smi; None without either), and the
    highest that NVML lists for the stage's process `pid` (None where it lists no such process, e.g. in a
    container with its own PID namespace)."""

    def __init__(self):
        self.peak, self.own, self.pid, self.stop, self.read = 0, None, None, threading.Event(), self._reader()

    def _reader(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML: fall back to nvidia-smi, or to nothing
            if shutil.which("nvidia-smi") is None:
                return None
            cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"]
            return lambda: int(subprocess.run(cmd, capture_output=True, text=True).stdout.strip()) * 2**20

        def read():
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == self.pid and proc.usedGpuMemory:
                    self.own = max(self.own or 0, proc.usedGpuMemory)
            return pynvml.nvmlDeviceGetMemoryInfo(handle).used

        return read

    def __enter__(self):
        if self.read is not None:
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()
        return self

    def _loop(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.read())
            self.stop.wait(0.2)

    def __exit__(self, *exc):
        self.stop.set()


def run_stage(name: str, argv: list[str], log, env, cwd) -> dict:
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(argv)}", file=log, flush=True)
    start = time.perf_counter()
    with GpuPeak() as gpu:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        gpu.pid = proc.pid
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    record = {
        "stage": name,
        "command": " ".join(argv),
        "exit_code": code,
        "seconds": round(seconds, 1),
        "peak_host_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
        "peak_gpu_gb": round(gpu.peak / 1e9, 2) if gpu.read else None,
        "peak_gpu_process_gb": round(gpu.own / 1e9, 2) if gpu.own else None,
    }
    print(f"[{time.strftime('%H:%M:%S')}] {name}: exit {code} after {seconds:.0f} s", file=log, flush=True)
    return record


def scales_file(path: Path, size: str) -> Path:
    """FP16 rescale factors for every block, as a user passes them to skip calibration: 16 (peaks up to 64k,
    what the real weights reach, brought under the 4096 target), so the export folds as it would for them."""
    from zimage_trt.export.configs import FULL, tiny
    from zimage_trt.export.fp16 import block_names

    blocks = block_names((FULL if size == "full" else tiny(1024))["transformer"])
    path.write_text(json.dumps({b: {"attn": 16.0, "ffn": 16.0} for b in blocks}, indent=1) + "\n")
    return path


def fast_bench_stages(args, zt, model: Path, bundle: Path, fp8_bundle: Path, out: Path) -> list:
    """(name, argv, log) of the fast-bench's steps: one bench per size, then the FP8 error."""
    sizes = args.fast_sizes or ("128x128,256x256" if args.size == "tiny" else "1024x1024,2048x2048")
    cpu = not args.device.startswith("cuda")
    iters, warmup = ("2", "1") if cpu else (args.iters, "2")
    steps = []
    for size in sizes.split(","):
        steps.append((f"fast-bench {size}", zt + [
            "bench", "--model", str(model), "--bundle", str(bundle), "--fp8-bundle", str(fp8_bundle), "--compile",
            "--backends", "torch", "--device", args.device, "--size", size, "--iters", iters, "--warmup", warmup,
            "--json", str(out / f"bench-{size}.json")], out / f"bench-{size}.log"))
    first = sizes.split(",")[0]  # the FP8 path's peak with the text encoder taking turns (--vram sequential)
    steps.append((f"fast-bench {first} sequential", zt + [
        "bench", "--model", str(model), "--bundle", str(bundle), "--fp8-bundle", str(fp8_bundle), "--compile",
        "--backends", "torch", "--no-diffusers", "--vram", "sequential", "--device", args.device, "--size", first,
        "--iters", "1", "--warmup", "1", "--json", str(out / f"bench-{first}-sequential.json")],
        out / f"bench-{first}-sequential.log"))
    steps.append(("fast-bench fp8-error", [
        sys.executable, str(Path(__file__).resolve().parent / "pass_bench.py"), "--fp8-error", "--model", str(model),
        "--fp8-bundle", str(fp8_bundle), "--sizes", sizes, "--device", args.device,
        "--json", str(out / "fp8_error.json")], out / "fp8_error.log"))
    return steps


FAST_HEAD = ["size", "system", "text enc", "pass", "passes", "VAE", "e2e", "e2e p90", "peak GB", "x floor",
             "compile s"]


def _fast_row(size: str, system: str, s: dict, floor: dict) -> list[str]:
    """One system's line: stage medians (ms), end to end's p90, its peak GPU memory, end to end as a multiple of
    the image's floor (text encoder + its passes + VAE), and its compile time."""
    st = s["stages"]
    ms = [st.get(k, {}).get("median_ms") for k in ("text encoder", "transformer x1", "all passes", "VAE decode",
                                                     "end to end")]
    image_floor = floor["text encoder"] + s.get("passes", 9) * floor["transformer x1"] + floor["VAE decode"]
    peak = st.get("end to end", {}).get("peak_gb")
    where = size + (" seq" if s.get("vram") == "sequential" else "")
    return ([where, system] + [f"{v:.1f}" if v is not None else "-" for v in ms]
            + [f"{st['end to end']['p90_ms']:.1f}", f"{peak:.1f}" if peak else "-", f"{ms[4] / image_floor:.2f}",
               f"{s.get('compile_s', 0):.0f}"])


def _fp8_error_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    e = json.loads(path.read_text())
    lines = ["", f"FP8 transformer, one pass, max|err|/max|ref| (fake-quantized twin: {e['twin_rel_vs_fp32']:.1e} "
                 "vs float32)"]
    return lines + [f"  {row['size']}: vs bf16 {row['rel_vs_bf16']:.2e}, vs float32 {row['rel_vs_fp32']:.2e} "
                    f"(bf16 alone vs float32 {row['bf16_vs_fp32']:.2e})" for row in e["rows"]]


def fast_table(out: Path) -> str:
    """One table of the fast-bench's results (a line per size and system), the FP8 error, SGLang's figures."""
    rows, notes = [FAST_HEAD], []
    for path in sorted(out.glob("bench-*.json")):
        r = json.loads(path.read_text())
        for system, s in r["systems"].items():
            rows.append(_fast_row(f"{r['width']}x{r['height']}", system, s, s.get("floor_ms", r["floor_ms"])))
        notes += [line for line in r.get("table", "").splitlines() if line.startswith("published")][:1]
    widths = [max(len(row[i]) for row in rows) for i in range(len(FAST_HEAD))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + _fp8_error_lines(out / "fp8_error.json") + sorted(set(notes))) + "\n"


def run_fast_bench(args, zt, model, bundle, fp8_bundle, results, env, work, records, save) -> None:
    out = results / "fast-bench"
    out.mkdir(parents=True, exist_ok=True)
    for name, argv, log_path in fast_bench_stages(args, zt, model, bundle, fp8_bundle, out):
        with open(log_path, "w") as log:
            records.append(run_stage(name, argv, log, env, work))
        save()
    table = fast_table(out)
    (out / "table.txt").write_text(table)
    print(table, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder for the model, bundle, engines and results")
    ap.add_argument("--skip", default="", help=f"comma-separated stages to skip ({','.join(sorted(STAGE_NAMES))})")
    ap.add_argument("--size-range", help="export every size in MIN:MAX (default: one size, 1024x1024)")
    ap.add_argument("--opt-size", default="1024x1024", help="the opt size of --size-range (default 1024x1024)")
    ap.add_argument("--build-networks", default="text_encoder,transformer,vae_decoder",
                    help="networks to build (the text encoder's engine does not depend on the image size)")
    ap.add_argument("--export-cap", default="22GiB", help="--max-gpu-memory of the export stage (default 22GiB)")
    ap.add_argument("--vram-cap", default="24GiB", help="allocator cap of the vram-* stages (default 24GiB)")
    ap.add_argument("--cpu-bundle", help="where export-cpu writes (default WORK/bundle-cpu; another disk if short)")
    ap.add_argument("--fp8-bundle", help="where export-fp8 writes (default WORK/bundle-fp8; another disk if short)")
    ap.add_argument("--nvfp4-bundle", help="where export-nvfp4 writes (default WORK/bundle-nvfp4)")
    ap.add_argument("--quant-side-by-side", action="store_true",
                    help="run the nvfp4 export and build in their own thread beside the fp8 pair, not after it "
                         "(faster; the two exports' host peaks may then add up)")
    ap.add_argument("--only", default="", help="comma-separated stages to run, every other one skipped")
    ap.add_argument("--fast-sizes", help="fast-bench: image sizes (default 1024x1024,2048x2048; tiny: 128x128,256x256)")
    ap.add_argument("--iters", default="5", help="timed generations per system in the bench (default 5)")
    ap.add_argument("--size", default="full", choices=("full", "tiny"), help="tiny: a quick dry run of the stages")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared" / "real-model" / "tokenizer"),
                    help="the real Qwen3 tokenizer folder for the full-size model (default ../shared/real-model/tokenizer "
                    "beside the checkout; carry a copy to a machine without it)")
    args = ap.parse_args()
    work = Path(args.work)
    results = work / "results"
    results.mkdir(parents=True, exist_ok=True)
    model, bundle, engines = work / "model", work / "bundle", work / "engines"
    skip = set(filter(None, args.skip.split(",")))
    if args.only:
        skip |= STAGE_NAMES - set(args.only.split(","))
    zt = [sys.executable, "-m", "zimage_trt.cli"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    repo = Path(__file__).resolve().parents[1]
    # Run outside the checkout, so the installed zimage_trt is imported and not the checkout's top folder
    # (whose subpackages are mapped from the repo root by pyproject.toml).
    shutil.rmtree(work / "tests", ignore_errors=True)
    shutil.copytree(repo / "tests", work / "tests")

    sizes = (["--size-range", args.size_range, "--opt-size", args.opt_size] if args.size_range
             else ["--height", "256", "--width", "256"] if args.size == "tiny" else [])
    build = zt + ["build", "--bundle", str(bundle), "--backend", "tensorrt-rtx", "--target", "sm89",
                  "--networks", args.build_networks]
    cpu_bundle = Path(args.cpu_bundle) if args.cpu_bundle else work / "bundle-cpu"
    fp8_bundle = Path(args.fp8_bundle) if args.fp8_bundle else work / "bundle-fp8"
    nvfp4_bundle = Path(args.nvfp4_bundle) if args.nvfp4_bundle else work / "bundle-nvfp4"
    cap = ["--max-gpu-memory", args.export_cap] if args.device.startswith("cuda") else []
    capped = [sys.executable, str(repo / "scripts" / "capped.py"), args.vram_cap, "generate", "--bundle", str(bundle),
              "--backend", "torch", "--model", str(model), "--torch-dtype", "fp16", "--device", args.device,
              "--prompt", "A red fox in fresh snow at sunrise", "--seed", "1"]
    stages = [
        ("gpu-tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-n", "0",
                       str(work / "tests" / "test_engines_gpu.py"), str(work / "tests" / "test_torch_fast.py")]),
        ("make", zt + ["make-tiny", str(model), "--size", args.size, "--device", args.device]
                 + (["--tokenizer", args.tokenizer] if args.size == "full" and Path(args.tokenizer).is_dir() else [])),
        ("export-cpu", zt + ["export", "--model", str(model), "--out", str(cpu_bundle), "--device", "cpu", "--force",
                             "--fp16-scales", str(scales_file(results / "fp16_scales.json", args.size))] + sizes),
        ("export-fp8", zt + ["export", "--model", str(model), "--out", str(fp8_bundle), "--device", args.device,
                             "--force", "--dit-precision", "fp8"] + sizes
                       + (["--vae-precision", "fp32"] if args.size == "tiny" else [])),
        ("build-fp8", zt + ["build", "--bundle", str(fp8_bundle), "--backend", "tensorrt-rtx", "--target", "sm89",
                            "--networks", "transformer", "--out", str(work / "engines-fp8")]),
        ("export-nvfp4", zt + ["export", "--model", str(model), "--out", str(nvfp4_bundle), "--device", args.device,
                               "--force", "--dit-precision", "nvfp4"] + sizes
                         + (["--vae-precision", "fp32"] if args.size == "tiny" else [])),
        ("build-nvfp4", zt + ["build", "--bundle", str(nvfp4_bundle), "--backend", "tensorrt-rtx", "--target",
                              "sm120", "--networks", "transformer", "--out", str(work / "engines-nvfp4")]),
        ("export", zt + ["export", "--model", str(model), "--out", str(bundle), "--device", args.device, "--force"]
                   + cap + sizes + (["--vae-precision", "fp32"] if args.size == "tiny" else [])),
        ("ort-check", [sys.executable, str(repo / "scripts" / "ort_transformer_check.py"), "--bundle", str(bundle),
                       "--model", str(model), "--device", args.device, "--json", str(results / "ort_check.json")]),
        ("vram-all", capped + ["--vram", "all", "--out", str(results / "vram-all.png")]),
        ("vram-sequential", capped + ["--vram", "sequential", "--out", str(results / "vram-sequential.png")]),
        ("bench", zt + ["bench", "--model", str(model), "--bundle", str(bundle), "--device", args.device,
                        "--iters", args.iters, "--json", str(results / "bench.json")]),
        ("fast-bench", []),  # several steps: run_fast_bench
        ("build", build + ["--out", str(engines)]),
        ("build-one", build + ["--out", str(work / "engines-one"), "--sizes", args.opt_size]),
        # last: needs no model, and the GPU is otherwise idle by then
        ("pass-bench", [sys.executable, str(repo / "scripts" / "pass_bench.py"), "--size", args.size]
                       + (["--sizes", "128x128,256x256,256x128"] if args.size == "tiny" else [])),
    ]
    if not args.size_range:
        stages = [s for s in stages if s[0] != "build-one"]
    records, background = [], []

    def save():
        (results / "stages.json").write_text(json.dumps(records, indent=2) + "\n")

    def in_background(chain):
        """Run the (name, argv, bundle, kept manifest) stages of `chain` in turn, a build only if its export
        succeeded. Once a bundle's last stage is done, keep its manifest as results/<kept> and delete it
        (measured; its disk goes back to the other stages)."""
        failed = set()
        for k, (name, argv, out, keep) in enumerate(chain):
            kind = name.split("-", 1)[1]
            if not (name.startswith("build") and (kind in failed or not rtx_importable(name))):
                record = run_stage(name, argv, log, env, work)
                records.append(record)
                save()
                if record["exit_code"] != 0:
                    failed.add(kind)
            if k + 1 < len(chain) and chain[k + 1][2] == out:
                continue  # this bundle's build comes next
            if out == fp8_bundle and "fast-bench" not in skip:
                continue  # fast-bench reads it, then deletes it
            if (out / "manifest.json").exists():
                shutil.copy(out / "manifest.json", results / keep)
            shutil.rmtree(out, ignore_errors=True)

    def rtx_importable(name):
        try:
            import tensorrt_rtx  # noqa: F401
        except ImportError as exc:
            records.append({"stage": name, "skipped": f"tensorrt_rtx not importable: {exc}"})
            return False
        return True

    # stages that run in a background thread beside the rest: name -> (the chain, its bundle, its kept manifest)
    commands = dict(stages)
    quantized = [("export-fp8", fp8_bundle, "manifest-fp8.json"), ("build-fp8", fp8_bundle, "manifest-fp8.json"),
                 ("export-nvfp4", nvfp4_bundle, "manifest-nvfp4.json"),
                 ("build-nvfp4", nvfp4_bundle, "manifest-nvfp4.json")]
    quantized = [(n, commands[n], out, keep) for n, out, keep in quantized]
    # one after another by default: each uncapped quantizing export takes about what the capped fp16 export takes
    chains = {"export-cpu": [("export-cpu", commands["export-cpu"], cpu_bundle, "manifest-cpu.json")],
              **({"export-fp8": quantized[:2], "export-nvfp4": quantized[2:]} if args.quant_side_by_side
                 else {"export-fp8": quantized})}
    chained = {stage[0] for chain in chains.values() for stage in chain[1:]}  # run by their chain's thread
    chains = {start: [stage for stage in chain if stage[0] not in skip] for start, chain in chains.items()}
    log = open(work / "run.log", "a")
    with log:
        for name, argv in stages:
            if name in chained:
                continue
            if name in chains:  # started where its first stage stands, even if that one is skipped
                if not chains[name]:
                    continue
                thread = threading.Thread(target=in_background, args=(chains[name],))
                thread.start()
                background.append(thread)
                continue
            if name in skip:
                continue
            if name == "fast-bench":
                for thread in background:  # the fp8 bundle comes from a background chain
                    thread.join()
                run_fast_bench(args, zt, model, bundle, fp8_bundle, results, env, work, records, save)
                if (fp8_bundle / "manifest.json").exists():
                    shutil.copy(fp8_bundle / "manifest.json", results / "manifest-fp8.json")
                shutil.rmtree(fp8_bundle, ignore_errors=True)
                continue
            if name == "make" and model.exists():
                shutil.rmtree(model)
            if name.startswith("build"):
                if not rtx_importable(name):
                    continue
                for thread in background:  # they read the model: it goes only once they are done
                    thread.join()
                shutil.rmtree(model, ignore_errors=True)  # the engines need the disk the model held
            record = run_stage(name, argv, log, env, work)
            records.append(record)
            if name == "vram-sequential":
                a, b = results / "vram-all.png", results / "vram-sequential.png"
                record["same_image_as_all"] = a.exists() and b.exists() and a.read_bytes() == b.read_bytes()
            save()
            if record["exit_code"] != 0 and name in ("make", "export"):
                break
        for thread in background:
            thread.join()
    for f in [bundle / "manifest.json", *sorted(engines.glob("*.engine.json"))]:
        if f.exists():
            shutil.copy(f, results / f.name)
    for fmt in ("fp8", "nvfp4"):
        for f in sorted((work / f"engines-{fmt}").glob("*.engine.json")):
            shutil.copy(f, results / f"{fmt}.{f.name}")
    for f in sorted((work / "engines-one").glob("*.engine.json")):
        shutil.copy(f, results / f"one-size.{f.name}")
    save()
    (work / "done").write_text("done\n")
    return 0 if all(r.get("exit_code", 0) == 0 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
