"""What an export is asked for: the bundle's format constants, the options of `zimage-trt export`, their
validation, and the sizes each graph is traced and checked at."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zimage_trt.common.errors import UserError
from zimage_trt.runtime.sizes import LATENT_FACTOR, SIDE_MULTIPLE, SizeRange, check_side

from .onnx_export import DEFAULT_OPSET


BUNDLE_FORMAT = "zimage-trt-bundle"
BUNDLE_VERSION = 2  # 2: image_sizes (a size range); runtime/bundle.py still reads 1 as one size
NETWORKS = ("text_encoder", "transformer", "vae_decoder")
# fp8, nvfp4: the transformer in fp16 with FP8 or NVFP4 Q/DQ on its quantized layers (quantize.py)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float16,
          "nvfp4": torch.float16}
QUANTIZED = ("fp8", "nvfp4")  # quantize.FORMATS
DEFAULT_PRECISION = {"text_encoder": "fp16", "transformer": "fp16", "vae_decoder": "bf16"}
# onnxruntime on a CPU takes minutes per TFLOP; graphs with more parameters than this are checked on a GPU
# (`zimage-trt parity`) rather than at export.
CPU_CHECK_MAX_PARAMS = 1_500_000_000


@dataclass
class ExportOptions:
    height: int = 1024  # the one size of a static bundle
    width: int = 1024
    size_range: SizeRange | None = None  # a dynamic bundle instead: every size in this range
    precision: dict = field(default_factory=lambda: dict(DEFAULT_PRECISION))
    opset: int = DEFAULT_OPSET
    device: str = "cpu"
    check: str = "auto"  # auto | always | never
    fp16_scales: dict | None = None  # block -> {"attn": s, "ffn": s}; None: calibrate when the DiT is fp16
    calibration_prompts: list[str] | None = None
    calibration_steps: int = 9
    quant_skip: str | None = None  # --quant-skip: blocks a quantized transformer keeps in fp16 (quantize.parse_skip)
    loras: list = field(default_factory=list)  # [(original LoRA file, scale)] baked into the transformer
    max_gpu_memory: int | None = None  # bytes this process may take on the GPU (--max-gpu-memory)
    force: bool = False

    @property
    def sizes(self) -> SizeRange:
        return self.size_range or SizeRange.single(self.width, self.height)


def validate_options(opts: ExportOptions) -> None:
    if opts.size_range is None:
        for side, value in (("height", opts.height), ("width", opts.width)):
            check_side(value, f"--{side}")
    for name, prec in opts.precision.items():
        if name not in NETWORKS:
            raise UserError(f"unknown network '{name}' in the precision options (networks: {', '.join(NETWORKS)})")
        if prec not in DTYPES:
            raise UserError(f"precision '{prec}' for {name} is not one of {', '.join(DTYPES)}")
        if prec in QUANTIZED and name != "transformer":
            raise UserError(f"{prec} is for the transformer (--dit-precision {prec}), not the {name}")
    if opts.quant_skip and opts.precision.get("transformer") not in QUANTIZED:
        raise UserError("--quant-skip keeps blocks of a quantized transformer unquantized; add --dit-precision fp8 "
                        "or nvfp4")
    if opts.precision.get("vae_decoder") == "fp16":
        raise UserError("the Flux VAE overflows in fp16; use --vae-precision bf16 (default) or fp32")
    if opts.check not in ("auto", "always", "never"):
        raise UserError(f"--check must be auto, always or never, not {opts.check!r}")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {opts.device} was asked for but PyTorch sees no CUDA GPU")
    if opts.max_gpu_memory is not None and not opts.device.startswith("cuda"):
        raise UserError("--max-gpu-memory caps an export on the GPU; add --device cuda (a CPU export uses no GPU)")


def check_sizes(sizes: SizeRange) -> list[tuple[int, int]]:
    """(width, height) the export checks each graph at: the one size, or the range's smallest, opt and largest
    corners (a graph wrong for some sizes is most likely wrong at an end of its range)."""
    corners = [(sizes.min_width, sizes.min_height), sizes.opt, sizes.largest]
    return list(dict.fromkeys(corners))


def example_latent_hw(sizes: SizeRange) -> tuple[int, int]:
    """Latent (h, w) to trace with. For a range they must differ from each other and from every other traced
    size (16 channels, 64 caption rows, 1): the exporter would take equal example sizes for one symbol."""
    if sizes.is_single:
        return sizes.opt_height // LATENT_FACTOR, sizes.opt_width // LATENT_FACTOR
    step = SIDE_MULTIPLE // LATENT_FACTOR  # latent sides move in steps of 2 (one token)
    taken = {1, 16, 64}
    picks = []
    for lo, opt, hi in ((sizes.min_height, sizes.opt_height, sizes.max_height),
                        (sizes.min_width, sizes.opt_width, sizes.max_width)):
        lo, opt, hi = lo // LATENT_FACTOR, opt // LATENT_FACTOR, hi // LATENT_FACTOR
        candidates = [opt] + [v for d in range(step, hi - lo + step, step) for v in (opt + d, opt - d)]
        pick = next((v for v in candidates if lo <= v <= hi and v not in taken), None)
        if pick is None:
            raise UserError(f"the size range {sizes.describe()} is too narrow to export with dynamic sizes; "
                            "export one size with --width/--height")
        taken.add(pick)
        picks.append(pick)
    return picks[0], picks[1]
