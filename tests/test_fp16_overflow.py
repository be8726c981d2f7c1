"""FP16 that does not overflow: a model whose FP32 activations pass 65504 at the attention output projection
and at the SwiGLU product breaks a naive FP16 export; the calibrated rescale keeps it finite and equal to FP32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zimage_trt.export import checkpoint
from zimage_trt.export.calibrate import measure_peaks
from zimage_trt.export.fp16 import FP16_TARGET_PEAK, choose_scales, fold_rescale
from zimage_trt.export.modules import DiTForExport
from zimage_trt.export.onnx_export import TOLERANCE, check_onnx, export_onnx

from .conftest import PROMPT

FP16_MAX = 65504.0
LAT = 8  # 64x64 pixels: 4x4 image tokens (padded to 32)


def heat(transformer):
    """Scale weights so FP32 activations leave FP16's range where real Z-Image peaks (~63k) would.

    The post-norm RMSNorms absorb the scale, so the FP32 model computes nearly the same function."""
    with torch.no_grad():
        transformer.layers[0].attention.to_out[0].weight.mul_(2.0e5)
        transformer.layers[1].feed_forward.w1.weight.mul_(300.0)
        transformer.layers[1].feed_forward.w3.weight.mul_(300.0)
    return transformer


@pytest.fixture(scope="module")
def hot(tiny_model):
    from diffusers import ZImagePipeline

    pipe = checkpoint.load_pipeline(tiny_model, torch.float32)
    heat(pipe.transformer)
    assert isinstance(pipe, ZImagePipeline)
    return pipe


@pytest.fixture(scope="module")
def dit_inputs(hot):
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(1, 16, LAT, LAT, generator=g),
        torch.tensor([0.2]),
        torch.randn(1, 32, hot.transformer.config.cap_feat_dim, generator=g),
        torch.tensor([20]),
    )


def test_fp32_reference_exceeds_fp16_range(hot):
    peaks = measure_peaks(hot, [PROMPT], LAT * 8, LAT * 8, steps=2)
    assert peaks["layers.0"]["attn_out"] > FP16_MAX
    assert peaks["layers.1"]["ffn_product"] > FP16_MAX
    scales = choose_scales(peaks)
    assert scales["layers.0"]["attn"] > 1 and scales["layers.1"]["ffn"] > 1
    assert scales["layers.0"]["ffn"] == 1  # untouched blocks stay exact
    for block, p in peaks.items():
        assert p["attn_out"] / scales[block]["attn"] <= FP16_TARGET_PEAK
        assert max(p["ffn_product"], p["ffn_out"]) / scales[block]["ffn"] <= FP16_TARGET_PEAK


def test_rescale_is_exact_in_fp32(hot, dit_inputs):
    import copy

    peaks = measure_peaks(hot, [PROMPT], LAT * 8, LAT * 8, steps=2)
    folded = fold_rescale_copy = copy.deepcopy(hot.transformer)
    fold_rescale(fold_rescale_copy, choose_scales(peaks))
    with torch.no_grad():
        want = DiTForExport(hot.transformer)(*dit_inputs)
        got = DiTForExport(folded)(*dit_inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_naive_fp16_overflows_and_rescaled_fp16_does_not(hot, dit_inputs, tmp_path):
    import copy

    reference = DiTForExport(hot.transformer)  # float32

    naive = DiTForExport(hot.transformer, torch.float16)
    export_onnx(naive, dit_inputs, tmp_path / "naive.onnx", None)
    result = check_onnx("naive", tmp_path / "naive.onnx", reference, dit_inputs, "fp16")
    assert not np.isfinite(result.rel)  # inf/NaN reach the output

    folded = copy.deepcopy(hot.transformer)
    fold_rescale(folded, choose_scales(measure_peaks(hot, [PROMPT], LAT * 8, LAT * 8, steps=2)))
    ours = DiTForExport(folded, torch.float16)
    export_onnx(ours, dit_inputs, tmp_path / "ours.onnx", None)
    result = check_onnx("rescaled", tmp_path / "ours.onnx", reference, dit_inputs, "fp16")
    assert np.isfinite(result.rel)
    assert result.rel <= TOLERANCE["fp16"], result.line()


def test_calibration_one_network_at_a_time_equals_the_whole_pipeline(tiny_model, reference_pipeline):
    """The lean calibration (text encoder alone, freed, then the transformer alone) measures the very peaks the
    whole pipeline measures."""
    from zimage_trt.export.calibrate import calibrate, measure_peaks

    prompts = ["A photograph of a red fox sitting in fresh snow at sunrise", "a bowl of ramen"]
    whole = measure_peaks(reference_pipeline, prompts, 128, 128, 9)
    assert calibrate(tiny_model, prompts, 128, 128, 9, torch.float32, "cpu") == whole
