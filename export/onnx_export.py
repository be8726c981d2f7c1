"""PyTorch module -> ONNX file, checked against the module as it is written.

The dynamo exporter (`torch.onnx.export(..., dynamo=True)`) is the one that handles all three networks (the
TorchScript one fails on Qwen3's SDPA with GQA). At opset 23 it emits ONNX `Attention` and
`RMSNormalization`, which keeps attention fused in TensorRT and TensorRT-RTX (parsed as IAttention) and runs
in onnxruntime. The exporter's optimizer folds constants and removes dead nodes; weights over 2 GB go to one
external-data file beside the graph.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zimage_trt.common.errors import UserError

DEFAULT_OPSET = 23
# FP8 (E4M3, 3 mantissa bits) against float32: set from measurement, see quantize.py and BENCHMARKS.md
FP8_BOUND = 1e-1
# NVFP4 (E2M1, 1 mantissa bit, blocks of 16) against float32, set from measurement (BENCHMARKS.md): the tiny
# transformer's graph 7.7e-2 with the test recipe's skips, its fake-quantized twin 1.39e-1 with none; the
# full-size twin (random weights, every block quantized, H200) 2.86e-1. A broken graph is off by ~1 or more.
NVFP4_BOUND = 4e-1
TWO_GB = 2 * 1024**3

# max|onnx - reference| / max|reference| allowed by the self-check, per graph precision. The reference is the
# module in float32, so the fp16/bf16 bounds include the rounding of the lower precision itself.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2, "fp8": FP8_BOUND, "nvfp4": NVFP4_BOUND}


@dataclass
class CheckResult:
    name: str
    precision: str
    max_abs: float
    rel: float
    tolerance: float
    provider: str
    skipped: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.skipped) or (np.isfinite(self.rel) and self.rel <= self.tolerance)

    def line(self) -> str:
        if self.skipped:
            return f"{self.name:<13} {self.precision:<5} not checked: {self.skipped}"
        verdict = "ok" if self.ok else "FAIL"
        return (
            f"{self.name:<13} {self.precision:<5} max|err| {self.max_abs:.3e}  rel {self.rel:.3e}"
            f"  (bound {self.tolerance:.0e}, {self.provider})  {verdict}"
        )


def export_onnx(module, inputs: tuple, path: Path, dynamic_shapes: dict | None, opset: int = DEFAULT_OPSET) -> Path:
    """Export `module(*inputs)` to `path`; the graph's I/O names are the module's input_names/output_names.
    A module with FP8 or NVFP4 quantizers is exported with their Q/DQ (quantize.py)."""
    from .quantize import export_options, quant_format

    module.eval()
    mode, translations = export_options(module)
    nvfp4 = quant_format(module) == "nvfp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    # The exporter logs every decomposition it tries; keep the user's terminal for the progress bar.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), mode:
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                inputs,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                input_names=list(module.input_names),
                output_names=list(module.output_names),
                optimize=True,
                verbose=False,
                custom_translation_table=translations,
            )
            program.save(str(path), external_data=n_bytes > TWO_GB)
            _drop_constants(program)
    finally:
        quiet.setLevel(level)
    if nvfp4:
        _store_fp4_weights(path)
    return path


def _store_fp4_weights(path: Path) -> None:
    """Rewrite a written NVFP4 graph with its weights in FP4 (quantize.finish_nvfp4): read whole, weights included,
    and written again, its external data (if any) replaced."""
    import onnx

    from .quantize import finish_nvfp4

    model = finish_nvfp4(onnx.load(str(path)))
    data = path.with_name(path.name + ".data")
    big = data.exists()
    data.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True, location=data.name)


# The exporter's graph rewriter (onnxscript) keeps the graphs it last matched in module-level pattern matchers, so
# a written graph outlives its ONNXProgram: its constants (the weights the optimizer folded, e.g. each W^T) and the
# module's own parameters, which its inputs still reference. Measured on the H200 (BENCHMARKS.md): the text
# encoder's and the transformer's GPU weights stayed resident to the end of the export. Dropping our references
# frees nothing; these two functions free the memory itself, whoever still holds the objects.


def _drop_constants(program) -> None:
    """Empty the written graph's initializers (the weights are in the file now)."""
    for value in program.model.graph.initializers.values():
        value.const_value = None


def release_weights(module: torch.nn.Module) -> None:
    """Give back a module's parameters and buffers once its graph is written and checked (the module is unusable
    after)."""
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)


def rename_dims(path: Path, names: dict[str, str]) -> None:
    """Rename dynamic dims of the graph's inputs and outputs (e.g. the exporter's '2*h_tokens' to
    'latent_height'), so every graph names an axis the same way and the builder finds its range by name.
    Only the graph file is rewritten; external weight data is left where it is."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
    onnx.save(model, str(path))


def graph_io(path: Path) -> dict:
    """Names, ONNX element types and shapes (str for dynamic dims) of a graph's inputs and outputs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


