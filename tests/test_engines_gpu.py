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
    assert graph.use_cuda_graph and len(graph.recorder.graphs) == len(lengths)


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


def test_the_guided_loop_in_a_cuda_graph_equals_the_eager_loop(tiny_model, fp32_bundle):
    """Guidance's doubled loop (two passes per guided step, the combination, the renormalisation) is recorded like
    the single one; one recording serves every scale, since the scale is a device scalar."""
    from zimage_trt.runtime.pipeline import Guidance

    bundle = Bundle.open(fp32_bundle)
    dev = torch.device("cuda")
    sessions = open_sessions("torch", bundle, dev, model_dir=tiny_model)
    graph = ZImageRuntime(bundle, sessions, dev, cuda_graph=True)
    eager = ZImageRuntime(bundle, sessions, dev, cuda_graph=False)
    for scale in (1.5, 4.0):
        for g in (Guidance(scale, "blurry"), Guidance(scale, "", normalization=1.0, truncation=0.6)):
            graph.generate(PROMPT, 3, guidance=g)
            eager.generate(PROMPT, 3, guidance=g)
            assert torch.equal(graph.latents, eager.latents), g
    assert graph.use_cuda_graph and len(graph.recorder.graphs) == 2  # two layouts, each recorded once for both scales


# ---------------------------------------------------------------- sizes and caption lengths in recorded graphs
def _prompt_of_tokens(rt, n_tokens_min: int) -> str:
    """A prompt whose chat-formatted ids pad to a caption length of at least n_tokens_min."""
    words = "fox"
    while len(rt.tokenize(words)) < n_tokens_min:
        words += " fox"
    return words


def assert_replay_after_other_shapes_equals_eager(bundle, sessions) -> None:
    """Capture A (32 caption tokens), capture B (64), replay A: A's image, bit for bit, as the eager loop gives it;
    then the same across image sizes. One engine context per recorded shape makes this hold for TensorRT."""
    dev = torch.device("cuda")
    graph = ZImageRuntime(bundle, sessions, dev, cuda_graph=True)
    eager = ZImageRuntime(bundle, sessions, dev, cuda_graph=False)
    a = _prompt_of_tokens(graph, 20)
    b = _prompt_of_tokens(graph, 40)
    assert bundle.padded_caption_length(len(graph.tokenize(a))) == 32
    assert bundle.padded_caption_length(len(graph.tokenize(b))) == 64
    want = {}
    sizes = [bundle.sizes.opt, (bundle.sizes.min_width, bundle.sizes.max_height)]
    for size in sizes:
        for prompt in (a, b):
            eager.generate(prompt, 7, size=size)
            want[(size, prompt)] = eager.latents.clone()
    for size in sizes:
        for prompt in (a, b, a):  # A is replayed after B was captured
            graph.generate(prompt, 7, size=size)
            assert torch.equal(graph.latents, want[(size, prompt)]), (size, prompt)
    graph.generate(a, 7, size=sizes[0])  # the first size again, after the second size's graphs
    assert torch.equal(graph.latents, want[(sizes[0], a)])
    assert set(graph.recorder.graphs) == {(s, lp, 9, None) for s in sizes for lp in (32, 64)}  # None: no guidance


def test_torch_graph_replay_after_other_shapes_equals_eager(tiny_model, fp32_range_bundle):
    bundle = Bundle.open(fp32_range_bundle)
    assert_replay_after_other_shapes_equals_eager(
        bundle, open_sessions("torch", bundle, torch.device("cuda"), model_dir=tiny_model))


@pytest.mark.tensorrt
@needs_engines
def test_engine_graph_replay_after_other_shapes_equals_eager(fp16_bundle, engines):
    bundle = Bundle.open(fp16_bundle)
    assert_replay_after_other_shapes_equals_eager(
        bundle, open_sessions("tensorrt", bundle, torch.device("cuda"), engines=engines))


