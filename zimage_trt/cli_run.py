"""The image family: `generate`, `parity`, `bench` and the `demo` that strings the whole flow together."""

from __future__ import annotations

import time
from pathlib import Path

from zimage_trt.common.errors import UserError

from .cli_args import (describe_loras, guidance_args, guidance_of, lora_args, lora_stack, memory_args, one_size,
                       open_runtime_sessions, report_parity, runtime_args, size_list, weight_budget)


def cmd_generate(args) -> None:
    from zimage_trt.runtime.bundle import Bundle
    from zimage_trt.runtime.images import save_png
    from zimage_trt.runtime.pipeline import ZImageRuntime

    bundle = Bundle.open(args.bundle)
    size = one_size(args.size, bundle)
    bundle.sizes.check(*size, f"bundle {bundle.root}")  # before any session is opened
    sessions, device = open_runtime_sessions(args, bundle)
    guidance = guidance_of(args)
    loras = lora_stack(args, bundle)
    rt = ZImageRuntime(bundle, sessions, device, steps=args.steps, generator_device=args.generator_device,
                       vram=args.vram)
    from zimage_trt.runtime.memory import describe, measured_line, vram_plan

    print(describe(vram_plan(rt), args.vram))
    if loras:
        seconds = rt.set_loras(loras)
        print(f"LoRA {describe_loras(loras)} applied in {seconds * 1e3:.0f} ms")
    start = time.perf_counter()
    pixels = rt.generate(args.prompt, args.seed, size=size, guidance=guidance)
    elapsed = time.perf_counter() - start
    save_png(pixels, args.out)
    passes = rt.schedule.passes + (sum(guidance.guided_steps(rt.schedule)) if guidance else 0)
    print(f"{args.out}: {size[0]}x{size[1]}, {passes} transformer passes, {args.backend}, {elapsed:.2f} s")
    if measured_line(device):
        print(measured_line(device))


def cmd_parity(args) -> None:
    from zimage_trt.parity import run_parity
    from zimage_trt.runtime.bundle import Bundle

    bundle = Bundle.open(args.bundle)
    sizes = size_list(args.size, "--size") if args.size else [bundle.sizes.opt]
    for size in sizes:
        bundle.sizes.check(*size, f"bundle {bundle.root}")
    backend = "tensorrt" if args.engines else args.backend
    args.backend = backend
    if args.fp16_peaks and (backend != "onnxruntime" or args.against):
        raise UserError("--fp16-peaks runs this bundle's transformer.onnx with onnxruntime against 65504: use "
                        "--backend onnxruntime, without --against")
    if args.against or args.against_engines:
        return _parity_against(args, bundle, sizes)
    sessions, device = open_runtime_sessions(args, bundle)
    rows = run_parity(args.model, bundle, sessions, backend, args.prompt, args.seed, device, sizes,
                      guidance=guidance_of(args), loras=lora_stack(args, bundle))
    peaks, hot = "", []
    if args.fp16_peaks:
        from zimage_trt.parity import fp16_peaks

        peaks, hot = fp16_peaks(bundle, sessions, args.prompt, args.seed, device, sizes, guidance_of(args))
    try:
        report_parity(rows)
    finally:
        if peaks:
            print(f"\n{peaks}")
    if hot:
        raise UserError(f"FP16 overflow in {', '.join(hot)} (see the table): re-export with the FP16 rescale "
                        "calibrated on prompts like yours (export --calibration-prompts FILE), or the transformer in "
                        "bf16 (--dit-precision bf16)")


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
    sessions, device = open_runtime_sessions(args, bundle)
    theirs, _ = open_runtime_sessions(theirs_args, other)
    report_parity(run_against(bundle, sessions, other, theirs, args.backend, args.prompt, args.seed, device, sizes))


def cmd_bench(args) -> None:
    from zimage_trt.bench import format_table, run_bench, save
    from zimage_trt.sessions import resolve_device

    device = resolve_device(args.device)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.iters < 1 or args.warmup < 0:
        raise UserError("--iters must be at least 1 and --warmup at least 0")
    results = run_bench(
        args.model, args.bundle, backends, args.engines, device, args.prompt, args.seed, args.warmup, args.iters,
        diffusers=not args.no_diffusers, size=size_list(args.size, "--size")[0] if args.size else None,
        guidance=guidance_of(args), lora_args=args.lora or [], vram=args.vram, weight_budget=weight_budget(args),
        compile=args.compile, fp8_bundle=args.fp8_bundle,
    )
    table = format_table(results)
    results["table"] = table
    print(table)
    if args.json:
        save(results, args.json)
        print(f"results: {args.json}")


def cmd_demo(args) -> None:
    import shutil

    from zimage_trt.export.bundle import ExportOptions, export_bundle
    from zimage_trt.export.tiny import make_tiny
    from zimage_trt.parity import run_parity
    from zimage_trt.runtime.bundle import Bundle
    from zimage_trt.runtime.images import save_png
    from zimage_trt.runtime.pipeline import ZImageRuntime
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
        report_parity(rows)
    finally:
        print(f"demo finished in {time.perf_counter() - start:.0f} s; images in {work}")


def add_parsers(sub) -> None:
    """generate, parity and bench."""
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
    p.add_argument("--fp16-peaks", action="store_true",
                   help="also run the transformer graph with every FP16 intermediate's largest |value| as an output "
                   "(onnxruntime, whole loop at each size) and print the peak per block against 65504; on a GPU "
                   "these are the real FP16 kernels (onnxruntime's CPU provider computes FP16 chains in FP32)")
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
    p.add_argument("--compile", action="store_true",
                   help="also measure diffusers with torch.compile of its transformer and the runtime's torch backend "
                   "compiled (compile time reported apart)")
    p.add_argument("--fp8-bundle", metavar="DIR",
                   help="an fp8 bundle of the same model: also measure the torch backend with its FP8 transformer "
                   "(compiled with --compile; needs FP8 tensor cores, emulated on a CPU)")
    guidance_args(p)
    lora_args(p)
    memory_args(p)
    p.add_argument("--json", help="also write the results as JSON here")
    p.set_defaults(func=cmd_bench)



def add_demo_parser(sub) -> None:
    """demo (listed last in --help)."""
    p = sub.add_parser("demo", help="tiny model -> export -> generate -> parity, on a CPU in about a minute")
    p.add_argument("--workdir", default="zimage-demo", help="folder for the model, bundle and image (default ./zimage-demo)")
    p.add_argument("--size", type=int, default=256,
                   help="largest image side in pixels, a multiple of 32; the bundle covers half of it to all of it "
                   "(default 256)")
    p.add_argument("--prompt", default="A photograph of a red fox sitting in fresh snow at sunrise")
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=cmd_demo)
