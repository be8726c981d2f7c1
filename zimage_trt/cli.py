"""`zimage-trt`: the one command. Each subcommand is a small function; heavy imports happen inside it.

Errors a user can fix print as one line (`error: ...`) with exit status 2, and so does any OSError (a full disk,
a read-only folder); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from zimage_trt.common.errors import UserError

PRECISIONS = ("fp32", "fp16", "bf16")


def _quiet_libraries() -> None:
    # Local folders only, and no library chatter over our own progress bars.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


# ------------------------------------------------------------------------------------------ make-tiny
def cmd_make_tiny(args) -> None:
    from zimage_trt.export.tiny import make_tiny

    try:
        out = make_tiny(args.dir, seed=args.seed, size=args.size, device=args.device, tokenizer=args.tokenizer)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    print(f"wrote a {args.size} random Z-Image-Turbo (seed {args.seed}) to {out}")


# ------------------------------------------------------------------------------------------ export
def _precisions(args) -> dict:
    from zimage_trt.export.bundle import DEFAULT_PRECISION

    prec = dict(DEFAULT_PRECISION)
    if args.precision:
        prec = {"text_encoder": args.precision, "transformer": args.precision, "vae_decoder": args.precision}
        if args.precision == "fp16":
            prec["vae_decoder"] = DEFAULT_PRECISION["vae_decoder"]  # the VAE never runs in fp16
    for key, value in (
        ("text_encoder", args.text_encoder_precision),
        ("transformer", args.dit_precision),
        ("vae_decoder", args.vae_precision),
    ):
        if value:
            prec[key] = value
    return prec


def _load_scales(path):
    import json

    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--fp16-scales {path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"--fp16-scales {path} is not valid JSON ({exc})") from None
    return data.get("networks", {}).get("transformer", {}).get("fp16_scales", data)


def _read_prompts(path):
    from zimage_trt.calibration import parse_prompts

    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--calibration-prompts {path}: no such file")
    prompts = parse_prompts(p.read_text("utf-8"))
    if not prompts:
        raise UserError(f"--calibration-prompts {path} holds no prompts")
    return prompts


def _export_sizes(args):
    """--size-range MIN:MAX [--opt-size WxH] -> a SizeRange; None for the one-size --width/--height bundle."""
    from zimage_trt.runtime.sizes import SizeRange, parse_size

    if args.size_range is None:
        if args.opt_size is not None:
            raise UserError("--opt-size goes with --size-range; a one-size bundle takes --width and --height")
        return None
    if args.height is not None or args.width is not None:
        raise UserError("--size-range and --width/--height exclude each other: a range, or one size")
    return SizeRange.square_range(args.size_range, parse_size(args.opt_size or "1024x1024", "--opt-size"))


def parse_bytes(text: str, what: str) -> int:
    """'22GiB', '22GB', '22G' or '22' (GiB) -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|G|MiB|MB|M)?\s*", text or "")
    if not m or float(m[1]) <= 0:
        raise UserError(f"{what} {text!r} is not a size; write it like 22GiB or 20GB")
    unit = {"GiB": 2**30, "G": 2**30, None: 2**30, "GB": 10**9, "MiB": 2**20, "M": 2**20, "MB": 10**6}[m[2]]
    return int(float(m[1]) * unit)


def _lora_source(text: str) -> tuple[str, float]:
    """export --lora FILE[:SCALE]: an original LoRA file (any format diffusers reads) and its scale."""
    from zimage_trt.runtime.lora import parse_lora_arg

    path, scale = parse_lora_arg(text)
    if not Path(path).is_file():
        raise UserError(f"--lora {text}: no such file {path}")
    return path, scale


def _measured_peaks(device: str) -> str:
    """This process's measured peaks: host max RSS, and PyTorch's allocator on a GPU."""
    import torch

    from zimage_trt.common.peaks import host_peak_bytes

    host = host_peak_bytes()
    gpu = (f", GPU {torch.cuda.max_memory_reserved(torch.device(device)) / 1e9:.1f} GB (PyTorch's allocator)"
           if device.startswith("cuda") else "")
    return f"measured peaks: host {host / 1e9:.1f} GB{gpu}"


