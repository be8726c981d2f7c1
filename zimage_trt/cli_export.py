"""The model -> bundle -> engines family: `make-tiny`, `export`, `lora` and `build`."""

from __future__ import annotations

import time
from pathlib import Path

from zimage_trt.common.errors import UserError

from .cli_args import PRECISIONS, parse_bytes, size_list


def cmd_make_tiny(args) -> None:
    from zimage_trt.export.tiny import make_tiny

    try:
        out = make_tiny(args.dir, seed=args.seed, size=args.size, device=args.device, tokenizer=args.tokenizer)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    print(f"wrote a {args.size} random Z-Image-Turbo (seed {args.seed}) to {out}")


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
    opt = parse_size(args.opt_size, "--opt-size") if args.opt_size else None
    return SizeRange.square_range(args.size_range, opt)


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


def cmd_lora(args) -> None:
    from zimage_trt.export.lora import convert_lora
    from zimage_trt.runtime.bundle import Bundle

    bundle = Bundle.open(args.bundle)
    meta = convert_lora(bundle, args.lora, args.out)
    print(f"{args.out}: {meta['weights']} transformer weights, rank {meta['rank']}, for bundle {args.bundle}; use it "
          f"with --lora {args.out}:STRENGTH")


def cmd_build(args) -> None:
    from zimage_trt.engine.build import BuildOptions, build_engines

    targets = [t for t in args.target.split(",") if t.strip()] if args.target else ["auto"]
    opts = BuildOptions(
        backend=args.backend,
        targets=targets,
        sizes=size_list(args.sizes, "--sizes") if args.sizes else None,
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


def add_parsers(sub) -> None:
    """make-tiny, export, lora and build."""
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
                   "default size of generate and serve (default 1024x1024 if the range holds it, else the square size "
                   "nearest to it inside the range)")
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

