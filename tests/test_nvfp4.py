"""NVFP4 transformer: ModelOpt's NVFP4 quantization, its graph (FP4 weights with FP8 block scales, TensorRT's dynamic
FP4 quantization of activations), the check through onnx's reference evaluator, the TensorRT-RTX sm120 build ahead
of time, and every refusal (onnxruntime has no FP4 kernels; GPUs before Blackwell have no FP4 tensor cores)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from zimage_trt.common.errors import UserError
from zimage_trt.export.onnx_export import TOLERANCE

from .quantized import PER_BLOCK, blocks_of, export_quantized, linear_model, transformer_of
from .test_user_errors import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def nvfp4_bundle(tiny_model, tmp_path_factory):
    return export_quantized(tiny_model, tmp_path_factory, "nvfp4")


def test_nvfp4_bundle_records_its_recipe_and_is_checked_against_float32(nvfp4_bundle, tiny_model):
    net = transformer_of(nvfp4_bundle)
    q = net["quantization"]
    blocks = blocks_of(tiny_model)
    assert q["format"] == "nvfp4" and q["skip"] == ["noise_refiner.0", "noise_refiner.1", "layers.0"]
    # the tiny model's feed-forward w2 reads 682 features, not a multiple of the 16-value block: kept, and said so
    assert q["unblocked"] == [f"{b}.feed_forward.w2" for b in blocks]
    assert q["quantized_layers"] == (len(blocks) - 3) * (PER_BLOCK - 1)
    assert "blocks of 16" in q["weights"] and "weights" not in net  # no run-time LoRA on calibrated weights
    manifest = json.loads((nvfp4_bundle / "manifest.json").read_text())
    (check,) = [c for c in manifest["checks"] if c["name"] == "transformer"]
    # checked by onnx's reference evaluator, within the NVFP4 bound and well past FP8's error on this model
    assert check["provider"] == "onnx reference evaluator"
    assert 4e-2 < check["rel"] <= TOLERANCE["nvfp4"], check


def test_graph_stores_quantized_weights_in_fp4_and_quantizes_their_inputs_at_run_time(nvfp4_bundle):
    graph = onnx.load(str(nvfp4_bundle / "transformer.onnx")).graph
    init = {t.name: t for t in graph.initializer}
    layers = transformer_of(nvfp4_bundle)["quantization"]["quantized_layers"]
    fp4 = [t for t in init.values() if t.data_type == onnx.TensorProto.FLOAT4E2M1]
    assert len(fp4) == layers  # each quantized weight, and nothing else
    for w in fp4:
        (scales,) = [t for t in init.values() if t.name == w.name.removesuffix("_f4") + "_f8_scale"]
        assert scales.data_type == onnx.TensorProto.FLOAT8E4M3FN and list(scales.dims) == [w.dims[0], w.dims[1] // 16]
    dynamic = [n for n in graph.node if n.op_type == "TRT_FP4DynamicQuantize"]
    # activations: per quantized block, to_q/k/v share one input and w1/w3 another, then to_out.0: 3 per block
    assert len(dynamic) == 3 * layers // (PER_BLOCK - 1) and all(n.domain == "trt" for n in dynamic)
    for node in dynamic:
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs == {"axis": -1, "block_size": 16, "scale_type": onnx.TensorProto.FLOAT8E4M3FN}
    blocked = [n for n in graph.node if n.op_type == "DequantizeLinear" and any(a.name == "block_size" and a.i == 16
                                                                               for a in n.attribute)]
    assert len(blocked) == len(dynamic) + len(fp4)
    # 4 bits a weight: the fp16 weights of the quantized layers are gone from the file
    fp16_bytes = sum(np.prod(t.dims) * 2 for t in init.values() if t.data_type == onnx.TensorProto.FLOAT16)
    fp4_bytes = sum(len(t.raw_data) for t in fp4)
    assert fp4_bytes == sum(np.prod(t.dims) for t in fp4) // 2 and fp4_bytes > 0 and fp16_bytes > 0


def test_nvfp4_graph_equals_modelopt_fake_quantization(tmp_path):
    """One quantized Linear in fp16, calibrated by ModelOpt, exported through the project's path: the graph, run by
    onnx's reference evaluator (its FP4 weights decoded by onnx, its activations quantized by ModelOpt's NVFP4
    quantizer), computes what ModelOpt's fake-quantized module computes."""
    from zimage_trt.export.onnx_export import export_onnx
    from zimage_trt.export.quantize import QuantRecipe, nvfp4_reference_session, quantize

    torch.manual_seed(0)
    model, x = linear_model(64).half(), (torch.randn(1, 40, 64) * 3).half()
    assert quantize(model, QuantRecipe("nvfp4"), lambda m: m(x)) == 1
    with torch.no_grad():
        want = model(x * 0.9).float()
        w1 = model.layers[0].feed_forward.w1
        plain = torch.nn.functional.linear(x * 0.9, w1.weight, w1.bias).float()
    path = export_onnx(model, (x,), tmp_path / "model.onnx", None)
    got = nvfp4_reference_session(path).run(None, {"x": (x * 0.9).numpy()})[0].astype(np.float32)
    rel = np.abs(got - want.numpy()).max() / np.abs(want.numpy()).max()
    assert rel <= 1e-3, rel
    assert (plain - want).abs().max() / want.abs().max() > 3e-2  # and the quantization is real: FP4's step


