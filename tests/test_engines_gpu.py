"""What only a GPU can show: engines run and match eager PyTorch, and the CUDA-graph loop equals the eager loop.

These run wherever PyTorch sees a CUDA GPU (the torch-backend tests) and TensorRT or TensorRT-RTX supports it
(the engine tests); elsewhere they skip with the reason."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from zimage_trt.runtime.bundle import Bundle
from zimage_trt.runtime.pipeline import ZImageRuntime
from zimage_trt.sessions import open_sessions

from .conftest import PROMPT

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; PyTorch sees none here"),
]


def engine_backend() -> tuple[str | None, str]:
    """The engine library that can run on this GPU, or None and why not."""
    if not torch.cuda.is_available():
        return None, "needs a CUDA GPU"
    from zimage_trt.engine.trt_api import RTX_UNSUPPORTED_CC, gpu_info

    gpu = gpu_info()
    if importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt", ""
    if importlib.util.find_spec("tensorrt_rtx") is not None and gpu["cc"] not in RTX_UNSUPPORTED_CC:
        return "tensorrt-rtx", ""
    return None, f"neither TensorRT nor a TensorRT-RTX that supports {gpu['name']} is installed"


BACKEND, WHY = engine_backend()
needs_engines = pytest.mark.skipif(BACKEND is None, reason=WHY)


@pytest.fixture(scope="module")
def engines(fp16_bundle, tmp_path_factory):
    from zimage_trt.engine.build import BuildOptions, build_engines

    out = tmp_path_factory.mktemp("gpu-engines") / BACKEND
    build_engines(fp16_bundle, out, BuildOptions(backend=BACKEND))
    return out


@pytest.mark.tensorrt
@needs_engines
def test_engines_match_eager_pytorch_and_diffusers(tiny_model, fp16_bundle, engines):
    from zimage_trt.parity import run_parity

    bundle = Bundle.open(fp16_bundle)
    dev = torch.device("cuda")
    rows = run_parity(tiny_model, bundle, open_sessions("tensorrt", bundle, dev, engines=engines), BACKEND, PROMPT, 0, dev)
    assert all(r.ok for r in rows), [r.cells() for r in rows]


def assert_graph_replays_the_eager_loop(bundle, sessions, prompts) -> None:
    """The same generations with the loop recorded in CUDA graphs and run eagerly: equal latents, bit for bit."""
    dev = torch.device("cuda")
    graph = ZImageRuntime(bundle, sessions, dev, cuda_graph=True)
    eager = ZImageRuntime(bundle, sessions, dev, cuda_graph=False)
    for seed, prompt in enumerate(prompts):
        graph.generate(prompt, seed)
        eager.generate(prompt, seed)
        assert torch.equal(graph.latents, eager.latents)
    lengths = {bundle.padded_caption_length(len(graph.tokenize(p))) for p in prompts}
    assert graph.use_cuda_graph and len(graph._graphs) == len(lengths)


@pytest.mark.tensorrt
@needs_engines
def test_engine_loop_in_a_cuda_graph_equals_the_eager_loop(fp16_bundle, engines):
    bundle = Bundle.open(fp16_bundle)
    sessions = open_sessions("tensorrt", bundle, torch.device("cuda"), engines=engines)
    assert_graph_replays_the_eager_loop(bundle, sessions, [PROMPT, "short", PROMPT * 6])  # three caption lengths


def test_torch_loop_in_a_cuda_graph_equals_the_eager_loop(tiny_model, fp32_bundle):
    bundle = Bundle.open(fp32_bundle)
    sessions = open_sessions("torch", bundle, torch.device("cuda"), model_dir=tiny_model)
    assert_graph_replays_the_eager_loop(bundle, sessions, [PROMPT, PROMPT])