def test_graph_cache_is_a_bounded_lru_whose_memory_does_not_grow(tiny_model, fp32_range_bundle):
    bundle = Bundle.open(fp32_range_bundle)
    dev = torch.device("cuda")
    rt = ZImageRuntime(bundle, open_sessions("torch", bundle, dev, model_dir=tiny_model), dev, max_cuda_graphs=2)
    largest = bundle.sizes.largest
    rt.generate(PROMPT, 0, size=largest)
    torch.cuda.synchronize()
    after_one = torch.cuda.memory_reserved(dev)
    sizes = [(64, 64), (96, 128), (128, 96), (144, 80), largest]
    for size in sizes:
        rt.generate(PROMPT, 0, size=size)
    assert len(rt.recorder.graphs) == 2 and rt.graphs_evicted == len(sizes) - 1
    assert [k[0] for k in rt.recorder.graphs] == [sizes[-2], sizes[-1]]  # the two most recent, oldest first
    torch.cuda.synchronize()
    # Every loop records into one shared pool, so six captures cost what the largest one costs.
    assert torch.cuda.memory_reserved(dev) <= after_one * 1.1 + 2**21


# ---------------------------------------------------------------- the runtime's stream and a capture that fails
class _Recording:
    """A real session, run as it is, that notes the stream each run is enqueued on and can read a value back to
    the host first (which no CUDA graph can record: the capture then fails, as a refused capture would)."""

    def __init__(self, inner, host_sync: bool = False):
        self.inner, self.host_sync, self.streams = inner, host_sync, []
        self.name, self.device, self.precision, self.capturable = inner.name, inner.device, inner.precision, True

    def close(self):
        self.inner.close()

    def run(self, inputs, outputs):
        self.streams.append(torch.cuda.current_stream(self.device))
        if self.host_sync:
            float(inputs["timestep"][0])
        self.inner.run(inputs, outputs)


def test_the_runtime_runs_everything_on_its_own_stream(tiny_model, fp32_range_bundle):
    bundle = Bundle.open(fp32_range_bundle)
    dev = torch.device("cuda")
    sessions = {n: _Recording(s) for n, s in open_sessions("torch", bundle, dev, model_dir=tiny_model).items()}
    rt = ZImageRuntime(bundle, sessions, dev, cuda_graph=False)
    rt.generate(PROMPT, 0)
    assert rt.stream != torch.cuda.default_stream(dev)
    for s in sessions.values():
        assert s.streams and all(st == rt.stream for st in s.streams), s.name
    rt.close()
    assert rt.latents is None and rt.sessions["transformer"].inner.module is None


def test_a_failed_capture_falls_back_to_the_eager_loop_once(tiny_model, fp32_range_bundle, caplog):
    bundle = Bundle.open(fp32_range_bundle)
    dev = torch.device("cuda")
    plain = open_sessions("torch", bundle, dev, model_dir=tiny_model)
    eager = ZImageRuntime(bundle, plain, dev, cuda_graph=False)
    syncing = dict(plain, transformer=_Recording(plain["transformer"], host_sync=True))
    rt = ZImageRuntime(bundle, syncing, dev, cuda_graph=True)
    with caplog.at_level("WARNING", logger="zimage_trt"):
        for seed in (1, 2):  # the first request meets the failure, the second runs eagerly without a new one
            image = rt.generate(PROMPT, seed)
            assert (image == eager.generate(PROMPT, seed)).all() and torch.equal(rt.latents, eager.latents)
    assert rt.cuda_graph_failures == 1 and not rt.use_cuda_graph and not rt.recorder.graphs
    warnings = [r for r in caplog.records if "CUDA graph capture failed" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.tensorrt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="the timing cache is TensorRT's (datacenter), which cannot be installed here")
def test_a_foreign_timing_cache_is_discarded_and_the_build_goes_on(fp32_bundle, tmp_path, capsys):
    from zimage_trt.engine.build import BuildOptions, build_engines

    out = tmp_path / "engines"
    out.mkdir()
    (out / "timing.cache").write_bytes(b"written by another GPU and TensorRT version")
    (r,) = build_engines(fp32_bundle, out, BuildOptions(backend="tensorrt", networks=("vae_decoder",)))
    assert r.status == "built"
    assert "is from another GPU or TensorRT version; discarded" in capsys.readouterr().err
    assert (out / "timing.cache").read_bytes() != b"written by another GPU and TensorRT version"


