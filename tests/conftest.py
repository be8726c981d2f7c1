"""Shared fixtures: one tiny model, and its bundles, made once per test session (export takes ~30 s each)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

SIZE = 128  # test resolution: 8x8 image tokens, fast on two cores
# The dynamic bundles' range: 64..160 pixels a side (4..10 image tokens), opt 128x128. Sizes the tests use in it:
# the range's corners, both orientations of a non-square size, and sizes whose token count needs image padding.
SIZE_RANGE = "64:160"
RANGE_SIZES = [(64, 64), (160, 160), (128, 96), (96, 128), (144, 80)]
PROMPT = "A photograph of a red fox sitting in fresh snow at sunrise"
ALL_FP32 = {"text_encoder": "fp32", "transformer": "fp32", "vae_decoder": "fp32"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from zimage_trt.export.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("model") / "tiny", seed=0)


@pytest.fixture(scope="session")
def fp32_bundle(tiny_model, tmp_path_factory):
    from zimage_trt.export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "fp32"
    export_bundle(tiny_model, out, ExportOptions(height=SIZE, width=SIZE, precision=dict(ALL_FP32)))
    return out


@pytest.fixture(scope="session")
def fp32_range_bundle(tiny_model, tmp_path_factory):
    """Every size in SIZE_RANGE from one bundle (dynamic latent height and width), fp32."""
    from zimage_trt.export.bundle import ExportOptions, export_bundle
    from zimage_trt.runtime.sizes import SizeRange

    out = tmp_path_factory.mktemp("bundles") / "fp32-range"
    rng = SizeRange.square_range(SIZE_RANGE, (SIZE, SIZE))
    export_bundle(tiny_model, out, ExportOptions(size_range=rng, precision=dict(ALL_FP32)))
    return out


@pytest.fixture(scope="session")
def fp16_bundle(tiny_model, tmp_path_factory):
    """The card's defaults for the DiT and text encoder (fp16, calibrated), over SIZE_RANGE; fp32 VAE so the CPU
    can run it."""
    from zimage_trt.export.bundle import ExportOptions, export_bundle
    from zimage_trt.runtime.sizes import SizeRange

    out = tmp_path_factory.mktemp("bundles") / "fp16"
    prec = {"text_encoder": "fp16", "transformer": "fp16", "vae_decoder": "fp32"}
    rng = SizeRange.square_range(SIZE_RANGE, (SIZE, SIZE))
    opts = ExportOptions(size_range=rng, precision=prec, calibration_prompts=[PROMPT, "a bowl of ramen"])
    export_bundle(tiny_model, out, opts)
    return out


@pytest.fixture(scope="session")
def reference_pipeline(tiny_model):
    from zimage_trt.export.checkpoint import load_pipeline

    pipe = load_pipeline(tiny_model, torch.float32, "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe
