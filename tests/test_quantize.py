"""FP8 transformer: ModelOpt post-training quantization, its Q/DQ in the ONNX graph, the bundle, parity, the
TensorRT-RTX builds ahead of time, and every refusal."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from zimage_trt.common.errors import UserError
from zimage_trt.export.onnx_export import TOLERANCE

from .conftest import PROMPT, SIZE
from .quantized import CALIBRATION_PROMPTS, PER_BLOCK, blocks_of, export_quantized, linear_model, transformer_of
from .test_user_errors import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def fp8_bundle(tiny_model, tmp_path_factory):
    return export_quantized(tiny_model, tmp_path_factory, "fp8")


def test_fp8_bundle_records_its_recipe_and_is_checked_against_float32(fp8_bundle, tiny_model):
    from zimage_trt.export.quantize import prompts_sha256

    net = transformer_of(fp8_bundle)
    q = net["quantization"]
    blocks = blocks_of(tiny_model)
    assert q["format"] == "fp8" and q["skip"] == ["noise_refiner.0", "noise_refiner.1", "layers.0"]
    assert q["quantized_layers"] == (len(blocks) - 3) * PER_BLOCK
    assert q["prompts_sha256"] == prompts_sha256(CALIBRATION_PROMPTS) and q["steps"] == 3
    assert "weights" not in net  # no run-time LoRA on calibrated FP8 weights
    manifest = json.loads((fp8_bundle / "manifest.json").read_text())
    (check,) = [c for c in manifest["checks"] if c["name"] == "transformer"]
    # within the FP8 bound, and well past what fp16 alone costs (the quantization is really in the graph)
    assert TOLERANCE["fp16"] / 10 < check["rel"] <= TOLERANCE["fp8"], check


def test_graph_holds_standard_fp8_qdq_on_the_quantized_layers_only(fp8_bundle):
    graph = onnx.load(str(fp8_bundle / "transformer.onnx"), load_external_data=False).graph
    consts = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = n.attribute[0].t
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    q = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    layers = transformer_of(fp8_bundle)["quantization"]["quantized_layers"]
    blocks = layers // PER_BLOCK
    # per block: 7 weights, and 4 inputs (to_q, to_k, to_v read one tensor with one scale, and so do w1 and w3:
    # the exporter keeps one Q/DQ for each); a weight's Q may be folded into FP8 data, its DQ stays
    assert len(dq) == blocks * (7 + 4)
    assert len(q) >= blocks * 4
    for node in q + dq:
        assert consts[node.input[2]].data_type == onnx.TensorProto.FLOAT8E4M3FN  # the zero point sets the type
        assert consts[node.input[1]].data_type == onnx.TensorProto.FLOAT16  # scale in the input's precision


def test_qdq_translation_equals_modelopt_fake_quantization(tmp_path):
    """One quantized Linear, calibrated by ModelOpt, exported through the project's path: onnxruntime's Q/DQ
    computes what ModelOpt's fake quantization computes. (Across a whole network the two part at the 1e-2 level:
    a float32 rounding difference moves an activation across an FP8 rounding boundary, which then changes every
    later layer's inputs; see BENCHMARKS.md.)"""
    import onnxruntime as ort

    from zimage_trt.export.onnx_export import export_onnx
    from zimage_trt.export.quantize import QuantRecipe, quantize

    g = torch.Generator().manual_seed(0)
    model, x = linear_model(64), torch.randn(1, 40, 64, generator=g) * 3
    assert quantize(model, QuantRecipe(), lambda m: m(x)) == 1
    with torch.no_grad():
        want = model(x * 0.9)
    path = export_onnx(model, (x,), tmp_path / "model.onnx", None)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": (x * 0.9).numpy()})[0]
    rel = np.abs(got - want.numpy()).max() / np.abs(want.numpy()).max()
    assert rel <= 1e-6, rel
    with torch.no_grad():  # and the quantization is real: the unquantized layer differs at FP8's step
        w1 = model.layers[0].feed_forward.w1
        plain = torch.nn.functional.linear(x * 0.9, w1.weight, w1.bias)
    assert (plain - want).abs().max() / want.abs().max() > 1e-3


def test_parity_of_fp8_against_float32_diffusers(fp8_bundle, tiny_model):
    from zimage_trt.parity import IMAGE_BOUND_DB, NETWORK_BOUND, run_parity
    from zimage_trt.runtime.bundle import Bundle
    from zimage_trt.sessions import open_sessions

    bundle, cpu = Bundle.open(fp8_bundle), torch.device("cpu")
    rows = run_parity(tiny_model, bundle, open_sessions("onnxruntime", bundle, cpu), "onnxruntime", PROMPT, 0, cpu)
    by = {r.stage.split(" ")[0]: r for r in rows}
    assert by["transformer"].precision == "fp8" and by["transformer"].bound == NETWORK_BOUND["fp8"]
    assert 1e-3 < by["transformer"].rel <= NETWORK_BOUND["fp8"]
    assert by["image"].bound == IMAGE_BOUND_DB["fp8"] and by["image"].ok
    assert all(r.ok for r in rows)


def test_rtx_builds_fp8_for_ada_and_blackwell_and_the_sidecar_keeps_the_recipe(fp8_bundle, tmp_path):
    from zimage_trt.engine.build import BuildOptions, build_engines

    (r,) = build_engines(fp8_bundle, tmp_path / "e", BuildOptions(backend="tensorrt-rtx", targets=["sm89", "sm120"],
                                                                 networks=("transformer",)))
    assert r.status == "built" and r.meta["targets"]["compute_capabilities"] == ["sm89", "sm120"]
    assert r.meta["quantization"] == transformer_of(fp8_bundle)["quantization"]