# ---------------------------------------------------------------- LoRA on a GPU
def test_a_lora_switch_keeps_recorded_loops_valid_and_the_base_comes_back(tiny_model, fp32_bundle, tmp_path):
    """torch backend: set_loras writes into the same parameter storage, so recorded loops stay valid; each replay
    equals the eager loop with the same weights, and dropping the LoRA gives the base latents back bit for bit."""
    from zimage_trt.export.checkpoint import load_transformer
    from zimage_trt.export.lora import convert_lora
    from zimage_trt.runtime.lora import load_lora

    from .lora_files import write_peft_lora

    write_peft_lora(load_transformer(tiny_model, torch.float32), tmp_path / "a.safetensors")
    bundle = Bundle.open(fp32_bundle)
    convert_lora(bundle, tmp_path / "a.safetensors", tmp_path / "a-b.safetensors")
    lora = load_lora(tmp_path / "a-b.safetensors", bundle)
    dev = torch.device("cuda")
    graph = ZImageRuntime(bundle, open_sessions("torch", bundle, dev, model_dir=tiny_model), dev, cuda_graph=True)
    eager = ZImageRuntime(bundle, open_sessions("torch", bundle, dev, model_dir=tiny_model), dev, cuda_graph=False)
    graph.generate(PROMPT, 1)
    base = graph.latents.clone()
    for stack in ([(lora, 1.0)], [(lora, -0.5)], []):
        graph.set_loras(stack)
        eager.set_loras(stack)
        graph.generate(PROMPT, 1)
        eager.generate(PROMPT, 1)
        assert torch.equal(graph.latents, eager.latents), stack
    assert torch.equal(graph.latents, base) and len(graph.recorder.graphs) == 1  # one recording served all three


def _rtx_runs_here() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    if importlib.util.find_spec("tensorrt_rtx") is None:
        return False, "tensorrt-rtx is not installed"
    from zimage_trt.engine.trt_api import RTX_UNSUPPORTED_CC, gpu_info

    gpu = gpu_info()
    if gpu["cc"] in RTX_UNSUPPORTED_CC:
        return False, (f"TensorRT-RTX does not support {gpu['name']}; a refittable RTX engine is built on a GPU of its "
                       "target architecture (on an H200 a refittable build for sm89 fails: "
                       "benchmarks/h200-lora-2026-11-30/)")
    return True, ""


@pytest.mark.skipif(not _rtx_runs_here()[0], reason=_rtx_runs_here()[1])
def test_a_refittable_rtx_engine_builds_on_an_rtx_gpu(fp16_bundle, tmp_path):
    """On an RTX GPU, `build --refittable` for that GPU marks the transformer's mapped weights refittable."""
    from zimage_trt.engine.build import BuildOptions, build_engines

    (r,) = build_engines(fp16_bundle, tmp_path / "e", BuildOptions(
        backend="tensorrt-rtx", refittable=True, networks=("transformer",)))
    n_weights = len(Bundle.open(fp16_bundle).network("transformer")["weights"])
    assert r.status == "built" and r.meta["build"]["flags"]["refittable_weights"] == n_weights
    assert r.meta["request"]["refittable"] is True


# ---------------------------------------------------------------- memory modes on a GPU
def test_sequential_vram_gives_the_same_image_with_a_lower_peak(tiny_model, fp32_bundle):
    """--vram sequential, torch backend: the text encoder and the transformer + VAE take turns on the GPU; the
    image is the one of mode "all", and the allocator's peak is lower by about the smaller group's weights."""
    from zimage_trt.runtime.memory import vram_plan

    bundle = Bundle.open(fp32_bundle)
    dev = torch.device("cuda")
    images, peaks, plans = {}, {}, {}
    for mode in ("all", "sequential"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        rt = ZImageRuntime(bundle, open_sessions("torch", bundle, dev, model_dir=tiny_model), dev, vram=mode)
        images[mode] = rt.generate(PROMPT, 2)
        peaks[mode] = torch.cuda.max_memory_allocated(dev) - base
        plans[mode] = vram_plan(rt)
        rt.close()
        del rt
    assert (images["all"] == images["sequential"]).all()
    te = plans["all"]["weights"]["text_encoder"]
    assert peaks["sequential"] < peaks["all"] - 0.5 * te, (peaks, te)
