"""Classifier-free guidance on the batch-1 engines: two passes per guided step, combined as diffusers' ZImagePipeline
combines them (cfg_normalization, cfg_truncation included), against diffusers itself on the tiny model."""

from __future__ import annotations

import pytest
import torch

from zimage_trt.common.errors import UserError
from zimage_trt.parity import IMAGE_BOUND_DB, psnr, reference_images
from zimage_trt.runtime.bundle import Bundle
from zimage_trt.runtime.pipeline import Guidance, ZImageRuntime
from zimage_trt.sessions import open_sessions

from .conftest import PROMPT, SIZE

CPU = torch.device("cpu")
CASES = [
    Guidance(1.5),
    Guidance(1.5, "blurry, low quality"),
    Guidance(4.0),
    Guidance(4.0, "blurry, low quality"),
    Guidance(4.0, "", normalization=1.0, truncation=0.6),  # diffusers' two refinements, both in effect
]


class CountingSession:
    """A real session that counts its runs."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.name, self.device, self.precision = inner.name, inner.device, inner.precision

    def run(self, inputs, outputs):
        self.calls += 1
        self.inner.run(inputs, outputs)


@pytest.fixture(scope="module")
def diffusers_guided(tiny_model):
    """diffusers' image for each case, from one pipeline per case (seed 42)."""
    return [reference_images(tiny_model, PROMPT, 42, [(SIZE, SIZE)], 9, "cpu", g)[(SIZE, SIZE)] for g in CASES]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_guided_images_match_diffusers(tiny_model, fp32_bundle, diffusers_guided, backend):
    bundle = Bundle.open(fp32_bundle)
    rt = ZImageRuntime(bundle, open_sessions(backend, bundle, CPU, model_dir=tiny_model), CPU)
    plain = rt.generate(PROMPT, 42)
    for guidance, theirs in zip(CASES, diffusers_guided):
        ours = rt.generate(PROMPT, 42, guidance=guidance)
        assert psnr(ours, theirs) >= IMAGE_BOUND_DB["fp32"], guidance
        assert psnr(ours, plain) < 40, guidance  # guidance changed the image: the comparison means something


def test_guidance_runs_two_passes_on_guided_steps_and_one_otherwise(fp32_bundle):
    bundle = Bundle.open(fp32_bundle)
    sessions = open_sessions("onnxruntime", bundle, CPU)
    sessions["transformer"] = counter = CountingSession(sessions["transformer"])
    rt = ZImageRuntime(bundle, sessions, CPU)
    steps = rt.schedule.passes
    for guidance, passes in [(None, steps), (Guidance(0.0, "ignored"), steps), (Guidance(4.0), 2 * steps),
                             (Guidance(4.0, truncation=0.6), steps + sum(t <= 0.6 for t in rt.schedule.model_t)),
                             (Guidance(4.0, truncation=-1.0), steps)]:
        counter.calls = 0
        rt.generate(PROMPT, 0, guidance=guidance)
        assert counter.calls == passes, guidance
    assert 0 < sum(t <= 0.6 for t in rt.schedule.model_t) < steps  # the truncation case is a real mix


def test_guidance_arguments_are_checked():
    with pytest.raises(UserError, match="finite"):
        Guidance(float("nan"))
    with pytest.raises(UserError, match="finite"):
        Guidance(4.0, "", normalization=float("inf"))


def test_cli_generate_with_guidance(capsys, fp32_bundle, tmp_path):
    from zimage_trt.cli import main

    from .test_user_errors import assert_one_line_error, run_cli

    out = tmp_path / "g.png"
    assert main(["generate", "--bundle", str(fp32_bundle), "--prompt", PROMPT, "--device", "cpu", "--out", str(out),
                 "--guidance-scale", "4", "--negative-prompt", "blurry"]) == 0
    assert "18 transformer passes" in capsys.readouterr().out and out.stat().st_size > 0
    assert_one_line_error(*run_cli(capsys, "generate", "--bundle", str(fp32_bundle), "--prompt", "a", "--device", "cpu",
                                   "--out", str(out), "--negative-prompt", "x"), "needs --guidance-scale above 0")
    assert_one_line_error(*run_cli(capsys, "generate", "--bundle", str(fp32_bundle), "--prompt", "a", "--device", "cpu",
                                   "--out", str(out), "--guidance-scale", "-2"), "0 (off, the default) or positive")
