"""The fast torch backend: torch.compile (inductor, on this CPU) equals eager, the FP8 linear equals ModelOpt's
fake quantization, the graph's FP8 scales are read back per layer, and what the GPU adds (FP8 tensor cores, CUDA
graph replays) against the same references, skipped without one.

The compiled sessions are built once for the module (inductor's C++ kernels are the cost: each shape of each
network compiles once, then every test reuses it); their compile cache is a folder of this test session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from zimage_trt.common.errors import UserError
from zimage_trt.runtime.torch_compile import CACHE_ENV

from .conftest import PROMPT, SIZE
from .test_user_errors import assert_one_line_error, run_cli

CPU = torch.device("cpu")
FP32_BOUND = 1e-4  # the fp32 parity bound (parity.NETWORK_BOUND["fp32"]): max|err| / max|reference|
# two caption lengths in two buckets (the prompt's 25 tokens and a longer one), two sizes: each pair compiles once
LENGTHS = {25: 32, 40: 64}
SHAPES = [(SIZE, 32), (96, 64)]  # (image side, padded caption length) of the transformer checks
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """The compile cache: $ZIMAGE_TRT_COMPILE_CACHE where CI keeps one between runs (inductor then loads the
    kernels it compiled before: the file's cost drops from minutes to seconds), else a fresh folder of this test
    session, where every compile is a real one."""
    kept = os.environ.get(CACHE_ENV)
    if kept:
        yield Path(kept)
        return
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("compile-cache"))
    yield Path(os.environ[CACHE_ENV])
    os.environ.pop(CACHE_ENV, None)


@pytest.fixture(scope="module")
def pairs(tiny_model, fp32_bundle, compile_cache):
    """{network: (compiled session, eager session)} of the tiny model in fp32 on the CPU."""
    from zimage_trt.runtime.bundle import Bundle
    from zimage_trt.sessions import open_sessions

    bundle = Bundle.open(fp32_bundle)
    fast = open_sessions("torch", bundle, CPU, model_dir=tiny_model, compile=True)
    eager = open_sessions("torch", bundle, CPU, model_dir=tiny_model)
    return {n: (fast[n], eager[n]) for n in fast}


def run(session, inputs: dict, shape) -> torch.Tensor:
    out = torch.zeros(shape)
    session.run(inputs, {session.output_names[0]: out})
    return out


def dit_inputs(side: int, lpad: int, cap_len: int) -> dict:
    g = torch.Generator().manual_seed(side + lpad)
    return {"latents": torch.randn(1, 16, side // 8, side // 8, generator=g), "timestep": torch.tensor([0.6]),
            "cap_feats": torch.randn(1, lpad, 128, generator=g), "cap_len": torch.tensor([cap_len])}


def test_compiled_text_encoder_equals_eager_one_compile_per_bucket(pairs):
    fast, eager = pairs["text_encoder"]
    for n in (*LENGTHS, 20):  # 20 shares the prompt's bucket: no third compile
        ids = {"input_ids": torch.randint(0, 100, (1, n), generator=torch.Generator().manual_seed(n))}
        got, want = run(fast, ids, (1, n, 128)), run(eager, ids, (1, n, 128))
        assert rel(got, want) <= FP32_BOUND, n
        assert got.abs().max() > 0
    assert sorted(fast.compile_log.seconds) == [((1, b),) for b in sorted(LENGTHS.values())]
    assert fast.attention.ran in ("flash", "math") and "compiled" in fast.describe()


@pytest.mark.parametrize("side, lpad", SHAPES)
def test_compiled_transformer_equals_eager(pairs, side, lpad):
    fast, eager = pairs["transformer"]
    inputs = dit_inputs(side, lpad, lpad - 7)
    got, want = run(fast, inputs, (1, 16, side // 8, side // 8)), run(eager, inputs, (1, 16, side // 8, side // 8))
    assert rel(got, want) <= FP32_BOUND
    assert ((1, 16, side // 8, side // 8), (1,), (1, lpad, 128), (1,)) in fast.compile_log.seconds


@pytest.mark.parametrize("side", [s for s, _ in SHAPES])
def test_compiled_vae_equals_eager(pairs, side):
    fast, eager = pairs["vae_decoder"]
    latents = {"latents": torch.randn(1, 16, side // 8, side // 8, generator=torch.Generator().manual_seed(side))}
    got, want = run(fast, latents, (1, 3, side, side)), run(eager, latents, (1, 3, side, side))
    assert rel(got, want) <= FP32_BOUND


def test_compiled_runtime_with_guidance_and_a_lora_equals_eager(pairs, tiny_model, fp32_bundle, tmp_path):
    """The whole loop on compiled sessions, guided (two passes a step), with a LoRA switched into the weights
    the compiled code reads: the same latents and image as the eager sessions."""
    from zimage_trt.cli import main
    from zimage_trt.export.checkpoint import load_transformer
    from zimage_trt.parity import psnr
    from zimage_trt.runtime.bundle import Bundle
    from zimage_trt.runtime.lora import load_lora
    from zimage_trt.runtime.pipeline import Guidance, ZImageRuntime

    from .lora_files import write_peft_lora

    write_peft_lora(load_transformer(tiny_model, torch.float32), tmp_path / "a.safetensors")
    assert main(["lora", "--bundle", str(fp32_bundle), "--lora", str(tmp_path / "a.safetensors"), "--out",
                 str(tmp_path / "a.zi.safetensors")]) == 0
    bundle = Bundle.open(fp32_bundle)
    lora = load_lora(tmp_path / "a.zi.safetensors", bundle)
    images, latents = [], []
    for which in (0, 1):
        rt = ZImageRuntime(bundle, {n: p[which] for n, p in pairs.items()}, CPU)
        rt.set_loras([(lora, 0.8)])
        images.append(rt.generate(PROMPT, 3, guidance=Guidance(2.0, "blurry")))
        latents.append(rt.latents.clone())
        rt.set_loras([])
        rt.close(sessions=False)
    assert rel(latents[0], latents[1]) <= FP32_BOUND
    assert psnr(images[0], images[1]) >= 40.0


def test_fp8_linear_equals_modelopt_fake_quantization(compile_cache):
    """quantize -> scaled matmul (torch._scaled_mm, emulated on the CPU) -> dequantize is ModelOpt's fake-quantized
    layer, with the amax ModelOpt calibrated; both paths (scaled_mm, and the dequantized one of unaligned sizes),
    and compiled (inductor) as eager."""
    from zimage_trt.export.quantize import QuantRecipe, quantize
    from zimage_trt.runtime.torch_fp8 import Fp8Linear

    from .quantized import linear_model

    for features in (64, 40):
        g = torch.Generator().manual_seed(features)
        model, x = linear_model(features), torch.randn(1, 40, features, generator=g) * 3
        assert quantize(model, QuantRecipe(), lambda m: m(x)) == 1
        layer = model.layers[0].feed_forward.w1
        with torch.no_grad():
            want = model(x * 0.9)
            plain = torch.nn.functional.linear(x * 0.9, layer.weight, layer.bias)
        fp8 = Fp8Linear(layer, layer.input_quantizer.amax, layer.weight_quantizer.amax, torch.float32)
        assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.aligned == (features % 16 == 0)
        for native in (True, False):
            fp8.native = native
            with torch.no_grad():
                got = fp8(x * 0.9)
            assert rel(got, want) <= 1e-6, (features, native)
        assert rel(plain, want) > 1e-3  # and the quantization is real
    fp8.native = None
    with torch.no_grad():
        eager = fp8(x)
        fp8.compile(fullgraph=True, dynamic=False)
        assert torch.equal(fp8(x), eager)


class SwiGLU(torch.nn.Module):
    """A block's feed-forward where the recipe looks for it: w1 and w3 read one input (the exporter shares their
    Q/DQ), w2 reads their product."""

    input_names, output_names = ("x",), ("y",)

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Module()])
        ff = self.layers[0].feed_forward = torch.nn.Module()
        ff.w1, ff.w3, ff.w2 = torch.nn.Linear(64, 96), torch.nn.Linear(64, 96), torch.nn.Linear(96, 64)

    def forward(self, x):
        ff = self.layers[0].feed_forward
        return ff.w2(torch.nn.functional.silu(ff.w1(x)) * ff.w3(x))


def test_graph_fp8_scales_read_back_per_layer_and_run_as_the_graph(tmp_path):
    """The exported Q/DQ graph gives each quantized layer its input and weight amax back (w1 and w3 share one input
    Q/DQ in the graph); Fp8Linears built from them compute what onnxruntime computes on that graph."""
    import onnxruntime as ort

    from zimage_trt.export.onnx_export import export_onnx
    from zimage_trt.export.quantize import QuantRecipe, quantize
    from zimage_trt.export.reference import graph_fp8_amax
    from zimage_trt.runtime.torch_fp8 import fp8_layers, swap_fp8_linears

    g = torch.Generator().manual_seed(0)
    model, x = SwiGLU(), torch.randn(1, 24, 64, generator=g) * 2
    assert quantize(model, QuantRecipe(), lambda m: m(x)) == 3
    path = export_onnx(model, (x,), tmp_path / "ffn.onnx", None)
    amax = graph_fp8_amax(path)
    ff = model.layers[0].feed_forward
    assert sorted(amax) == [f"layers.0.feed_forward.{w}" for w in ("w1", "w2", "w3")]
    for w in ("w1", "w2", "w3"):
        layer = getattr(ff, w)
        want = (layer.input_quantizer.amax.item(), layer.weight_quantizer.amax.item())
        assert amax[f"layers.0.feed_forward.{w}"] == pytest.approx(want, rel=1e-6)
    graph_out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    twin = SwiGLU()
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if "quantizer" not in k})
    assert swap_fp8_linears(twin, amax, torch.float32) == 3 and len(fp8_layers(twin)) == 3
    with torch.no_grad():
        got = twin(x)
    assert rel(got, torch.from_numpy(graph_out)) <= 1e-5


def test_fp8_and_compile_refusals_are_one_line(capsys, fp32_bundle, tiny_model, tmp_path):
    from zimage_trt.runtime.torch_fp8 import swap_fp8_linears

    code, err = run_cli(capsys, "generate", "--bundle", str(fp32_bundle), "--backend", "onnxruntime", "--compile",
                        "--prompt", "x", "--out", str(tmp_path / "x.png"))
    assert_one_line_error(code, err, "--compile is for --backend torch")
    with pytest.raises(UserError, match="not a Linear of this model"):
        swap_fp8_linears(SwiGLU(), {"layers.0.feed_forward.w9": (1.0, 1.0)})


def test_a_second_compile_reads_the_cache(pairs, compile_cache):
    """What a second process does: dynamo's in-memory state gone, the same network compiled again finds every
    graph in the cache folder (no inductor compilation). Last in this file: it resets dynamo."""
    from zimage_trt.runtime.torch_compile import cache_counters, cache_dir

    assert cache_dir() == compile_cache and any(compile_cache.iterdir())
    torch._dynamo.reset()
    before = cache_counters()
    fast, eager = pairs["text_encoder"]
    fast.compile_log.seconds.clear()
    ids = {"input_ids": torch.randint(0, 100, (1, 25), generator=torch.Generator().manual_seed(1))}
    assert rel(run(fast, ids, (1, 25, 128)), run(eager, ids, (1, 25, 128))) <= FP32_BOUND
    after = cache_counters()
    assert after["fxgraph_cache_hit"] > before["fxgraph_cache_hit"]
    assert after["fxgraph_cache_miss"] == before["fxgraph_cache_miss"]


# ---------------------------------------------------------------------------------------------- on a GPU
@gpu
@pytest.mark.gpu
def test_scaled_mm_on_fp8_tensor_cores_equals_the_cpu_emulation():
    from zimage_trt.runtime.torch_fp8 import MIN_CAPABILITY, Fp8Linear

    if torch.cuda.get_device_capability() < MIN_CAPABILITY:
        pytest.skip("no FP8 tensor cores on this GPU")
    g = torch.Generator().manual_seed(0)
    linear, x = torch.nn.Linear(3840, 1024), torch.randn(512, 3840, generator=g) * 2
    amax_x, amax_w = x.abs().max(), linear.weight.abs().max()
    cpu = Fp8Linear(linear, amax_x, amax_w, torch.float32)
    cuda = Fp8Linear(linear.cuda(), amax_x, amax_w, torch.float32)
    assert cuda.aligned and torch.equal(cuda.weight.cpu().view(torch.uint8), cpu.weight.view(torch.uint8))
    with torch.no_grad():
        assert rel(cuda(x.cuda()).cpu(), cpu(x)) <= 1e-5


@gpu
@pytest.mark.gpu
def test_graph_replays_equal_eager_and_attention_is_fused(tiny_model):
    """The text encoder and VAE replayed from their CUDA graphs give the eager run's bits; each network says which
    fused attention kernel it runs."""
    from zimage_trt.export.reference import reference_modules
    from zimage_trt.runtime.torch_session import TorchSession

    cuda = torch.device("cuda")
    mods = reference_modules(tiny_model, torch.bfloat16, cuda, fast=True)
    pool = torch.cuda.graph_pool_handle()
    cases = {"text_encoder": ({"input_ids": torch.randint(0, 100, (1, 25), device=cuda)}, (1, 25, 128)),
             "vae_decoder": ({"latents": torch.randn(1, 16, 16, 16, device=cuda)}, (1, 3, 128, 128))}
    for name, (inputs, shape) in cases.items():
        session = TorchSession(name, mods[name], cuda, "bf16")
        session.use_graph_pool(pool)
        outs = [torch.zeros(shape, device=cuda) for _ in range(3)]
        for out in outs:
            session.run(inputs, {session.output_names[0]: out})
        args = [inputs[n] for n in session.input_names]
        if session.bucketed:
            args[0] = torch.nn.functional.pad(args[0], (0, -args[0].shape[1] % 32))
        eager = session._forward(*args)[:, : shape[1]] if session.bucketed else session._forward(*args)
        assert len(session.graphs.graphs) == 1 and session.graphs.pool == pool
        for out in outs:
            assert torch.equal(out, eager.float()), name
        assert set(session.attention.ran.split("+")) <= {"cuDNN", "flash", "efficient"}, name
        session.close()


@gpu
@pytest.mark.gpu
def test_compiled_loop_in_a_cuda_graph_equals_the_eager_loop(tiny_model, fp32_bundle):
    from zimage_trt.runtime.bundle import Bundle
    from zimage_trt.runtime.pipeline import ZImageRuntime
    from zimage_trt.sessions import open_sessions

    bundle, cuda = Bundle.open(fp32_bundle), torch.device("cuda")
    sessions = open_sessions("torch", bundle, cuda, model_dir=tiny_model, torch_dtype="bf16", compile=True)
    images = []
    for graphs in (True, False):
        rt = ZImageRuntime(bundle, sessions, cuda, cuda_graph=graphs)
        images.append(rt.generate(PROMPT, 5))
        assert rt.use_cuda_graph == graphs
        rt.close(sessions=False)
    assert np.array_equal(images[0], images[1])
