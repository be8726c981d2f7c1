"""What several subcommands share: their argument groups, written once, and the readers that turn those
arguments into the runtime's objects (sizes, byte counts, sessions, LoRA stacks, guidance)."""

from __future__ import annotations

from zimage_trt.common.errors import UserError

PRECISIONS = ("fp32", "fp16", "bf16")


# ------------------------------------------------------------------------------------------ argument groups
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
    p.add_argument("--compile", action="store_true",
                   help="--backend torch: torch.compile each network (once per image size and caption length, "
                   "timed and printed; kept in ~/.cache/zimage-trt/torch-compile or $ZIMAGE_TRT_COMPILE_CACHE for "
                   "the next process)")


# ------------------------------------------------------------------------------------------ readers
def parse_bytes(text: str, what: str) -> int:
    """'22GiB', '22GB', '22G' or '22' (GiB) -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|G|MiB|MB|M)?\s*", text or "")
    if not m or float(m[1]) <= 0:
        raise UserError(f"{what} {text!r} is not a size; write it like 22GiB or 20GB")
    unit = {"GiB": 2**30, "G": 2**30, None: 2**30, "GB": 10**9, "MiB": 2**20, "M": 2**20, "MB": 10**6}[m[2]]
    return int(float(m[1]) * unit)


def size_list(text: str, what: str) -> list[tuple[int, int]]:
    from zimage_trt.runtime.sizes import parse_size

    sizes = [parse_size(t, what) for t in text.split(",") if t.strip()]
    if not sizes:
        raise UserError(f"{what} needs at least one WIDTHxHEIGHT")
    return sizes


def one_size(text, bundle):
    """--size WxH (or auto / absent: the bundle's opt size)."""
    from zimage_trt.runtime.sizes import parse_size

    return bundle.sizes.opt if text in (None, "auto") else parse_size(text, "--size")


def open_runtime_sessions(args, bundle):
    from zimage_trt.sessions import open_sessions, resolve_device

    device = resolve_device(args.device)
    sessions = open_sessions(
        args.backend,
        bundle,
        device,
        model_dir=args.model,
        engines=args.engines,
        torch_dtype=args.torch_dtype,
        weight_budget=weight_budget(args),
        vram=getattr(args, "vram", "all"),
        compile=getattr(args, "compile", False),
    )
    return sessions, device


def weight_budget(args) -> int | None:
    """--weight-budget GB -> bytes (None: every weight on the GPU)."""
    gb = getattr(args, "weight_budget", None)
    if gb is None:
        return None
    if not gb > 0:
        raise UserError(f"--weight-budget must be a positive number of GB, not {gb}")
    if getattr(args, "backend", "tensorrt") != "tensorrt":
        raise UserError("--weight-budget is for --backend tensorrt (engines built with --weight-streaming)")
    return int(gb * 1e9)


def lora_stack(args, bundle) -> list:
    """--lora L.safetensors[:STRENGTH], repeatable -> [(Lora, strength)] (files made by `zimage-trt lora`)."""
    from zimage_trt.runtime.lora import load_lora, parse_lora_arg

    stack = []
    for text in args.lora or []:
        path, strength = parse_lora_arg(text)
        stack.append((load_lora(path, bundle), strength))
    return stack


def describe_loras(stack) -> str:
    from zimage_trt.runtime.lora import describe

    return describe(stack)


def guidance_of(args):
    """--guidance-scale G [--negative-prompt TEXT --cfg-normalization C --cfg-truncation T]; None for G = 0."""
    from zimage_trt.runtime.pipeline import Guidance

    if args.guidance_scale < 0:
        raise UserError(f"--guidance-scale must be 0 (off, the default) or positive, not {args.guidance_scale}")
    if args.guidance_scale == 0:
        if args.negative_prompt:
            raise UserError("--negative-prompt needs --guidance-scale above 0 (with guidance 0 it has no effect)")
        return None
    return Guidance(args.guidance_scale, args.negative_prompt or "", args.cfg_normalization, args.cfg_truncation)


def report_parity(rows) -> None:
    from zimage_trt.parity import format_table

    print(format_table(rows))
    if not all(r.ok for r in rows):
        raise UserError("parity failed: a stage is outside its bound (see the table)")
