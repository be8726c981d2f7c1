"""Stage-by-stage peak memory: a stage below an earlier stage's peak still gets its own peak."""

import time

import numpy as np
import pytest

from zimage_trt.common.peaks import StagePeaks, host_now_bytes, host_peak_bytes


def _hold(n_bytes: int) -> None:
    block = np.ones(n_bytes // 8)  # written, so resident
    time.sleep(0.15)
    del block


def test_each_stage_gets_its_own_peak():
    peaks = StagePeaks(interval=0.01)
    peaks.enter("big")
    _hold(400_000_000)
    peaks.enter("small")
    _hold(100_000_000)
    peaks.enter("none")
    time.sleep(0.05)
    peaks.close()
    big, small, none = (s["host_peak_gb"] for s in peaks.stages)
    # ru_maxrss would give all three the big one's peak
    assert big - none == pytest.approx(0.4, abs=0.05)
    assert small - none == pytest.approx(0.1, abs=0.05)
    assert big <= host_peak_bytes() / 1e9 + 0.01
    assert none == pytest.approx(host_now_bytes() / 1e9, abs=0.05)
    assert [s["gpu_peak_gb"] for s in peaks.stages] == [0.0, 0.0, 0.0]  # no GPU asked for