def cmd_export(args) -> None:
    from zimage_trt.export.bundle import ExportOptions, export_bundle
    from zimage_trt.export.onnx_export import CheckResult

    opts = ExportOptions(
        height=1024 if args.height is None else args.height,
        width=1024 if args.width is None else args.width,
        size_range=_export_sizes(args),
        precision=_precisions(args),
        opset=args.opset,
        device=args.device,
        check=args.check,
        fp16_scales=_load_scales(args.fp16_scales),
        calibration_prompts=_read_prompts(args.calibration_prompts),
        quant_skip=args.quant_skip,
        loras=[_lora_source(text) for text in args.lora or []],
        max_gpu_memory=parse_bytes(args.max_gpu_memory, "--max-gpu-memory") if args.max_gpu_memory else None,
        force=args.force,
    )
    start = time.perf_counter()
    manifest = export_bundle(args.model, args.out, opts)
    print(f"bundle written to {args.out} in {time.perf_counter() - start:.1f} s; {_measured_peaks(opts.device)}")
    for check in manifest["checks"]:
        print("  " + CheckResult(**check).line())


# ------------------------------------------------------------------------------------------ build
def cmd_build(args) -> None:
    from zimage_trt.engine.build import BuildOptions, build_engines

    targets = [t for t in args.target.split(",") if t.strip()] if args.target else ["auto"]
    opts = BuildOptions(
        backend=args.backend,
        targets=targets,
        sizes=_size_list(args.sizes, "--sizes") if args.sizes else None,
        opt_tokens=args.opt_tokens,
        networks=tuple(args.networks.split(",")) if args.networks else BuildOptions().networks,
        refittable=args.refittable,
        weight_streaming=args.weight_streaming,
        force=args.force,
        check_memory=not args.skip_memory_check,
        opt_level=args.opt_level,
        verbose=args.verbose,
    )
    results = build_engines(args.bundle, args.out, opts)
    print(f"{'network':<13} {'status':<8} {'seconds':>8} {'MB':>9}  reason")
    for r in results:
        mb = r.meta["build"]["engine_bytes"] / 1e6
        print(f"{r.network:<13} {r.status:<8} {r.seconds:8.1f} {mb:9.1f}  {r.reason}")
    print(f"engines in {args.out} (each with a .json sidecar)")


# ------------------------------------------------------------------------------------------ generate
def _size_list(text: str, what: str) -> list[tuple[int, int]]:
    from zimage_trt.runtime.sizes import parse_size

    sizes = [parse_size(t, what) for t in text.split(",") if t.strip()]
    if not sizes:
        raise UserError(f"{what} needs at least one WIDTHxHEIGHT")
    return sizes


def _one_size(text, bundle):
    """--size WxH (or auto / absent: the bundle's opt size)."""
    from zimage_trt.runtime.sizes import parse_size

    return bundle.sizes.opt if text in (None, "auto") else parse_size(text, "--size")


def _sessions(args, bundle):
    from zimage_trt.sessions import open_sessions, resolve_device

    device = resolve_device(args.device)
    sessions = open_sessions(
        args.backend,
        bundle,
        device,
        model_dir=args.model,
        engines=args.engines,
        torch_dtype=args.torch_dtype,
        weight_budget=_weight_budget(args),
        vram=getattr(args, "vram", "all"),
    )
    return sessions, device


def _weight_budget(args) -> int | None:
    """--weight-budget GB -> bytes (None: every weight on the GPU)."""
    gb = getattr(args, "weight_budget", None)
    if gb is None:
        return None
    if not gb > 0:
        raise UserError(f"--weight-budget must be a positive number of GB, not {gb}")
    if getattr(args, "backend", "tensorrt") != "tensorrt":
        raise UserError("--weight-budget is for --backend tensorrt (engines built with --weight-streaming)")
    return int(gb * 1e9)


