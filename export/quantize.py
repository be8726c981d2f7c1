"""FP8 and NVFP4 post-training quantization of the transformer with NVIDIA ModelOpt, written to ONNX as Q/DQ.

The recipe (Z-Image recipes keep the sensitive parts in high precision; whole-model FP8 gives noise):

    quantized   in every block: attention to_q, to_k, to_v, to_out.0 and feed-forward w1, w2, w3
                fp8: FP8 E4M3, per-tensor scales for inputs and weights (ModelOpt's FP8 default)
                nvfp4: FP4 E2M1 in blocks of 16 along the input features, each block's scale in FP8 E4M3 under
                one per-tensor scale (ModelOpt's NVFP4 default); inputs quantized at run time, block by block
                the per-tensor input scales are the max over the calibration prompts through the whole schedule
    kept        patch embedder, final layer, adaLN modulation, timestep and caption embedders, norms, RoPE, and
                attention itself (fused, in the graph's fp16)
    --quant-skip  whole blocks kept unquantized: names (layers.0, noise_refiner.1), globs (context_refiner.*),
                or first:N / last:N of the 30 main layers

Export: under ModelOpt's torch-export mode each enabled quantizer traces to its `tensorrt::quantize_op` (FP8) or
`tensorrt::dynamic_block_quantize_op` (NVFP4). The dynamo ONNX exporter has no translation for either, so
`export_options` gives them what ModelOpt's own (TorchScript) ONNX exporter writes:
  FP8    QuantizeLinear -> DequantizeLinear to float8e4m3fn, the scale amax / 448 in the input's own precision (no
         Cast between the graph and the Q/DQ, so TensorRT can fuse the DequantizeLinear into the matmul).
  NVFP4  TensorRT's `trt::TRT_FP4DynamicQuantize` (FP4 values and FP8 block scales, computed at run time) ->
         DequantizeLinear of the block scales by the per-tensor scale amax / (6 * 448) -> DequantizeLinear of the
         values, blocked. That is the form for activations; `finish_nvfp4` then hands each weight's (its input is
         a constant) to ModelOpt's NVFP4 ONNX exporter, which stores the weight itself as FP4 with FP8 block scales
         (two DequantizeLinear, no run-time quantization) and casts the matmul's inputs to fp16.
Strongly typed TensorRT and TensorRT-RTX take the graphs as they are (TensorRT-RTX parses TRT_FP4DynamicQuantize as
its dynamic-quantize layer). onnxruntime has no FP4 kernels: `nvfp4_reference_session` runs an NVFP4 graph with
onnx's reference evaluator, TRT_FP4DynamicQuantize computed by ModelOpt's own NVFP4 quantizer.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
from dataclasses import asdict, dataclass, field

import torch

from zimage_trt.common.errors import UserError

FORMATS = ("fp8", "nvfp4")
FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
NVFP4_BLOCK = 16  # values per FP8 block scale, along the input features
# the bit layout ModelOpt's NVFP4 quantizer passes its op: 4-bit values with 2 exponent bits (E2M1), 8-bit
# block scales with 4 (E4M3)
NVFP4_OP_BITS = (4, 2, 8, 4)
# ModelOpt's quantizer attributes for each format (its FP8_DEFAULT_CFG and NVFP4_DEFAULT_CFG)
QUANTIZER = {
    "fp8": {"num_bits": (4, 3), "axis": None},
    "nvfp4": {"num_bits": (2, 1), "block_sizes": {-1: NVFP4_BLOCK, "type": "dynamic", "scale_bits": (4, 3)},
              "axis": None},
}
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
    # nvfp4: layers kept in fp16 because their input features are not a multiple of the 16-value block (none in
    # Z-Image-Turbo: 3840 and 10240; the tiny test model's w2, 682)
    unblocked: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """What the manifest and the engines' sidecars say of the quantization."""
        if self.format == "nvfp4":
            scales = {"activations": f"blocks of {NVFP4_BLOCK} at run time (FP8 scales) under a calibrated per-tensor "
                                     "scale",
                      "weights": f"blocks of {NVFP4_BLOCK} (FP8 scales) under a per-tensor scale"}
        else:
            scales = {"activations": "per-tensor", "weights": "per-tensor"}
        return {**asdict(self), "layers": list(QUANTIZED_LAYERS), **scales, "calibration": "max",
                "tool": f"nvidia-modelopt {modelopt_version()}"}


