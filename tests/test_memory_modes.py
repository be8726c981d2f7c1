"""Memory modes: --vram sequential keeps the text encoder and the image networks off the GPU in turn and gives
the same image; engines built with --weight-streaming; the predicted-VRAM line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zimage_trt.runtime.bundle import Bundle
from zimage_trt.runtime.memory import describe
from zimage_trt.runtime.pipeline import Guidance, ZImageRuntime
from zimage_trt.sessions import open_sessions

from .conftest import PROMPT

CPU = torch.device("cpu")


class Residency:
    """A real session that logs when the runtime moves it on and off the GPU, and when it runs."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log
        self.name, self.device, self.precision = inner.name, inner.device, inner.precision
        self.resident = True

    def release(self):
        self.resident = False
        self.log.append(("release", self.name))

    def acquire(self):
        self.resident = True
        self.log.append(("acquire", self.name))

    def run(self, inputs, outputs):
        assert self.resident, f"{self.name} ran while off the GPU"
        self.log.append(("run", self.name))
        self.inner.run(inputs, outputs)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_sequential_takes_turns_and_gives_the_same_image(backend, tiny_model, fp32_bundle):
    bundle = Bundle.open(fp32_bundle)
    log: list = []
    sessions = {n: Residency(s, log) for n, s in open_sessions(backend, bundle, CPU, model_dir=tiny_model).items()}
    sequential = ZImageRuntime(bundle, sessions, CPU, vram="sequential")
    plain = ZImageRuntime(bundle, open_sessions(backend, bundle, CPU, model_dir=tiny_model), CPU)
    for guidance in (None, Guidance(4.0, "blurry")):
        log.clear()
        assert np.array_equal(sequential.generate(PROMPT, 5, guidance=guidance), plain.generate(PROMPT, 5, guidance=guidance))
        resident_with_te = {s.name for s in sessions.values() if s.resident}
        runs = [name for what, name in log if what == "run"]
        assert runs[0] == "text_encoder" and runs[-1] == "vae_decoder"
        for i, (what, name) in enumerate(log):  # whenever a network runs, the other group is off the GPU
            if what == "run" and name == "text_encoder":
                assert not sessions["transformer"].resident or ("release", "transformer") in log[:i] or i == 0
        assert resident_with_te == {"transformer", "vae_decoder"}  # the image networks end on the GPU
    assert ("release", "text_encoder") in log and ("acquire", "text_encoder") in log


def test_predicted_vram_line_names_each_mode_and_part():
    plan = {"weights": {"text_encoder": 7.85e9, "transformer": 12.36e9, "vae_decoder": 0.1e9}, "buffers": 0.05e9,
            "activations": 0.9e9}
    plan["all"] = 7.85e9 + 12.36e9 + 0.1e9 + 0.95e9
    plan["sequential"] = 12.46e9 + 0.95e9
    line = describe(plan, "sequential")
    assert "all 21.3 GB" in line and "sequential 13.4 GB (this run)" in line
    assert "text encoder 7.8 GB + transformer 12.4 GB + VAE 100 MB + buffers 50 MB + engine activations 900 MB" in line
    assert describe({}, "all") == "predicted VRAM: nothing on a GPU (CPU run)"


def test_bad_memory_options_are_one_line(capsys, fp32_bundle, tmp_path):
    from .test_user_errors import assert_one_line_error, run_cli

    out = str(tmp_path / "x.png")
    base = ["generate", "--bundle", str(fp32_bundle), "--prompt", "a", "--device", "cpu", "--out", out]
    assert_one_line_error(*run_cli(capsys, *base, "--weight-budget", "0"), "positive number of GB")
    assert_one_line_error(*run_cli(capsys, *base, "--weight-budget", "4"), "is for --backend tensorrt")
