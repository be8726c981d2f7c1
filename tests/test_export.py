"""Each exported graph, run by onnxruntime, against its PyTorch module: fp32 within 1e-4 relative, fp16 within
the stated bound, at caption lengths other than the ones the export traced."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from zimage_trt.export import checkpoint
from zimage_trt.export.modules import DiTForExport, TextEncoderForExport
from zimage_trt.export.onnx_export import TOLERANCE, check_onnx

from .conftest import SIZE


def manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


@pytest.mark.parametrize("bundle_name", ["fp32_bundle", "fp16_bundle"])
def test_export_self_checks_are_recorded_and_within_bounds(request, bundle_name):
    m = manifest(request.getfixturevalue(bundle_name))
    if m["image_sizes"]["dynamic"]:  # a size range: each image graph is checked at its corners and opt size
        (lo, opt, hi), _ = m["image_sizes"]["height"], m["image_sizes"]["width"]
        at = [f"{s}x{s}" for s in (lo, opt, hi)]
        want = {"text_encoder"} | {f"{n}@{a}" for n in ("transformer", "vae_decoder") for a in at}
    else:
        want = {"text_encoder", "transformer", "vae_decoder"}
    assert {c["name"] for c in m["checks"]} == want
    for c in m["checks"]:
        assert not c["skipped"]
        assert c["rel"] <= TOLERANCE[c["precision"]], c
        assert c["rel"] > 0  # a real comparison ran: reduced precision and fp32 reorderings are never exact


def test_bundle_is_self_contained(fp32_bundle):
    names = sorted(p.name for p in fp32_bundle.iterdir())
    assert names == [
        "manifest.json", "scheduler.json", "text_encoder.onnx", "tokenizer", "transformer.onnx", "vae_decoder.onnx"
    ]
    m = manifest(fp32_bundle)
    assert m["height"] == m["width"] == SIZE
    assert m["latent_shape"] == [1, 16, SIZE // 8, SIZE // 8]
    dit = m["networks"]["transformer"]
    assert [i["name"] for i in dit["inputs"]] == ["latents", "timestep", "cap_feats", "cap_len"]
    assert dit["inputs"][2]["shape"][1] == "cap_tokens"  # the one dynamic size
    assert dit["inputs"][0]["shape"] == [1, 16, SIZE // 8, SIZE // 8]  # static image size
    te = m["networks"]["text_encoder"]
    assert te["inputs"][0]["shape"] == [1, "tokens"]


def test_graphs_use_fused_attention_and_no_complex_ops(fp32_bundle):
    model = onnx.load(str(fp32_bundle / "transformer.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert "Attention" in ops  # fused: no materialised score matrix in the graph
    assert "RMSNormalization" in ops
    assert not ops & {"Softmax", "DFT", "STFT"}
    onnx.checker.check_model(str(fp32_bundle / "transformer.onnx"))


@pytest.mark.parametrize("bundle_name, n_cap", [("fp32_bundle", 5), ("fp32_bundle", 200), ("fp16_bundle", 90)])
def test_transformer_graph_at_other_caption_lengths(request, tmp_path, tiny_model, bundle_name, n_cap):
    bundle = request.getfixturevalue(bundle_name)
    prec = manifest(bundle)["networks"]["transformer"]["precision"]
    dit = checkpoint.load_transformer(tiny_model, torch.float32)
    ref = DiTForExport(dit)
    g = torch.Generator().manual_seed(n_cap)
    lpad = -(-n_cap // 32) * 32
    inputs = (
        torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=g),
        torch.tensor([0.6]),
        torch.randn(1, lpad, dit.config.cap_feat_dim, generator=g),
        torch.tensor([n_cap]),
    )
    result = check_onnx("transformer", bundle / "transformer.onnx", ref, inputs, prec)
    assert result.ok, result.line()
    if prec == "fp16" and n_cap == 90:  # the strict fp16 check of a graph with external weights (as over 2 GB)
        external = tmp_path / "transformer.onnx"
        onnx.save_model(onnx.load(str(bundle / "transformer.onnx")), str(external), save_as_external_data=True,
                        location="transformer.onnx.data")
        again = check_onnx("transformer", external, ref, inputs, prec)
        assert (again.max_abs, again.rel) == (result.max_abs, result.rel)
        assert external.stat().st_size < (tmp_path / "transformer.onnx.data").stat().st_size / 10
        assert sorted(p.name for p in tmp_path.iterdir()) == ["transformer.onnx", "transformer.onnx.data"]


def test_text_encoder_graph_at_other_lengths(tiny_model, fp32_bundle):
    qwen = checkpoint.load_text_encoder(tiny_model, torch.float32)
    for n in (1, 130):
        ids = torch.randint(0, qwen.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        result = check_onnx("text_encoder", fp32_bundle / "text_encoder.onnx", TextEncoderForExport(qwen), (ids,), "fp32")
        assert result.ok, result.line()


def test_bf16_graph_is_not_checked_on_cpu_and_says_why(tmp_path):
    result = check_onnx("vae_decoder", tmp_path / "absent.onnx", None, (), "bf16")
    assert result.skipped and "BF16" in result.skipped
    assert np.isclose(result.tolerance, TOLERANCE["bf16"])


def test_float32_references_run_without_tf32_and_restore_the_setting():
    from zimage_trt.export.onnx_export import strict_fp32

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        with strict_fp32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("network", ["text_encoder", "transformer", "vae_decoder"])
def test_offloaded_float32_reference_computes_what_the_resident_one_does(tiny_model, network):
    """The export checks on a GPU against a float32 reference whose weights stay in host memory, each layer's
    moved in only while it runs (accelerate's hooks, set on the export wrapper). Here the hooks move them from
    the meta device on the CPU: the same code path, and the outputs must be equal bit for bit."""
    from zimage_trt.export.modules import DiffusersDiT, VaeDecoderForExport
    from zimage_trt.export.reference import float32_reference

    g = torch.Generator().manual_seed(0)
    load, wrap, inputs = {
        "text_encoder": (checkpoint.load_text_encoder, TextEncoderForExport,
                         (torch.randint(0, 100, (1, 17), generator=g),)),
        "transformer": (checkpoint.load_transformer, DiffusersDiT,
                        (torch.randn(1, 16, 32, 32, generator=g), torch.tensor([0.5]), torch.randn(1, 32, 128, generator=g),
                         torch.tensor([21]))),
        "vae_decoder": (checkpoint.load_vae, VaeDecoderForExport, (torch.randn(1, 16, 16, 16, generator=g),)),
    }[network]
    loader = lambda dtype, device: load(tiny_model, dtype, device)  # noqa: E731
    resident = float32_reference(loader, wrap, "cpu", offload=False)
    offloaded = float32_reference(loader, wrap, "cpu", offload=True)
    assert {p.device.type for p in offloaded.parameters()} == {"meta"}  # nothing resident between runs
    with torch.no_grad():
        want, got = resident(*inputs), offloaded(*inputs)
    assert want.dtype == torch.float32 and torch.equal(got, want)


def test_export_states_its_memory_needs_from_the_checkpoint_headers(tiny_model, fp16_bundle):
    """What `export` says it needs comes from the safetensors headers alone; the weights it counts are exactly
    those the loaded networks hold, and the manifest records the measured peaks of every stage."""
    from zimage_trt.export.bundle import ExportOptions
    from zimage_trt.export.needs import GPU_MARGIN, HOST_MARGIN, NVFP4_REWRITE_BYTES, export_needs

    dit = sum(p.numel() for p in checkpoint.load_transformer(tiny_model).parameters())
    shard = max(f.stat().st_size for f in (tiny_model / "transformer").glob("*.safetensors"))
    assert 0 < shard < 4 * dit  # the tiny model is sharded as the real one is
    cpu = export_needs(tiny_model, ExportOptions(fp16_scales={}))  # fp16, no calibration: the module + a shard
    assert cpu.gpu == 0 and cpu.host == 2 * dit + shard + HOST_MARGIN and cpu.largest == "transformer"
    calibrating = export_needs(tiny_model, ExportOptions())  # fp32 calibration on the CPU first
    assert calibrating.host == 4 * dit + shard + HOST_MARGIN
    fp8 = export_needs(tiny_model, ExportOptions(precision={**ExportOptions().precision, "transformer": "fp8"},
                                                 fp16_scales={}))  # quantized in float32 on the CPU
    assert fp8.host == 4 * dit + shard + HOST_MARGIN
    gpu = export_needs(tiny_model, ExportOptions(device="cuda"))  # fp16 network + float32 reference on the host
    assert gpu.gpu == 2 * dit + GPU_MARGIN and gpu.host == 2 * dit + 4 * dit + HOST_MARGIN
    nvfp4 = export_needs(tiny_model, ExportOptions(  # unchecked: the FP4 rewrite of the written graph decides
        device="cuda", check="never", precision={**ExportOptions().precision, "transformer": "nvfp4"}))
    assert nvfp4.host == int(dit * NVFP4_REWRITE_BYTES) + HOST_MARGIN and nvfp4.largest == "transformer"
    assert "needs about" in cpu.line("cpu") and "GPU" in gpu.line("cuda")
    stages = [s["stage"] for s in manifest(fp16_bundle)["export_memory"]]
    assert stages[0] == "text_encoder: loading" and stages[-1] == "export done"
    assert all(s["host_peak_gb"] > 0 for s in manifest(fp16_bundle)["export_memory"])


class _Wide(torch.nn.Module):
    """Two square Linears applied to a [1, 3, n] input: the exporter folds each weight's transpose into a new
    constant, as it does for every Linear of the real networks."""

    input_names, output_names = ("x",), ("y",)

    def __init__(self, n: int):
        super().__init__()
        self.a, self.b = torch.nn.Linear(n, n, bias=False), torch.nn.Linear(n, n, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


def test_a_written_graph_gives_its_weights_back(tmp_path):
    """The exporter's rewriter keeps written graphs alive (onnx_export.py); after release_weights the process holds
    neither the module's weights nor the folded copies, and the graph on disk is whole."""
    import gc

    import onnxruntime as ort

    from zimage_trt.export.onnx_export import export_onnx, release_weights
    from zimage_trt.common.peaks import host_now_bytes

    def export(n: int, name: str):
        module, x = _Wide(n), torch.randn(1, 3, n, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want = module(x).numpy()
        path = export_onnx(module, (x,), tmp_path / name, None)
        release_weights(module)
        return sum(p.numel() * p.element_size() for p in module.parameters()), path, x, want

    export(64, "warm.onnx")  # the exporter's own libraries and caches, before the measurement
    gc.collect()
    before = host_now_bytes()
    weights = 2 * 4096 * 4096 * 4
    _, path, x, want = export(4096, "wide.onnx")
    gc.collect()
    held = host_now_bytes() - before
    assert held < weights / 4, f"{held / 1e9:.2f} GB still held after releasing {weights / 1e9:.2f} GB of weights"
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