def modelopt_version() -> str:
    try:
        import modelopt

        return modelopt.__version__
    except ImportError:
        raise UserError(f"FP8 and NVFP4 export need NVIDIA ModelOpt: {INSTALL}") from None


def nvfp4_exporter():
    """ModelOpt's NVFP4 ONNX exporter, or one line saying what to install (its ONNX package imports more than the
    base ModelOpt package brings)."""
    modelopt_version()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from modelopt.onnx.export.nvfp4_exporter import NVFP4QuantExporter
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc).splitlines()[0]
        raise UserError(f"NVFP4 export needs ModelOpt's ONNX exporter, which needs {missing}: pip install onnxslim "
                        "lief onnx-graphsurgeon (or the project's [quantize] extra)") from None
    return NVFP4QuantExporter


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
    quantizer = QUANTIZER[recipe.format]
    cfg: dict = {"*": {"enable": False}}
    for layer in QUANTIZED_LAYERS:
        cfg[f"*.{layer}.input_quantizer"] = quantizer
        cfg[f"*.{layer}.weight_quantizer"] = quantizer
    for block in recipe.skip:
        cfg[f"*{block}.*"] = {"enable": False}
    for layer in recipe.unblocked:
        cfg[f"{layer}.*"] = {"enable": False}
    return {"quant_cfg": cfg, "algorithm": "max"}


def quantize(transformer: torch.nn.Module, recipe: QuantRecipe, forward_loop) -> int:
    """Insert ModelOpt's quantizers into the diffusers transformer in place and calibrate them by running
    `forward_loop(transformer)`; returns how many layers are quantized."""
    import warnings

    modelopt_version()
    if recipe.format == "nvfp4":
        recipe.unblocked = [name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
                            and name.endswith(QUANTIZED_LAYERS) and m.in_features % NVFP4_BLOCK]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # its notes, not the user's
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq

        _nvfp4_on_cpu()
        mtq.quantize(transformer, modelopt_config(recipe), forward_loop)
    return sum(1 for _, m in quantizers(transformer) if m.is_enabled) // 2  # an input and a weight quantizer each


def quantizers(module: torch.nn.Module):
    """(name, quantizer) of every ModelOpt TensorQuantizer in `module`."""
    return [(n, m) for n, m in module.named_modules() if type(m).__name__ == "TensorQuantizer"]


def _fp8_qdq(x, amax, num_bits: int = 8, exponent_bits: int = 4, unsigned: bool = False, narrow_range: bool = False):
    """ONNX for `tensorrt::quantize_op` in FP8 E4M3: Q/DQ with the scale amax / 448 in x's precision (folded
    into a constant by the exporter's optimizer)."""
    import numpy as np
    from onnxscript import ir
    from onnxscript import opset23 as op

    scale = op.CastLike(op.Div(op.Cast(amax, to=ir.DataType.FLOAT), op.Constant(value_float=FP8_E4M3_MAX)), x)
    zero = op.Constant(value=ir.Tensor(np.zeros((), dtype=np.uint8), dtype=ir.DataType.FLOAT8E4M3FN))
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero), scale, zero)


def _fp4_dynamic_qdq(x, block_size: int, amax, num_bits: int, exponent_bits: int, scale_num_bits: int,
                     scale_exponent_bits: int):
    """ONNX for `tensorrt::dynamic_block_quantize_op` in NVFP4, as ModelOpt writes it for an activation: TensorRT's
    dynamic FP4 quantization, its FP8 block scales dequantized by the per-tensor scale, the values by those."""
    from onnxscript import ir
    from onnxscript import opset23 as op

    if (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) != NVFP4_OP_BITS:
        raise UserError(f"only NVFP4 block quantization is exported (got {num_bits}-bit values, {scale_num_bits}-bit "
                        "scales)")
    trt = _trt_opset()
    scale = op.Div(op.Cast(amax, to=ir.DataType.FLOAT), op.Constant(value_float=FP4_E2M1_MAX * FP8_E4M3_MAX))
    values, block_scales = trt.TRT_FP4DynamicQuantize(x, scale, axis=-1, block_size=block_size,
                                                      scale_type=ir.DataType.FLOAT8E4M3FN, _num_outputs=2)
    return op.DequantizeLinear(values, op.DequantizeLinear(block_scales, scale), axis=-1, block_size=block_size)


def _trt_opset():
    """TensorRT's ONNX ops used here, with schemas registered so onnxscript (and onnx's checker) know them."""
    import onnx
    import onnxscript
    from onnx.defs import OpSchema

    if not onnx.defs.has("TRT_FP4DynamicQuantize", "trt"):
        floats = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")]
        param, attr, integer = OpSchema.FormalParameter, OpSchema.Attribute, OpSchema.AttrType.INT
        onnx.defs.register_schema(OpSchema(
            "TRT_FP4DynamicQuantize", "trt", 1, inputs=[param("x", "T"), param("scale", "tensor(float)")],
            outputs=[param("values", "tensor(float4e2m1)"), param("block_scales", "tensor(float8e4m3fn)")],
            type_constraints=floats,
            attributes=[attr("axis", integer, ""), attr("block_size", integer, ""), attr("scale_type", integer, "")]))
        onnx.defs.register_schema(OpSchema(  # the weights' form, replaced by ModelOpt's exporter in finish_nvfp4
            "TRT_FP4QDQ", "trt", 1, inputs=[param("x", "T")], outputs=[param("y", "T")], type_constraints=floats,
            attributes=[attr("block_size", integer, "")]))
    return onnxscript.values.Opset("trt", 1)


def _nvfp4_on_cpu() -> None:
    """Give ModelOpt's NVFP4 quantizer op a CPU kernel: ModelOpt computes it with CUDA kernels only, and its eager
    run on a CPU (the export's CPU path, its checks, and the exporter printing the module) would fail. The kernel is
    ModelOpt's own NVFP4 arithmetic (NVFP4QTensor): per-tensor scale amax / (6 * 448), FP8 block scales, FP4 values."""
    global _CPU_KERNEL
    if _CPU_KERNEL is not None:
        return
    from modelopt.torch.quantization import tensor_quant
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    def kernel(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits):
        if (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) != NVFP4_OP_BITS:  # not NVFP4: ModelOpt's
            return tensor_quant._dynamic_block_quantize_impl(inputs, block_size, amax, num_bits, exponent_bits,
                                                             scale_num_bits, scale_exponent_bits)
        global_scale = amax.float().amax() / (FP4_E2M1_MAX * FP8_E4M3_MAX)
        packed, block_scales, _ = NVFP4QTensor.quantize(inputs.float(), block_size,
                                                        weights_scaling_factor_2=global_scale)
        return packed.dequantize(dtype=torch.float32, scale=block_scales, double_scale=global_scale,
                                 block_sizes={-1: block_size}).to(inputs.dtype)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": that is the point
        _CPU_KERNEL = torch.library.Library("tensorrt", "IMPL")
        try:
            _CPU_KERNEL.impl("dynamic_block_quantize_op", kernel, "CPU", allow_override=True)
        except TypeError:  # torch < 2.12 has no allow_override; its registry refuses a second Python kernel
            torch.library._impls.discard("tensorrt/dynamic_block_quantize_op/CPU")
            _CPU_KERNEL.impl("dynamic_block_quantize_op", kernel, "CPU")


