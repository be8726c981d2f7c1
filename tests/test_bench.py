"""`zimage-trt bench` runs on the tiny model on a CPU: every stage of every system is measured and reported.

Not a timed test: it checks that the benchmark measures what it says (stages, systems, roofline), not speed."""

from __future__ import annotations

import json

import pytest
import torch

from zimage_trt.bench import STAGES, format_table, matmul_rate, run_bench
from zimage_trt.cli import main

from .conftest import PROMPT


def test_bench_measures_every_stage_of_every_system(tiny_model, fp32_bundle):
    results = run_bench(tiny_model, fp32_bundle, ["torch", "onnxruntime", "tensorrt"], None, torch.device("cpu"),
                        PROMPT, 0, warmup=1, iters=2)
    assert list(results["systems"]) == ["diffusers eager (fp32)", "runtime torch (fp32)", "runtime onnxruntime (fp32)"]
    assert results["skipped"] == {"tensorrt": "no --engines given"}
    for name, system in results["systems"].items():
        stages = system["stages"]
        assert set(stages) == set(STAGES), name
        for stage in ("text encoder", "transformer x1", "all passes", "VAE decode", "end to end"):
            assert stages[stage]["median_ms"] > 0 and stages[stage]["n"] == 2
        e2e = stages["end to end"]["median_ms"]
        inside = stages["text encoder"]["median_ms"] + stages["all passes"]["median_ms"] + stages["VAE decode"]["median_ms"]
        assert inside < e2e * 1.05  # the stages are parts of the whole
        assert system["passes"] == 9
    assert results["flops_per_pass"] > 0
    assert results["floor_ms"]["end to end"] == pytest.approx(9 * results["floor_ms"]["transformer x1"])
    table = format_table(results)
    assert "roofline floor" in table and "runtime overhead" in table and "not measured: runtime tensorrt" in table


def test_matmul_rate_is_measured():
    rate, how = matmul_rate(torch.device("cpu"))
    assert 1e8 < rate < 1e14 and "1024" in how


def test_cli_bench_writes_json(capsys, tiny_model, fp32_bundle, tmp_path):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", str(tiny_model), "--bundle", str(fp32_bundle), "--device", "cpu", "--iters", "1",
                 "--warmup", "0", "--backends", "onnxruntime", "--no-diffusers", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert list(data["systems"]) == ["runtime onnxruntime (fp32)"]
    assert "end to end" in capsys.readouterr().out