def test_the_cpu_kernel_rounds_each_block_to_fp4_as_ml_dtypes_does():
    """The CPU kernel given to ModelOpt's NVFP4 op (ModelOpt's own NVFP4QTensor arithmetic) against an independent
    computation: FP8 E4M3 block scales and E2M1 values by ml_dtypes' round-to-nearest-even."""
    import ml_dtypes

    from zimage_trt.export.quantize import _nvfp4_on_cpu

    _nvfp4_on_cpu()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 5
    x[0, :16] = 0.0  # an all-zero block
    amax = torch.tensor(x.abs().max().item() * 0.7)  # a calibrated amax below the tensor's: values clip at 6 x scale
    got = torch.ops.tensorrt.dynamic_block_quantize_op(x, 16, amax, 4, 2, 8, 4).numpy()
    g = np.float32(amax.item() / (6 * 448))
    blocks = x.numpy().reshape(4, 4, 16)
    s = np.abs(blocks).max(-1, keepdims=True) / 6 / g
    s = np.where(s == 0, 1.0, s)
    s = np.clip(s, 2**-9, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    values = np.clip(blocks / (s * g), -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    want = (values * s * g).reshape(4, 64)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert np.all(got[0, :16] == 0)


def test_rtx_builds_nvfp4_for_blackwell_and_refuses_ada_in_one_line(capsys, nvfp4_bundle, tmp_path):
    from zimage_trt.engine.build import BuildOptions, build_engines

    (r,) = build_engines(nvfp4_bundle, tmp_path / "e", BuildOptions(backend="tensorrt-rtx", targets=["sm120"],
                                                                    networks=("transformer",)))
    assert r.status == "built" and r.meta["targets"]["compute_capabilities"] == ["sm120"]
    assert r.meta["quantization"] == transformer_of(nvfp4_bundle)["quantization"]
    code, err = run_cli(capsys, "build", "--bundle", str(nvfp4_bundle), "--out", str(tmp_path / "e89"), "--backend",
                        "tensorrt-rtx", "--target", "sm89", "--networks", "transformer")
    assert_one_line_error(code, err, "nvfp4-quantized", "sm89", "sm100", "fp8 or fp16 bundle")


def test_nvfp4_refusals_at_run_time_are_one_line(capsys, nvfp4_bundle, tiny_model, tmp_path):
    from zimage_trt.engine import sidecar

    meta = {"quantization": transformer_of(nvfp4_bundle)["quantization"],
            "targets": {"compute_capabilities": ["sm120"]}}
    for name, cc in (("RTX 4090", "sm89"), ("H100", "sm90")):
        with pytest.raises(UserError, match=f"{name} \\({cc}\\) has no NVFP4 tensor cores .*fp8 or fp16 bundle"):
            sidecar.check_gpu(meta, "transformer", {"name": name, "compute_capability": cc}, "fix")
    sidecar.check_gpu(meta, "transformer", {"name": "RTX 5090", "compute_capability": "sm120"}, "fix")
    code, err = run_cli(capsys, "generate", "--bundle", str(nvfp4_bundle), "--prompt", "x", "--out",
                        str(tmp_path / "x.png"))
    assert_one_line_error(code, err, "nvfp4", "no FP4 kernels", "--backend tensorrt")
    code, err = run_cli(capsys, "generate", "--bundle", str(nvfp4_bundle), "--backend", "torch", "--model",
                        str(tiny_model), "--prompt", "x", "--out", str(tmp_path / "x.png"))
    assert_one_line_error(code, err, "nvfp4", "--backend tensorrt")
    assert not (tmp_path / "x.png").exists()