_CPU_KERNEL = None


def quant_format(module: torch.nn.Module) -> str | None:
    """'fp8' or 'nvfp4' for a module with enabled ModelOpt quantizers, else None."""
    enabled = [m for _, m in quantizers(module) if m.is_enabled]
    if not enabled:
        return None
    return "nvfp4" if any(m.block_sizes for m in enabled) else "fp8"


def export_options(module: torch.nn.Module) -> tuple:
    """(context, custom_translation_table) for torch.onnx.export of `module`: ModelOpt's export mode and the Q/DQ
    translations when it holds enabled quantizers; nothing otherwise."""
    if quant_format(module) is None:
        return contextlib.nullcontext(), None
    from modelopt.torch.quantization.utils import export_torch_mode

    _nvfp4_on_cpu()
    return export_torch_mode(), {torch.ops.tensorrt.quantize_op.default: _fp8_qdq,
                                 torch.ops.tensorrt.dynamic_block_quantize_op.default: _fp4_dynamic_qdq}


def finish_nvfp4(model):
    """The written NVFP4 graph (an onnx ModelProto, weights loaded) with its weights stored in FP4: each weight's
    dynamic quantization becomes the static form ModelOpt's exporter takes (`TRT_FP4QDQ` on the weight), which
    its NVFP4QuantExporter turns into FP4 values, FP8 block scales and two DequantizeLinear. Returns the model."""
    import logging

    import onnx

    graph = model.graph
    constants = {t.name for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in [n for n in graph.node if n.op_type == "TRT_FP4DynamicQuantize" and n.input[0] in constants]:
        (dq_scales,), (dq_values,) = consumers[node.output[1]], consumers[node.output[0]]
        block = next(a.i for a in node.attribute if a.name == "block_size")
        at = list(graph.node).index(node)
        for done in (node, dq_scales, dq_values):
            graph.node.remove(done)
        graph.node.insert(at, onnx.helper.make_node("TRT_FP4QDQ", [node.input[0]], [dq_values.output[0]],
                                                    name=dq_values.name, domain="trt", block_size=block))
    exporter = nvfp4_exporter()
    quiet = logging.getLogger("modelopt")  # its INFO lines, not the user's
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        model = exporter.post_process(exporter.compress_weights(exporter.compute_scales(model)))
    finally:
        quiet.setLevel(level)
    used = {name for n in model.graph.node for name in n.input}  # the weights' calibrated scales are unused now
    kept = [t for t in model.graph.initializer if t.name in used]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(kept)
    return model


def nvfp4_reference_session(path):
    """onnx's reference evaluator on an NVFP4 graph, TensorRT's dynamic FP4 quantization computed by ModelOpt's
    NVFP4 quantizer (onnxruntime has no FP4 kernels). `.run(None, feeds)` as onnxruntime's."""
    import ml_dtypes
    import numpy as np
    import onnx
    from modelopt.torch.quantization.qtensor import NVFP4QTensor
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class TRT_FP4DynamicQuantize(OpRun):  # noqa: N801 - the op's name
        op_domain = "trt"

        def _run(self, x, scale, axis=-1, block_size=NVFP4_BLOCK, scale_type=None):
            t = torch.from_numpy(np.asarray(x, dtype=np.float32))
            packed, block_scales, _ = NVFP4QTensor.quantize(t, block_size, weights_scaling_factor_2=torch.tensor(
                np.float32(scale)))
            data = packed._quantized_data.numpy()  # two E2M1 codes a byte, the first in the low nibble
            codes = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(t.shape).astype(np.uint8)
            return (codes.view(ml_dtypes.float4_e2m1fn),
                    block_scales.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn))

    return ReferenceEvaluator(onnx.load(str(path)), new_ops=[TRT_FP4DynamicQuantize])
