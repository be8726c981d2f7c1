"""FP8 post-training quantization of the transformer with NVIDIA ModelOpt, written to ONNX as standard Q/DQ.

The recipe (Z-Image recipes keep the sensitive parts in high precision; whole-model FP8 gives noise):

    quantized   in every block: attention to_q, to_k, to_v, to_out.0 and feed-forward w1, w2, w3 (FP8 E4M3,
                per-tensor scales for inputs and weights, as ModelOpt's FP8 default; the input scales are the
                max over the calibration prompts through the whole 9-step schedule)
    kept        patch embedder, final layer, adaLN modulation, timestep and caption embedders, norms, RoPE, and
                attention itself (fused, in the graph's fp16)
    --quant-skip  whole blocks kept unquantized: names (layers.0, noise_refiner.1), globs (context_refiner.*),
                or first:N / last:N of the 30 main layers

Export: under ModelOpt's torch-export mode each enabled quantizer traces to its `tensorrt::quantize_op`. The
dynamo ONNX exporter has no translation for that op, so `translation_table` gives it the pair ModelOpt's own
(TorchScript) ONNX exporter writes for FP8: QuantizeLinear -> DequantizeLinear to float8e4m3fn, with the scale
amax / 448 in the input's own precision (no Cast between the graph and the Q/DQ, so TensorRT can fuse the
DequantizeLinear into the matmul). Strongly typed TensorRT and TensorRT-RTX take the graph as it is.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import asdict, dataclass, field

import torch

from zimage_trt.errors import UserError

FORMATS = ("fp8",)
FP8_E4M3_MAX = 448.0
# Linear layers quantized in each block (module paths inside a block)
QUANTIZED_LAYERS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
INSTALL = "pip install 'nvidia-modelopt==0.47.0' (or the project's [quantize] extra)"


@dataclass
class QuantRecipe:
    format: str = "fp8"
    skip: list[str] = field(default_factory=list)  # blocks kept unquantized
    prompts_sha256: str = ""  # of the calibration prompts, one per line
    steps: int = 9

    def record(self) -> dict:
        """What the manifest and the engines' sidecars say of the quantization."""
        return {**asdict(self), "layers": list(QUANTIZED_LAYERS), "activations": "per-tensor",
                "weights": "per-tensor", "calibration": "max", "tool": f"nvidia-modelopt {modelopt_version()}"}


def modelopt_version() -> str:
    try:
        import modelopt

        return modelopt.__version__
    except ImportError:
        raise UserError(f"FP8 export needs NVIDIA ModelOpt: {INSTALL}") from None


def prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def parse_skip(text: str | None, block_names: list[str]) -> list[str]:
    """--quant-skip 'first:2,last:2,noise_refiner.*' -> the block names it keeps unquantized, in model order."""
    if not text:
        return []
    main = [b for b in block_names if b.startswith("layers.")]
    chosen: set[str] = set()
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        end, _, n = item.partition(":")
        if end in ("first", "last") and _:
            if not n.isdigit() or not 0 < int(n) <= len(main):
                raise UserError(f"--quant-skip {item}: N must be 1..{len(main)} (the main layers)")
            chosen.update(main[: int(n)] if end == "first" else main[-int(n):])
            continue
        hits = fnmatch.filter(block_names, item)
        if not hits:
            raise UserError(f"--quant-skip {item}: no such block (blocks: noise_refiner.0-"
                            f"{sum(b.startswith('noise_refiner') for b in block_names) - 1}, context_refiner.N, "
                            f"layers.0-{len(main) - 1}; or first:N, last:N)")
        chosen.update(hits)
    return [b for b in block_names if b in chosen]


def modelopt_config(recipe: QuantRecipe) -> dict:
    """ModelOpt's quantization config: everything off, then the recipe's layers on, then the skipped blocks off
    (later patterns win)."""
    if recipe.format not in FORMATS:
        raise UserError(f"quantization format {recipe.format!r} is not one of {', '.join(FORMATS)}")
    fp8 = {"num_bits": (4, 3), "axis": None}
    cfg: dict = {"*": {"enable": False}}
    for layer in QUANTIZED_LAYERS:
        cfg[f"*.{layer}.input_quantizer"] = fp8
        cfg[f"*.{layer}.weight_quantizer"] = fp8
    for block in recipe.skip:
        cfg[f"*{block}.*"] = {"enable": False}
    return {"quant_cfg": cfg, "algorithm": "max"}


def quantize(transformer: torch.nn.Module, recipe: QuantRecipe, forward_loop) -> int:
    """Insert ModelOpt's quantizers into the diffusers transformer in place and calibrate them by running
    `forward_loop(transformer)`; returns how many layers are quantized."""
    import contextlib
    import io
    import warnings

    modelopt_version()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # its notes, not the user's
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq

        mtq.quantize(transformer, modelopt_config(recipe), forward_loop)
    return sum(1 for _, m in quantizers(transformer) if m.is_enabled) // 2  # an input and a weight quantizer each


def quantizers(module: torch.nn.Module):
    """(name, quantizer) of every ModelOpt TensorQuantizer in `module`."""
    return [(n, m) for n, m in module.named_modules() if type(m).__name__ == "TensorQuantizer"]


def is_quantized(module: torch.nn.Module) -> bool:
    return any(m.is_enabled for _, m in quantizers(module))


def _fp8_qdq(x, amax, num_bits: int = 8, exponent_bits: int = 4, unsigned: bool = False, narrow_range: bool = False):
    """ONNX for `tensorrt::quantize_op` in FP8 E4M3: Q/DQ with the scale amax / 448 in x's precision (folded
    into a constant by the exporter's optimizer)."""
    import numpy as np
    from onnxscript import ir
    from onnxscript import opset23 as op

    scale = op.CastLike(op.Div(op.Cast(amax, to=ir.DataType.FLOAT), op.Constant(value_float=FP8_E4M3_MAX)), x)
    zero = op.Constant(value=ir.Tensor(np.zeros((), dtype=np.uint8), dtype=ir.DataType.FLOAT8E4M3FN))
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero), scale, zero)


def export_options(module: torch.nn.Module) -> tuple:
    """(context, custom_translation_table) for torch.onnx.export of `module`: ModelOpt's export mode and the Q/DQ
    translation when it holds enabled quantizers; nothing otherwise."""
    import contextlib

    if not is_quantized(module):
        return contextlib.nullcontext(), None
    from modelopt.torch.quantization.utils import export_torch_mode

    return export_torch_mode(), {torch.ops.tensorrt.quantize_op.default: _fp8_qdq}
