#!/usr/bin/env python3
"""onnxruntime-gpu on one GPU machine, in one command: parity at three sizes with the FP16 peaks, then the bench
beside diffusers and the torch backend, raw logs kept, one table printed.

    gpu-tests    tests/test_ort_gpu.py on the GPU (stream binding, no host wait, CUDA-graph replay = eager)
    probe-bf16   a tiny model's bundle with the card's bf16 VAE, `parity --backend onnxruntime --fp16-peaks` on it:
                 where onnxruntime refuses the bf16 VAE (one line), the full export takes --vae-precision fp32
    probe-fp8    a tiny fp8 bundle (ModelOpt Q/DQ) through the same parity: its float8e4m3fn Q/DQ run on the
                 CUDA provider, or the one line saying they cannot
    make         the real architecture with random weights (zimage-trt make-tiny --size full)
    export       one bundle for every size from the smallest to the largest checked (fp16 DiT and text encoder)
    parity       zimage-trt parity --backend onnxruntime --device D --size S1,S2,S3 --fp16-peaks: every stage
                 against the float32 eager reference and diffusers, and the FP16 peaks per block
    bench        zimage-trt bench --backends torch,onnxruntime: diffusers eager, runtime torch and runtime
                 onnxruntime per stage (text encoder, pass, all passes, VAE, end to end, overhead, peak GPU memory)

Each stage is a process of its own, timed and sampled for peak memory by scripts/full_size_run.py's run_stage;
its output goes to WORK/results/STAGE.log and its record to WORK/results/stages.json as soon as it ends. The
table at the end is read from those logs and bench.json (WORK/results/table.txt). onnxruntime-gpu must be
importable first (scripts/carry_ort_gpu.py carries it: PYTHONPATH=/tmp/site).

    python scripts/ort_gpu_run.py --work /root/ortrun                                   # the GPU run
    python scripts/ort_gpu_run.py --work /tmp/ortrun --size tiny --device cpu           # its rehearsal on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from full_size_run import run_stage  # noqa: E402  (the project's stage runner: wall time, host and GPU peaks)

SIZES = {"full": "1024x1024,1536x1024,2048x2048", "tiny": "128x128,192x128,256x256"}
PROBE_SIZE = "128x128"
VAE_REFUSAL = re.compile(r"vae_decoder is a BF16 graph.*")


def stage_argv(args, work: Path, zt: list[str], vae: str) -> dict[str, list[str]]:
    """Every stage's command line (the export's VAE precision as the bf16 probe decided)."""
    sizes = args.sizes.split(",")
    dims = [tuple(map(int, s.split("x"))) for s in sizes]
    lo, hi = min(min(d) for d in dims), max(max(d) for d in dims)
    model = work / "model"
    tokenizer = ["--tokenizer", args.tokenizer] if args.size == "full" and Path(args.tokenizer).is_dir() else []
    return {
        "make": zt + ["make-tiny", str(model), "--size", args.size, "--device", args.device] + tokenizer,
        "export": zt + ["export", "--model", str(model), "--out", str(work / "bundle"), "--device", args.device,
                        "--force", "--size-range", f"{lo}:{hi}", "--opt-size", sizes[0], "--vae-precision", vae],
        "parity": zt + ["parity", "--model", str(model), "--bundle", str(work / "bundle"), "--backend", "onnxruntime",
                        "--device", args.device, "--size", args.sizes, "--fp16-peaks"],
        "bench": zt + ["bench", "--model", str(model), "--bundle", str(work / "bundle"), "--device", args.device,
                       "--backends", "torch,onnxruntime", "--size", args.bench_size or sizes[0], "--iters",
                       str(args.iters), "--json", str(work / "results" / "bench.json")],
    }


def probe_argv(work: Path, zt: list[str], device: str, kind: str) -> list[tuple[str, list[str]]]:
    """A tiny model, its one-size bundle (kind: bf16 = the card's precisions, fp8 = the Q/DQ transformer), and
    parity with the FP16 peaks on it, as (step, argv)."""
    model, bundle = work / "probe-model", work / f"probe-{kind}"
    w, h = PROBE_SIZE.split("x")
    precision = ["--vae-precision", "bf16"] if kind == "bf16" else ["--dit-precision", "fp8", "--vae-precision", "fp32"]
    steps = [] if (model / "model_index.json").exists() else [("make", zt + ["make-tiny", str(model)])]
    return steps + [
        ("export", zt + ["export", "--model", str(model), "--out", str(bundle), "--force", "--width", w, "--height", h]
         + precision),
        ("parity", zt + ["parity", "--model", str(model), "--bundle", str(bundle), "--backend", "onnxruntime",
                         "--device", device, "--fp16-peaks"]),
    ]


def run_logged(name: str, steps: list[tuple[str, list[str]]], results: Path, env, work: Path, records: list) -> int:
    """Run a stage's steps in turn into results/NAME.log, stopping at the first that fails; its exit code."""
    code = 0
    with open(results / f"{name}.log", "w") as log:
        for step, argv in steps:
            record = run_stage(name if step == name else f"{name}.{step}", argv, log, env, work)
            records.append(record)
            (results / "stages.json").write_text(json.dumps(records, indent=2) + "\n")
            code = record["exit_code"]
            if code != 0:
                break
    return code


def tables(text: str) -> list[tuple[str, list[list[str]]]]:
    """Every table the CLI printed in a log, as (the line above it, its rows of cells): a header, a line of dashes
    whose runs give the columns, then rows up to the first line that does not reach the last column."""
    lines, found = text.splitlines(), []
    for i in range(1, len(lines)):
        if not re.fullmatch(r"-+( {2}-+)+\s*", lines[i]):
            continue
        spans = [m.span() for m in re.finditer(r"-+", lines[i])]
        rows = []
        for line in lines[i + 1:]:
            if len(line.rstrip()) <= spans[-1][0]:
                break
            rows.append([line[a:(spans[k + 1][0] if k + 1 < len(spans) else None)].strip()
                         for k, (a, _) in enumerate(spans)])
        found.append((lines[i - 2] if i >= 2 else "", rows))
    return found


def parity_rows(text: str) -> list[list[str]]:
    """The rows of the parity tables in a log: stage, backend, precision, max|err|, error, bound, verdict."""
    return [r for _, rows in tables(text) for r in rows if len(r) == 7]


def peak_rows(text: str) -> list[list[str]]:
    """Per FP16 peaks table in a log (one per size): its worst block and verdict."""
    out = []
    for title, rows in tables(text):
        m = re.match(r"FP16 peaks, .* at (\S+),", title)
        if not m or not rows:
            continue
        worst = max(rows, key=lambda r: float("inf") if r[4] == "OVERFLOW" else float(r[1]))
        verdict = "OVERFLOW" if any(r[4] == "OVERFLOW" for r in rows) else "ok"
        out.append(["FP16 peaks", m.group(1), f"worst {worst[0]}: {worst[1]} ({worst[3]} of 65504, {worst[2]})",
                    verdict])
    return out


def summary(results: Path, records: list, vae: str) -> str:
    """One table from the logs (probes, placement, parity, FP16 peaks, bench, stage records), the lines a stage
    stopped with as notes below it."""
    rows, notes = [["part", "item", "figure", "verdict"]], []
    tests = results / "gpu-tests.log"
    for line in tests.read_text().splitlines() if tests.exists() else []:
        if line.startswith("onnxruntime CUDA-graph replay waits"):
            rows.append(["gpu-tests", "replay waits for the GPU", line.rsplit(":", 1)[1].strip(), ""])
    for name in ("probe-bf16", "probe-fp8", "parity"):
        path = results / f"{name}.log"
        text = path.read_text() if path.exists() else ""
        for line in text.splitlines():
            if line.startswith("onnxruntime CUDA, "):
                item, figure = line[len("onnxruntime CUDA, "):].split(": ", 1)
                rows.append([f"{name} placement", item, figure, placement_verdict(item, figure)])
            if line.startswith("error: "):
                notes.append(f"{len(notes) + 1}. {name}: {line[7:]}")
                rows.append([name, "stopped", f"see note {len(notes)}", ""])
        rows += [[name, f"{r[0]} ({r[2]})", f"{r[4]} (bound {r[5]})", r[6]] for r in parity_rows(text)]
        rows += [[name, f"FP16 peaks {r[1]}"] + r[2:] for r in peak_rows(text)]
    rows.append(["export", "VAE precision", vae, ""])
    rows += bench_rows(results / "bench.json")
    gpu = lambda r: "-" if r["peak_gpu_gb"] is None else f"{r['peak_gpu_gb']} GB"  # noqa: E731
    rows += [["stage", r["stage"], f"exit {r['exit_code']}, {r['seconds']} s, host {r['peak_host_gb']} GB, GPU "
              f"{gpu(r)}", verdict(r)] for r in records]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  -------")
    return "\n".join(lines + (["", "notes:"] + notes if notes else []))


def placement_verdict(item: str, figure: str) -> str:
    """The transformer must run whole on the GPU: no compute node off it, no host copy (the others are shown)."""
    if not item.startswith("transformer"):
        return ""
    return "ok" if " 0 compute nodes off it" in figure and " 0 host copies" in figure else "FAIL"


def verdict(record: dict) -> str:
    """A probe that stops is an answer (onnxruntime refused that precision, in one line); any other stage fails."""
    if record["exit_code"] == 0:
        return "ok"
    return "refused" if re.fullmatch(r"probe-\w+\.parity", record["stage"]) else "FAIL"


def bench_rows(path: Path) -> list[list[str]]:
    """Per system and stage: median and p90 ms, the allocator's peak while the stage ran; per system the device
    memory it held."""
    if not path.exists():
        return [["bench", "results", "none (see bench.log)", "FAIL"]]
    results = json.loads(path.read_text())
    rows = [["bench", "device", f"{results['device']}, {results['width']}x{results['height']}", ""]]
    for system, r in results["systems"].items():
        for stage, s in r["stages"].items():
            peak = f", peak {s['peak_gb']:.1f} GB" if "peak_gb" in s else ""
            rows.append(["bench", f"{system}: {stage}", f"{s['median_ms']:.2f} ms (p90 {s['p90_ms']:.2f}){peak}", ""])
        held = r.get("memory", {}).get("device_used_gb")
        if held is not None:
            rows.append(["bench", f"{system}: device memory held", f"{held:.1f} GB", ""])
    rows += [["bench", f"runtime {b}", why, "not measured"] for b, why in results.get("skipped", {}).items()]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder for the models, bundles and results")
    ap.add_argument("--size", default="full", choices=("full", "tiny"), help="tiny: the rehearsal's model")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for the rehearsal")
    ap.add_argument("--sizes", help="parity sizes, the first also the opt size (default: 1024x1024,1536x1024,"
                    "2048x2048; tiny: 128x128,192x128,256x256)")
    ap.add_argument("--bench-size", help="the bench's image size (default: the first of --sizes)")
    ap.add_argument("--iters", type=int, default=5, help="timed generations per system in the bench (default 5)")
    ap.add_argument("--skip", default="", help="comma-separated stages to skip (gpu-tests,probe-bf16,probe-fp8,make,"
                    "export,parity,bench)")
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[2] / "shared" / "real-model" /
                    "tokenizer"), help="the real Qwen3 tokenizer for the full-size model (as full_size_run.py)")
    args = ap.parse_args()
    args.sizes = args.sizes or SIZES[args.size]
    work = Path(args.work).resolve()
    results = work / "results"
    results.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    zt = [sys.executable, "-m", "zimage_trt.cli"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    repo = Path(__file__).resolve().parents[1]
    # run outside the checkout, so the installed zimage_trt is imported (as full_size_run.py does)
    shutil.rmtree(work / "tests", ignore_errors=True)
    shutil.copytree(repo / "tests", work / "tests")
    records: list = []
    run = lambda name, argv_list: run_logged(name, argv_list, results, env, work, records)  # noqa: E731

    if "gpu-tests" not in skip and args.device.startswith("cuda"):
        run("gpu-tests", [("gpu-tests", [sys.executable, "-m", "pytest", "-q", "-rP", "-n", "0", "-m", "gpu",
                                         str(work / "tests" / "test_ort_gpu.py")])])
    vae = "bf16" if args.device.startswith("cuda") else "fp32"  # onnxruntime's CPU provider has no BF16 kernels
    if "probe-bf16" not in skip:
        run("probe-bf16", probe_argv(work, zt, args.device, "bf16"))
        vae = "fp32" if VAE_REFUSAL.search((results / "probe-bf16.log").read_text()) else "bf16"
    if "probe-fp8" not in skip:
        run("probe-fp8", probe_argv(work, zt, args.device, "fp8"))
    commands = stage_argv(args, work, zt, vae)
    for name in ("make", "export", "parity", "bench"):
        if name in skip:
            continue
        if name == "make":
            shutil.rmtree(work / "model", ignore_errors=True)
        if run(name, [(name, commands[name])]) != 0 and name in ("make", "export"):
            break
    table = summary(results, records, vae)
    (results / "table.txt").write_text(table + "\n")
    print(table)
    return 0 if all(verdict(r) != "FAIL" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