def test_fp8_refusals_are_one_line(capsys, fp8_bundle, tiny_model, tmp_path):
    from zimage_trt.engine import sidecar

    code, err = run_cli(capsys, "build", "--bundle", str(fp8_bundle), "--out", str(tmp_path / "e"), "--backend",
                        "tensorrt-rtx", "--target", "sm86", "--networks", "transformer")
    assert_one_line_error(code, err, "fp8-quantized", "sm86", "sm89")
    meta = {"quantization": transformer_of(fp8_bundle)["quantization"], "targets": {"compute_capabilities": ["sm89"]}}
    with pytest.raises(UserError, match="RTX 3090 \\(sm86\\) has no FP8 tensor cores"):
        sidecar.check_gpu(meta, "transformer", {"name": "RTX 3090", "compute_capability": "sm86"}, "fix")
    sidecar.check_gpu(meta, "transformer", {"name": "RTX 4090", "compute_capability": "sm89"}, "fix")
    code, err = run_cli(capsys, "generate", "--bundle", str(fp8_bundle), "--backend", "torch", "--model",
                        str(tiny_model), "--prompt", "x", "--out", str(tmp_path / "x.png"))
    assert_one_line_error(code, err, "fp8", "--backend onnxruntime")
    from zimage_trt.runtime.bundle import Bundle
    from zimage_trt.runtime.lora import bundle_weights

    with pytest.raises(UserError, match="bake it at export"):
        bundle_weights(Bundle.open(fp8_bundle))


@pytest.mark.parametrize("argv, needles", [
    (["--dit-precision", "fp16", "--quant-skip", "first:1"], ("--quant-skip", "--dit-precision fp8")),
    (["--dit-precision", "fp8", "--quant-skip", "layers.99"], ("--quant-skip layers.99", "no such block")),
    (["--dit-precision", "fp8", "--quant-skip", "last:0"], ("--quant-skip last:0", "N must be")),
])
def test_fp8_export_mistakes_are_one_line_before_any_work(capsys, tiny_model, tmp_path, argv, needles):
    code, err = run_cli(capsys, "export", "--model", str(tiny_model), "--out", str(tmp_path / "b"), *argv)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "b").exists()


def test_quant_skip_names_blocks_in_model_order():
    from zimage_trt.export.quantize import parse_skip

    names = ["noise_refiner.0", "noise_refiner.1", "context_refiner.0", "context_refiner.1"] + [
        f"layers.{i}" for i in range(30)]
    assert parse_skip("last:2,first:1", names) == ["layers.0", "layers.28", "layers.29"]
    assert parse_skip("context_refiner.*, layers.7", names) == ["context_refiner.0", "context_refiner.1", "layers.7"]
    assert parse_skip(None, names) == []


def test_parity_against_the_fp16_bundle_stage_by_stage(fp8_bundle, fp16_bundle):
    """What a user with real weights runs: the fp8 bundle against their fp16 bundle, no model and no diffusers."""
    from zimage_trt.parity import IMAGE_BOUND_DB, NETWORK_BOUND, run_against
    from zimage_trt.runtime.bundle import Bundle
    from zimage_trt.sessions import open_sessions

    cpu = torch.device("cpu")
    ours, theirs = Bundle.open(fp8_bundle), Bundle.open(fp16_bundle)
    rows = run_against(ours, open_sessions("onnxruntime", ours, cpu), theirs, open_sessions("onnxruntime", theirs, cpu),
                       "onnxruntime", PROMPT, 0, cpu, sizes=[(SIZE, SIZE)])
    by = {r.stage.split(" ")[0]: r for r in rows}
    assert [r.stage.split(" ")[0] for r in rows] == ["text_encoder", "transformer", "vae_decoder", "image"]
    assert by["text_encoder"].precision == "fp16 vs fp16" and by["text_encoder"].max_abs == 0.0  # one graph, one input
    assert by["vae_decoder"].max_abs == 0.0  # both fp32: the last latents are the fp16 bundle's on both sides
    assert by["transformer"].precision == "fp8 vs fp16" and by["transformer"].bound == NETWORK_BOUND["fp8"]
    assert 1e-3 < by["transformer"].rel <= NETWORK_BOUND["fp8"]  # FP8 moves it, within its bound
    assert by["image"].bound == IMAGE_BOUND_DB["fp8"] and 25.0 <= by["image"].psnr < float("inf")
    assert all(r.ok for r in rows)


def test_parity_against_refusals_are_one_line(capsys, fp8_bundle, fp16_bundle, tmp_path):
    import shutil

    code, err = run_cli(capsys, "parity", "--bundle", str(fp8_bundle), "--against-engines", str(tmp_path))
    assert_one_line_error(code, err, "--against BUNDLE")
    code, err = run_cli(capsys, "parity", "--bundle", str(fp8_bundle), "--against", str(fp16_bundle), "--backend",
                        "torch")
    assert_one_line_error(code, err, "onnxruntime or tensorrt")
    code, err = run_cli(capsys, "parity", "--bundle", str(fp8_bundle), "--against", str(fp16_bundle),
                        "--guidance-scale", "2")
    assert_one_line_error(code, err, "drop --guidance-scale")
    code, err = run_cli(capsys, "parity", "--bundle", str(fp8_bundle), "--against", str(fp16_bundle), "--size",
                        "48x48")
    assert_one_line_error(code, err, "48x48")
    other = tmp_path / "other"  # another model: its configuration differs
    shutil.copytree(fp16_bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["config"]["transformer"]["n_layers"] += 1
    (other / "manifest.json").write_text(json.dumps(manifest))
    code, err = run_cli(capsys, "parity", "--bundle", str(fp8_bundle), "--against", str(other), "--device", "cpu")
    assert_one_line_error(code, err, "different model")