def cmd_generate(args) -> None:
    from zimage_trt.runtime.bundle import Bundle
    from zimage_trt.runtime.pipeline import ZImageRuntime, save_png

    bundle = Bundle.open(args.bundle)
    size = _one_size(args.size, bundle)
    bundle.sizes.check(*size, f"bundle {bundle.root}")  # before any session is opened
    sessions, device = _sessions(args, bundle)
    guidance = _guidance(args)
    loras = _loras(args, bundle)
    rt = ZImageRuntime(bundle, sessions, device, steps=args.steps, generator_device=args.generator_device,
                       vram=args.vram)
    from zimage_trt.runtime.memory import describe, measured_line, vram_plan

    print(describe(vram_plan(rt), args.vram))
    if loras:
        seconds = rt.set_loras(loras)
        print(f"LoRA {_describe_loras(loras)} applied in {seconds * 1e3:.0f} ms")
    start = time.perf_counter()
    pixels = rt.generate(args.prompt, args.seed, size=size, guidance=guidance)
    elapsed = time.perf_counter() - start
    save_png(pixels, args.out)
    passes = rt.schedule.passes + (sum(guidance.guided_steps(rt.schedule)) if guidance else 0)
    print(f"{args.out}: {size[0]}x{size[1]}, {passes} transformer passes, {args.backend}, {elapsed:.2f} s")
    if measured_line(device):
        print(measured_line(device))


def _loras(args, bundle) -> list:
    """--lora L.safetensors[:STRENGTH], repeatable -> [(Lora, strength)] (files made by `zimage-trt lora`)."""
    from zimage_trt.runtime.lora import load_lora, parse_lora_arg

    stack = []
    for text in args.lora or []:
        path, strength = parse_lora_arg(text)
        stack.append((load_lora(path, bundle), strength))
    return stack


def _describe_loras(stack) -> str:
    from zimage_trt.runtime.lora import describe

    return describe(stack)


def _guidance(args):
    """--guidance-scale G [--negative-prompt TEXT --cfg-normalization C --cfg-truncation T]; None for G = 0."""
    from zimage_trt.runtime.pipeline import Guidance

    if args.guidance_scale < 0:
        raise UserError(f"--guidance-scale must be 0 (off, the default) or positive, not {args.guidance_scale}")
    if args.guidance_scale == 0:
        if args.negative_prompt:
            raise UserError("--negative-prompt needs --guidance-scale above 0 (with guidance 0 it has no effect)")
        return None
    return Guidance(args.guidance_scale, args.negative_prompt or "", args.cfg_normalization, args.cfg_truncation)


# ------------------------------------------------------------------------------------------ parity
def cmd_parity(args) -> None:
    from zimage_trt.parity import run_parity
    from zimage_trt.runtime.bundle import Bundle

    bundle = Bundle.open(args.bundle)
    sizes = _size_list(args.size, "--size") if args.size else [bundle.sizes.opt]
    for size in sizes:
        bundle.sizes.check(*size, f"bundle {bundle.root}")
    backend = "tensorrt" if args.engines else args.backend
    args.backend = backend
    if args.against or args.against_engines:
        return _parity_against(args, bundle, sizes)
    sessions, device = _sessions(args, bundle)
    _report_parity(run_parity(args.model, bundle, sessions, backend, args.prompt, args.seed, device, sizes,
                              guidance=_guidance(args), loras=_loras(args, bundle)))


def _parity_against(args, bundle, sizes) -> None:
    """parity --against OTHER: this bundle's stages against OTHER's, on the same backend."""
    import copy

    from zimage_trt.parity import run_against
    from zimage_trt.runtime.bundle import Bundle

    if not args.against:
        raise UserError("--against-engines names the engines of the --against bundle; add --against BUNDLE")
    if args.backend == "torch":
        raise UserError("--against compares two bundles' graphs or engines: use --backend onnxruntime or tensorrt")
    if args.backend == "tensorrt" and not args.against_engines:
        raise UserError("--against with --engines needs the other bundle's engines too: add --against-engines DIR")
    if args.guidance_scale or args.lora:
        raise UserError("--against compares the plain Turbo schedule; drop --guidance-scale and --lora")
    other = Bundle.open(args.against)
    for size in sizes:
        other.sizes.check(*size, f"--against bundle {other.root}")
    theirs_args = copy.copy(args)
    theirs_args.engines = args.against_engines
    sessions, device = _sessions(args, bundle)
    theirs, _ = _sessions(theirs_args, other)
    _report_parity(run_against(bundle, sessions, other, theirs, args.backend, args.prompt, args.seed, device, sizes))


