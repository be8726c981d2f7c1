"""The lean runtime's image against diffusers' ZImagePipeline (9 steps, guidance 0), on each backend."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from zimage_trt.parity import IMAGE_BOUND_DB, psnr
from zimage_trt.runtime.bundle import Bundle
from zimage_trt.runtime.pipeline import ZImageRuntime
from zimage_trt.sessions import open_sessions

from .conftest import PROMPT, SIZE

CPU = torch.device("cpu")


def diffusers_image(pipe, prompt, seed, steps=9):
    image = pipe(
        prompt, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
    ).images[0]
    return (image * 255).round().astype(np.uint8)


def test_initial_latents_equal_diffusers(fp32_bundle, reference_pipeline):
    bundle = Bundle.open(fp32_bundle)
    rt = ZImageRuntime(bundle, open_sessions("onnxruntime", bundle, CPU), CPU)
    rt.init_latents(1234)
    want = reference_pipeline.prepare_latents(
        1, 16, SIZE, SIZE, torch.float32, "cpu", torch.Generator("cpu").manual_seed(1234)
    )
    assert torch.equal(rt.latents, want)


@pytest.mark.parametrize("seed", [0, 7])
def test_onnxruntime_fp32_image_matches_diffusers(fp32_bundle, reference_pipeline, seed):
    bundle = Bundle.open(fp32_bundle)
    rt = ZImageRuntime(bundle, open_sessions("onnxruntime", bundle, CPU), CPU)
    ours = rt.generate(PROMPT, seed)
    theirs = diffusers_image(reference_pipeline, PROMPT, seed)
    assert ours.shape == (SIZE, SIZE, 3) and ours.dtype == np.uint8
    assert psnr(ours, theirs) >= IMAGE_BOUND_DB["fp32"]
    assert ours.std() > 5  # a real image, not a constant


def test_torch_backend_image_matches_diffusers(tiny_model, fp32_bundle, reference_pipeline):
    bundle = Bundle.open(fp32_bundle)
    rt = ZImageRuntime(bundle, open_sessions("torch", bundle, CPU, model_dir=tiny_model), CPU)
    assert psnr(rt.generate(PROMPT, 3), diffusers_image(reference_pipeline, PROMPT, 3)) >= IMAGE_BOUND_DB["fp32"]


def test_fp16_bundle_image_within_its_bound(fp16_bundle, reference_pipeline):
    bundle = Bundle.open(fp16_bundle)
    rt = ZImageRuntime(bundle, open_sessions("onnxruntime", bundle, CPU), CPU)
    assert psnr(rt.generate(PROMPT, 0), diffusers_image(reference_pipeline, PROMPT, 0)) >= IMAGE_BOUND_DB["fp16"]


def test_different_prompts_and_seeds_give_different_images(fp32_bundle):
    bundle = Bundle.open(fp32_bundle)
    rt = ZImageRuntime(bundle, open_sessions("onnxruntime", bundle, CPU), CPU)
    a, b, c = rt.generate(PROMPT, 0), rt.generate(PROMPT, 1), rt.generate("a bowl of ramen, top-down", 0)
    assert psnr(a, b) < 30 and psnr(a, c) < 40
    assert np.array_equal(a, rt.generate(PROMPT, 0))  # and the same ones give the same image


def test_buffers_are_allocated_once(fp32_bundle):
    bundle = Bundle.open(fp32_bundle)
    rt = ZImageRuntime(bundle, open_sessions("onnxruntime", bundle, CPU), CPU)
    names = ("ids", "caption", "cap_len", "latents", "velocity", "timestep", "image")
    before = {n: getattr(rt, n).data_ptr() for n in names}
    rt.generate(PROMPT, 0)
    rt.generate("short", 1)
    assert {n: getattr(rt, n).data_ptr() for n in names} == before


def test_runtime_imports_neither_diffusers_nor_export_code():
    root = Path(__file__).resolve().parents[1] / "runtime"
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith(("diffusers", "transformers", "zimage_trt.export")), (path.name, name)


def test_close_frees_sessions_graphs_and_buffers(fp32_bundle):
    bundle = Bundle.open(fp32_bundle)
    sessions = open_sessions("onnxruntime", bundle, CPU)
    rt = ZImageRuntime(bundle, sessions, CPU)
    rt.generate(PROMPT, 0)
    rt.close(sessions=False)  # the caller keeps its sessions: they still run
    assert rt.latents is None and rt._latents_store is None and not rt.recorder.graphs
    again = ZImageRuntime(bundle, sessions, CPU)
    assert again.generate(PROMPT, 0).shape == (SIZE, SIZE, 3)
    again.close()
    assert all(s.session is None for s in sessions.values())