@contextlib.contextmanager
def _strict_copy(path: Path):
    """A copy of the graph whose every FP16/BF16 intermediate is also a graph output, beside it, removed after.

    onnxruntime's CPU provider has few FP16 kernels; it runs a chain of FP16 nodes in FP32 and casts only at
    the chain's ends, so an intermediate that overflows FP16 never shows. A tensor that is a graph output must
    be produced in its declared type, which restores what a strongly typed TensorRT engine does: every tensor
    between layers is stored in the graph's precision. Only the graph is copied: written beside the original, the
    copy reads the original's external weights (a graph over 2 GB cannot be written in one protobuf).
    """
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    low = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    existing = {o.name for o in model.graph.output}
    for value in model.graph.value_info:
        if value.type.tensor_type.elem_type in low and value.name not in existing:
            model.graph.output.append(value)
    strict = path.with_name(f".{path.stem}.strict.onnx")
    onnx.save(model, str(strict))
    try:
        yield strict
    finally:
        strict.unlink(missing_ok=True)


REFERENCE_EVALUATOR = "onnx reference evaluator"


def check_runner(precision: str) -> str:
    """What runs a graph of `precision` in the check: onnxruntime, or for NVFP4 (no onnxruntime FP4 kernels) onnx's
    reference evaluator."""
    return REFERENCE_EVALUATOR if precision == "nvfp4" else "onnxruntime"


def check_onnx(name: str, path: Path, reference, inputs: tuple, precision: str, providers=None) -> CheckResult:
    """Run the graph on `inputs` and compare with `reference(*inputs)` (a float32 module): with onnxruntime, or for
    an NVFP4 graph (no onnxruntime kernels) with onnx's reference evaluator.

    Reduced-precision graphs are run strictly (see _strict_copy), so an FP16 overflow anywhere in
    the graph reaches the result as inf/NaN instead of being hidden by onnxruntime's FP32 fallback.
    """
    providers = providers or ["CPUExecutionProvider"]
    if precision == "bf16" and providers == ["CPUExecutionProvider"]:
        return CheckResult(name, precision, 0.0, 0.0, TOLERANCE[precision], providers[0],
                           "onnxruntime's CPU provider has no BF16 kernels")
    if check_runner(precision) == REFERENCE_EVALUATOR:
        got, runner = _run_reference_evaluator(path, inputs), REFERENCE_EVALUATOR
    else:
        got, runner = _run_onnxruntime(path, inputs, precision, providers), providers[0]
    with torch.no_grad(), strict_fp32():
        want = reference(*inputs)
    return compare(name, torch.from_numpy(np.asarray(got, dtype=np.float32)), want, precision, runner)


def _run_onnxruntime(path: Path, inputs: tuple, precision: str, providers: list) -> np.ndarray:
    """The graph's first output on `inputs`, as written (onnxruntime's rewrites off), strictly below fp32."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The check compares the graph as written, not onnxruntime's rewrites of it.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with contextlib.nullcontext(path) if precision == "fp32" else _strict_copy(path) as run_path:
        session = ort.InferenceSession(str(run_path), options, providers=providers)
        feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
        return session.run([session.get_outputs()[0].name], feeds)[0]


def _run_reference_evaluator(path: Path, inputs: tuple) -> np.ndarray:
    """The graph's first output with onnx's reference evaluator (quantize.nvfp4_reference_session), in the graph's
    own types (FP4 values, FP8 scales, fp16 between layers)."""
    from .quantize import nvfp4_reference_session

    session = nvfp4_reference_session(path)
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(session.input_names, inputs)}
    return session.run([session.output_names[0]], feeds)[0]


@contextlib.contextmanager
def strict_fp32():
    """Float32 that is float32 on a GPU too: PyTorch lets cuDNN convolutions use TF32 by default, which puts a
    float32 reference 1e-3 away from itself on a CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def error_of(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max|got - want|, that over max|want|); both inf if `got` holds a non-finite value."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf"), float("inf")
    max_abs = float((got - want).abs().max())
    return max_abs, max_abs / max(float(want.abs().max()), 1e-30)


def pair_errors(outputs: dict, pairs) -> tuple[list[dict], str]:
    """The error of each (a, b) of `pairs` among named `outputs`: rows, and the same as a printed table."""
    rows = [dict(zip(("pair", "max_abs", "rel"), (f"{a} vs {b}", *error_of(outputs[a], outputs[b]))))
            for a, b in pairs]
    width = max(len(r["pair"]) for r in rows) + 2
    lines = [f"{'pair':<{width}} {'max|err|':>10} {'rel':>10}"]
    lines += [f"{r['pair']:<{width}} {r['max_abs']:10.3e} {r['rel']:10.3e}" for r in rows]
    return rows, "\n".join(lines)


def compare(name: str, got: torch.Tensor, want: torch.Tensor, precision: str, provider: str) -> CheckResult:
    if got.shape != want.shape:
        raise RuntimeError(f"{name}: output shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    max_abs, rel = error_of(got, want)
    return CheckResult(name, precision, max_abs, rel, TOLERANCE[precision], provider)


@torch.no_grad()
def check_eager(name: str, module, reference, inputs: tuple, precision: str) -> CheckResult:
    """The exported module run eagerly (its "eager twin") against the reference, on the inputs' device.

    For graphs too large for onnxruntime on a CPU: on a GPU this checks, at full size and in the graph's
    precision, the very module that was traced; the graph itself is then proven by the TensorRT parse.
    """
    device = inputs[0].device
    with strict_fp32():
        want = reference(*inputs)
    return compare(name, module(*inputs), want, precision, f"eager twin on {device}")


def require_ok(result: CheckResult) -> None:
    if not result.ok:
        raise UserError(f"export check failed: {result.line()}")