def _report_parity(rows) -> None:
    from zimage_trt.parity import format_table

    print(format_table(rows))
    if not all(r.ok for r in rows):
        raise UserError("parity failed: a stage is outside its bound (see the table)")


# ------------------------------------------------------------------------------------------ bench
def cmd_bench(args) -> None:
    from zimage_trt.bench import format_table, run_bench, save
    from zimage_trt.sessions import resolve_device

    device = resolve_device(args.device)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.iters < 1 or args.warmup < 0:
        raise UserError("--iters must be at least 1 and --warmup at least 0")
    results = run_bench(
        args.model, args.bundle, backends, args.engines, device, args.prompt, args.seed, args.warmup, args.iters,
        diffusers=not args.no_diffusers, size=_size_list(args.size, "--size")[0] if args.size else None,
        guidance=_guidance(args), lora_args=args.lora or [], vram=args.vram, weight_budget=_weight_budget(args),
    )
    table = format_table(results)
    results["table"] = table
    print(table)
    if args.json:
        save(results, args.json)
        print(f"results: {args.json}")


# ------------------------------------------------------------------------------------------ lora
def cmd_lora(args) -> None:
    from zimage_trt.export.lora import convert_lora
    from zimage_trt.runtime.bundle import Bundle

    bundle = Bundle.open(args.bundle)
    meta = convert_lora(bundle, args.lora, args.out)
    print(f"{args.out}: {meta['weights']} transformer weights, rank {meta['rank']}, for bundle {args.bundle}; use it "
          f"with --lora {args.out}:STRENGTH")


# ------------------------------------------------------------------------------------------ serve
def _named_loras(items) -> dict:
    """serve --lora NAME=L.safetensors, repeatable -> {name: path}."""
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path:
            raise UserError(f"--lora {item!r}: serve takes NAME=L.safetensors (a request picks it with \"lora\": NAME)")
        if name in out:
            raise UserError(f"--lora: the name {name!r} is given twice")
        if not Path(path).is_file():
            raise UserError(f"--lora {item}: no such file {path}")
        out[name.strip()] = path
    return out


def cmd_serve(args) -> None:
    from zimage_trt.server import ServeOptions, serve

    if args.queue_size < 1 or args.timeout <= 0:
        raise UserError("--queue-size must be at least 1 and --timeout positive")
    opts = ServeOptions(
        bundle=args.bundle, backend=args.backend, engines=args.engines, model=args.model, device=args.device,
        torch_dtype=args.torch_dtype, queue_size=args.queue_size, timeout_s=args.timeout, max_n=args.max_n,
        loras=_named_loras(args.lora), vram=args.vram, weight_budget=_weight_budget(args),
    )
    if args.ray:
        from zimage_trt.ray_serve import parse_autoscale, run
        from zimage_trt.runtime.bundle import Bundle

        Bundle.open(args.bundle)
        run(opts, args.host, args.port, args.replicas, parse_autoscale(args.autoscale))
    else:
        print(f"serving {args.bundle} ({args.backend}) on http://{args.host}:{args.port}  (POST /v1/images/generations)")
        serve(opts, args.host, args.port)


# ------------------------------------------------------------------------------------------ demo
def cmd_demo(args) -> None:
    import shutil

    from zimage_trt.export.bundle import ExportOptions, export_bundle
    from zimage_trt.export.tiny import make_tiny
    from zimage_trt.parity import run_parity
    from zimage_trt.runtime.bundle import Bundle
    from zimage_trt.runtime.pipeline import ZImageRuntime, save_png
    from zimage_trt.sessions import open_sessions, resolve_device

    from zimage_trt.runtime.sizes import SizeRange, format_size

    work = Path(args.workdir)
    model, bundle_dir = work / "tiny-model", work / "tiny-bundle"
    side = args.size
    sizes = [(side, side), (side, side // 2)]  # the opt size and a wide one, from the same bundle
    start = time.perf_counter()
    print(f"[1/4] tiny model -> {model}")
    shutil.rmtree(model, ignore_errors=True)
    make_tiny(model, seed=args.seed)
    rng = SizeRange.square_range(f"{side // 2}:{side}", (side, side))
    print(f"[2/4] export (every size in {rng.describe()}, fp32) -> {bundle_dir}")
    opts = ExportOptions(size_range=rng, precision=dict.fromkeys(("text_encoder", "transformer", "vae_decoder"), "fp32"),
                         force=True)
    export_bundle(model, bundle_dir, opts)
    bundle = Bundle.open(bundle_dir)
    device = resolve_device("cpu")
    sessions = open_sessions("onnxruntime", bundle, device)
    rt = ZImageRuntime(bundle, sessions, device)
    for size in sizes:
        png = work / f"demo-{format_size(*size)}.png"
        print(f"[3/4] generate {format_size(*size)} with onnxruntime -> {png}")
        t0 = time.perf_counter()
        save_png(rt.generate(args.prompt, args.seed, size=size), png)
        print(f"      {rt.schedule.passes} transformer passes in {time.perf_counter() - t0:.2f} s")
    print("[4/4] parity against eager PyTorch and diffusers' ZImagePipeline at both sizes")
    rows = run_parity(model, bundle, sessions, "onnxruntime", args.prompt, args.seed, device, sizes)
    try:
        _report_parity(rows)
    finally:
        print(f"demo finished in {time.perf_counter() - start:.0f} s; images in {work}")


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zimage-trt",
        description="Z-Image-Turbo on TensorRT: export to ONNX, build engines per GPU, generate, check parity.",
        epilog="Typical flow: export --model DIR --out BUNDLE; build --bundle BUNDLE --out ENGINES; "
        "generate --bundle BUNDLE --engines ENGINES --backend tensorrt --prompt TEXT --out IMG.png",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("make-tiny", help="write a tiny random Z-Image-Turbo (real architecture) to a folder")
    p.add_argument("dir", help="output folder (must be empty or absent)")
    p.add_argument("--seed", type=int, default=0, help="weights and all else are a function of this (default 0)")
    p.add_argument("--size", default="tiny", choices=("tiny", "full"),
                   help="tiny (default, ~30 MB) or full: the real architecture with random weights, stored as the "
                   "real checkpoint is (fp32 transformer in 3 shards, bf16 text encoder in 3; ~33 GB; for speed and "
                   "memory measurements). Both use the real layout: shards, index, `model.` prefixes")
    p.add_argument("--device", default="cpu", help="where to initialise the weights: cpu (default) or cuda (fast for full)")
    p.add_argument("--tokenizer", metavar="DIR", help="a real tokenizer folder to use (e.g. ../shared/real-model/"
                   "tokenizer, Qwen3's) instead of the small one trained here; the full-size scripts pass it")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser(
        "export",
        help="export a diffusers-format model to an ONNX bundle",
        description="Export text encoder, transformer and VAE decoder to ONNX (batch 1, one branch; every image size "
        "in --size-range, or the one size of --width/--height), check each graph with onnxruntime (or its eager "
        "twin on a GPU), and write a self-contained bundle.",
    )
    p.add_argument("--model", required=True, help="diffusers-format folder, e.g. a download of Tongyi-MAI/Z-Image-Turbo")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--size-range", metavar="MIN:MAX",
                   help="one bundle for every WIDTHxHEIGHT with sides multiples of 16 in [MIN, MAX], e.g. 512:2048")
    p.add_argument("--opt-size", metavar="WxH", help="with --size-range: the size engines are tuned for and the "
                   "default size of generate and serve (default 1024x1024)")
    p.add_argument("--height", type=int, help="one-size bundle: image height in pixels, multiple of 16 (default 1024;"
                   " the fastest choice when you serve one size)")
    p.add_argument("--width", type=int, help="one-size bundle: image width in pixels, multiple of 16 (default 1024)")
    p.add_argument("--precision", choices=PRECISIONS, help="one precision for all networks (the VAE is never fp16)")
    p.add_argument("--dit-precision", choices=PRECISIONS + ("fp8", "nvfp4"),
                   help="transformer precision (default fp16). fp8: FP8 E4M3 post-training quantization of its "
                   "attention and feed-forward layers with NVIDIA ModelOpt, calibrated on the calibration prompts "
                   "(engines for sm89 and newer: Ada, Hopper, Blackwell). nvfp4: the same layers in NVFP4 (FP4 "
                   "values in blocks of 16 with FP8 scales; engines for Blackwell: sm100, sm120; TensorRT only, "
                   "onnxruntime has no FP4 kernels)")
    p.add_argument("--quant-skip", metavar="BLOCKS",
                   help="with --dit-precision fp8 or nvfp4: blocks kept unquantized, comma-separated: names (layers.0, "
                   "noise_refiner.1), globs (context_refiner.*), first:N or last:N of the main layers")
    p.add_argument("--text-encoder-precision", choices=PRECISIONS, help="text encoder precision (default fp16)")
    p.add_argument("--vae-precision", choices=("bf16", "fp32"), help="VAE decoder precision (default bf16)")
    p.add_argument("--device", default="cpu", help="where to load and trace the model: cpu or cuda (default cpu)")
    p.add_argument("--opset", type=int, default=23, choices=range(18, 24), metavar="{18..23}",
                   help="ONNX opset (default 23: ONNX Attention and RMSNormalization, which TensorRT parses from "
                   "10.15 and TensorRT-RTX 1.7 parses; 18: the same math in plain ops, for an older TensorRT, "
                   "whose builder fuses the attention pattern itself)")
    p.add_argument("--check", default="auto", choices=("auto", "always", "never"),
                   help="check each graph with onnxruntime; auto skips graphs too large for a CPU (default auto)")
    p.add_argument("--fp16-scales", help="JSON of FP16 rescale factors (or a bundle manifest) instead of calibrating")
    p.add_argument("--calibration-prompts", help="text file, one prompt a line, for FP16 calibration")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                   help="bake a LoRA into the transformer's weights (any format diffusers reads: PEFT, kohya, "
                   "ComfyUI, ...; scale default 1.0); repeatable, the manifest records each")
    p.add_argument("--max-gpu-memory", metavar="SIZE",
                   help="with --device cuda: the most GPU memory the export may take, e.g. 22GiB for a 24 GB card "
                   "(out of it: one line naming the stage)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "lora", help="convert a LoRA once to a bundle's weight names, for --lora at run time",
        description="Read a LoRA in any format diffusers reads (PEFT/diffusers, kohya, ComfyUI, dotted and fused-qkv "
        "trainer formats), check it against the bundle's transformer, and write its low-rank pairs under the "
        "bundle's weight names (never whole matrices). generate, bench, parity and serve then apply it with a "
        "strength, without a rebuild.",
    )
    p.add_argument("--bundle", required=True, help="bundle folder made by `zimage-trt export`")
    p.add_argument("--lora", required=True, help="the LoRA file (.safetensors)")
    p.add_argument("--out", required=True, help="converted LoRA to write (.safetensors)")
    p.set_defaults(func=cmd_lora)

    p = sub.add_parser(
        "build",
        help="build TensorRT / TensorRT-RTX engines from a bundle",
        description="Build one strongly typed engine per network for a target GPU, with a JSON sidecar each. "
        "Only engines that are missing or stale are rebuilt. TensorRT builds on and for the GPU it runs on; "
        "TensorRT-RTX builds ahead of time for the compute capabilities in --target, with or without a GPU.",
    )
    p.add_argument("--bundle", required=True, help="bundle folder made by `zimage-trt export`")
    p.add_argument("--out", required=True, help="engine folder (created; existing current engines are kept)")
    p.add_argument("--backend", default="tensorrt", choices=("tensorrt", "tensorrt-rtx"),
                   help="tensorrt for datacenter GPUs (H100, H200, A100), tensorrt-rtx for RTX GPUs (default tensorrt)")
    p.add_argument("--target", help="tensorrt-rtx only: auto (this GPU) or a list such as sm89,sm120 (default auto)")
    p.add_argument("--networks", help="comma-separated subset of text_encoder,transformer,vae_decoder")
    p.add_argument("--opt-tokens", type=int, default=128, help="caption length the profile is tuned for (default 128)")
    p.add_argument("--sizes", metavar="WxH,...",
                   help="a bundle with a size range: narrow the engines' profile to the box that covers these sizes "
                   "(e.g. 1024x1024,1536x1024,1024x1536); smaller profiles tune better. Default: the bundle's range")
    p.add_argument("--opt-level", type=int, choices=range(0, 6), help="builder optimization level 0-5")
    p.add_argument("--refittable", action="store_true",
                   help="make the transformer's weights refittable, so --lora applies LoRAs at run time without a "
                   "rebuild (TensorRT-RTX builds these on a GPU host only)")
    p.add_argument("--weight-streaming", action="store_true",
                   help="let the transformer engine stream weights from host memory, so it runs on a GPU with less "
                   "memory than its 12.4 GB of fp16 weights; choose the on-GPU share at run time with --weight-budget")
    p.add_argument("--force", action="store_true", help="rebuild even engines that are current")
    p.add_argument("--skip-memory-check", action="store_true", help="build even if host memory looks too small")
    p.add_argument("--verbose", action="store_true", help="show the builder's log")
    p.set_defaults(func=cmd_build)

    def guidance_args(p):
        p.add_argument("--guidance-scale", type=float, default=0.0, metavar="G",
                       help="classifier-free guidance: 0 (default; Z-Image-Turbo is distilled for it) or G > 0, "
                       "which runs two transformer passes per step (conditional and negative), as diffusers does")
        p.add_argument("--negative-prompt", help="with --guidance-scale: what to steer away from (default: empty)")
        p.add_argument("--cfg-normalization", type=float, default=0.0, metavar="C",
                       help="with --guidance-scale: cap the guided prediction's norm at C times the conditional "
                       "one's (diffusers' cfg_normalization; default 0: off)")
        p.add_argument("--cfg-truncation", type=float, default=1.0, metavar="T",
                       help="with --guidance-scale: no guidance on steps whose normalised time exceeds T "
                       "(diffusers' cfg_truncation; default 1.0: guidance on every step)")

    def lora_args(p):
        p.add_argument("--lora", action="append", metavar="L.safetensors[:STRENGTH]",
                       help="a LoRA converted by `zimage-trt lora`, with a strength from -4 to 4 (default 1.0); "
                       "repeat to stack LoRAs")

    def memory_args(p):
        p.add_argument("--vram", default="all", choices=("all", "sequential"),
                       help="all (default): every network stays on the GPU. sequential: the text encoder and the "
                       "transformer + VAE take turns on the GPU (peak: the larger of the two), for 16-24 GB cards; "
                       "slower, the weights move every image")
        p.add_argument("--weight-budget", type=float, metavar="GB",
                       help="tensorrt, engines built with --weight-streaming: GB of transformer weights kept on the "
                       "GPU; the rest streams from host memory each pass (default: all on the GPU)")

    def runtime_args(p, memory: bool = True):
        if memory:  # parity compares every stage with everything loaded: no memory modes there
            memory_args(p)
        p.add_argument("--bundle", required=True, help="bundle folder made by `zimage-trt export`")
        p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch", "tensorrt"),
                       help="onnxruntime (default), torch (eager reference, needs --model), tensorrt (needs --engines)")
        p.add_argument("--model", help="original model folder (for --backend torch)")
        p.add_argument("--engines", help="engine folder made by `zimage-trt build` (for --backend tensorrt)")
        p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda if present)")
        p.add_argument("--torch-dtype", default="fp32", choices=PRECISIONS, help="precision of --backend torch")

    p = sub.add_parser("generate", help="generate one image from a prompt",
                       description="Run the lean runtime: tokenizer, text encoder, 9 transformer passes, VAE.")
    runtime_args(p)
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--steps", type=int, default=None, help="number of steps (default: the bundle's, 9)")
    p.add_argument("--size", metavar="WxH", help="image WIDTHxHEIGHT within the bundle's range (default: its opt size)")
    p.add_argument("--generator-device", default="cpu", choices=("cpu", "cuda"),
                   help="where the initial noise is drawn; diffusers gives the same image for the same choice")
    guidance_args(p)
    lora_args(p)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("parity", help="compare every stage of a backend with eager PyTorch and diffusers",
                       description="Per-network errors against the float32 reference modules and the image's PSNR "
                       "against diffusers' ZImagePipeline (needs --model), or with --against against another bundle "
                       "of the same model, as a table. Exit 2 if a stage is out of bounds.")
    runtime_args(p, memory=False)
    p.set_defaults(model=None)
    p.add_argument("--prompt", default="A photograph of a red fox sitting in fresh snow at sunrise")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--size", metavar="WxH,...", help="image sizes to check, e.g. 1024x1024,1536x1024 (default: the "
                   "bundle's opt size)")
    p.add_argument("--against", metavar="BUNDLE",
                   help="compare with another bundle of the same model instead, stage by stage: e.g. an fp8 bundle "
                   "against your fp16 one, on your own weights (needs neither --model nor diffusers)")
    p.add_argument("--against-engines", metavar="DIR", help="with --against and --engines: the other bundle's engines")
    guidance_args(p)
    lora_args(p)
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser(
        "bench",
        help="latency and memory per stage: diffusers' eager pipeline beside the runtime, in one run",
        description="Times text encoder, one transformer pass, all passes, VAE decode, end to end and the runtime's "
        "own overhead (median and p90), with peak GPU memory, for diffusers' ZImagePipeline and for the runtime on "
        "each backend that runs here; prints the roofline floor (transformer FLOPs over the measured matmul rate).",
    )
    p.add_argument("--model", required=True, help="model folder (for diffusers and the torch backend)")
    p.add_argument("--bundle", required=True, help="bundle folder made by `zimage-trt export`")
    p.add_argument("--engines", help="engine folder made by `zimage-trt build` (adds the tensorrt backend)")
    p.add_argument("--backends", default="torch,onnxruntime,tensorrt",
                   help="runtime backends to try (default: all; those that cannot run here are listed with why)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--iters", type=int, default=5, help="timed generations per system (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed generations first (default 2)")
    p.add_argument("--prompt", default="A photograph of a red fox sitting in fresh snow at sunrise, soft golden light")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers' pipeline")
    p.add_argument("--size", metavar="WxH", help="image size to measure (default: the bundle's opt size)")
    guidance_args(p)
    lora_args(p)
    memory_args(p)
    p.add_argument("--json", help="also write the results as JSON here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "serve",
        help="serve images over HTTP (OpenAI images API), on one GPU or scaled out with Ray Serve",
        description="POST /v1/images/generations (prompt, n, size, response_format=b64_json, seed, "
        "num_inference_steps), GET /health, GET /metrics. One worker owns the GPU behind a bounded queue: a full "
        "queue answers 429 with Retry-After, a request past its deadline 503.",
    )
    runtime_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--queue-size", type=int, default=8, help="requests that may wait for the GPU (default 8)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take, queue included (default 120)")
    p.add_argument("--max-n", type=int, default=4, help="largest n (images per request) accepted (default 4)")
    p.add_argument("--lora", action="append", metavar="NAME=L.safetensors",
                   help="a LoRA converted by `zimage-trt lora`, loaded at start; a request uses it with "
                   "\"lora\": NAME and \"lora_scale\": s (-4..4, default 1). Repeatable")
    p.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (one replica per GPU)")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: number of replicas (default 1)")
    p.add_argument("--autoscale", help="with --ray: MIN:MAX replicas, scaled on ongoing requests")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="tiny model -> export -> generate -> parity, on a CPU in about a minute")
    p.add_argument("--workdir", default="zimage-demo", help="folder for the model, bundle and image (default ./zimage-demo)")
    p.add_argument("--size", type=int, default=256,
                   help="largest image side in pixels, a multiple of 32; the bundle covers half of it to all of it "
                   "(default 256)")
    p.add_argument("--prompt", default="A photograph of a red fox sitting in fresh snow at sunrise")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    if args.command == "parity" and args.model is None and not (args.against or args.against_engines):
        print("error: parity needs --model DIR (the original model, for the reference), or --against BUNDLE",
              file=sys.stderr)
        return 2
    try:
        args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The commands name the file and the fix where they write; this is the net for any other file error
        # (a full disk, a read-only or unreadable folder): one line, never a traceback.
        from zimage_trt.common.files import os_error_line

        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
