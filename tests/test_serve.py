"""The HTTP server, started for real on loopback with the tiny bundle: endpoints, every bad input, the queue's
429, the deadline's 503, disconnects, graceful shutdown, and the load test."""

from __future__ import annotations

import base64
import io
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import PROMPT, SIZE, SIZE_RANGE
from .serving import loadtest, running_server

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, prometheus-client) is not installed")

LONG = {"prompt": "a long job", "n": 4, "num_inference_steps": 50, "seed": 1}  # ~seconds on a CPU


@pytest.fixture(scope="module")
def server(fp32_bundle):
    with running_server(fp32_bundle, "--queue-size", "2") as s:
        yield s


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def decode(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


def test_health_and_metrics(server):
    status, _, body = server.get("/health")
    assert status == 200 and b'"ready"' in body and f"{SIZE}x{SIZE}".encode() in body
    _, headers, body = server.get("/metrics")
    text = body.decode()
    for name in ("zimage_request_latency_seconds", "zimage_stage_latency_seconds", "zimage_queue_depth",
                 "zimage_rejected_requests_total", "process_resident_memory_bytes", "zimage_cuda_graph_failures"):
        assert name in text


def test_generation_is_the_runtimes_image(server, fp32_bundle):
    from zimage_trt.runtime.bundle import Bundle
    from zimage_trt.runtime.pipeline import ZImageRuntime
    from zimage_trt.sessions import open_sessions

    status, headers, body = server.post({"prompt": PROMPT, "n": 2, "size": f"{SIZE}x{SIZE}", "seed": 11,
                                         "response_format": "b64_json"})
    assert status == 200, body
    assert isinstance(body["created"], int) and body["seed"] == 11 and body["size"] == f"{SIZE}x{SIZE}"
    assert [d["seed"] for d in body["data"]] == [11, 12]
    bundle = Bundle.open(fp32_bundle)
    import torch

    rt = ZImageRuntime(bundle, open_sessions("onnxruntime", bundle, torch.device("cpu")))
    assert np.array_equal(decode(body["data"][0]), rt.generate(PROMPT, 11))
    assert np.array_equal(decode(body["data"][1]), rt.generate(PROMPT, 12))
    assert server.metric("zimage_stage_latency_seconds_count", stage="denoise") >= 2


def test_guidance_fields_give_the_runtimes_guided_image(server, fp32_bundle):
    import torch

    from zimage_trt.runtime.bundle import Bundle
    from zimage_trt.runtime.pipeline import Guidance, ZImageRuntime
    from zimage_trt.sessions import open_sessions

    status, _, body = server.post({"prompt": PROMPT, "seed": 5, "guidance_scale": 4.0,
                                   "negative_prompt": "blurry", "cfg_truncation": 0.7})
    assert status == 200, body
    bundle = Bundle.open(fp32_bundle)
    rt = ZImageRuntime(bundle, open_sessions("onnxruntime", bundle, torch.device("cpu")))
    guided = rt.generate(PROMPT, 5, guidance=Guidance(4.0, "blurry", truncation=0.7))
    assert np.array_equal(decode(body["data"][0]), guided)
    assert not np.array_equal(guided, rt.generate(PROMPT, 5))


def test_a_prompt_over_512_tokens_is_truncated_as_the_reference_does(server):
    status, _, body = server.post({"prompt": "many words in a very long caption " * 150, "seed": 0})
    assert status == 200
    assert body["prompt_tokens"] == 512 and body["prompt_truncated"] is True
    status, _, body = server.post({"prompt": "short", "seed": 0})
    assert body["prompt_truncated"] is False and body["prompt_tokens"] < 32


@pytest.mark.parametrize(
    "body, param, needle",
    [
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": "   "}, "prompt", "empty"),
        ({"prompt": 42}, "prompt", "must be a string"),
        ({}, "prompt", "must be a string"),
        ({"prompt": "x", "n": 0}, "n", "from 1 to 4"),
        ({"prompt": "x", "n": 5}, "n", "from 1 to 4"),
        ({"prompt": "x", "n": "2"}, "n", "integer"),
        ({"prompt": "x", "size": "1024x1024"}, "size", f"outside the served range: {SIZE}x{SIZE}"),
        ({"prompt": "x", "size": "big"}, "size", f"'WIDTHxHEIGHT' such as '1024x1024'; served: {SIZE}x{SIZE}"),
        ({"prompt": "x", "size": 128}, "size", "'WIDTHxHEIGHT'"),
        ({"prompt": "x", "response_format": "url"}, "response_format", "use 'b64_json'"),
        ({"prompt": "x", "seed": -1}, "seed", "non-negative"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "from 1 to 50"),
        ({"prompt": "x", "num_inference_steps": 500}, "num_inference_steps", "from 1 to 50"),
        ([1, 2], None, "JSON object"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale", "from 0 to 30"),
        ({"prompt": "x", "guidance_scale": "4"}, "guidance_scale", "must be a number"),
        ({"prompt": "x", "guidance_scale": 1e9}, "guidance_scale", "from 0 to 30"),
        ({"prompt": "x", "guidance_scale": 4, "negative_prompt": 7}, "negative_prompt", "must be a string"),
        ({"prompt": "x", "guidance_scale": 4, "negative_prompt": "\ud800"}, "negative_prompt", "not valid Unicode"),
        ({"prompt": "x", "guidance_scale": 4, "cfg_normalization": -1}, "cfg_normalization", "from 0 to 10"),
        ({"prompt": "x", "guidance_scale": 4, "cfg_truncation": True}, "cfg_truncation", "must be a number"),
    ],
)
def test_bad_input_is_a_400_in_the_openai_shape_and_never_reaches_the_gpu(server, body, param, needle):
    before = server.metric("zimage_images_total")
    status, _, answer = server.post(body)
    assert status == 400
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and needle in error["message"]
    assert server.metric("zimage_images_total") == before


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe"])
def test_malformed_json_is_a_400(server, raw):
    status, _, answer = server.post(None, raw=raw)
    assert status == 400 and answer["error"]["code"] == "invalid_json"


def test_a_full_queue_answers_429_with_retry_after(server):
    results = []

    def send(i):
        results.append(server.post(dict(LONG, seed=i)))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]  # 1 running + 2 queued fit
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join()
    codes = sorted(r[0] for r in results)
    assert codes.count(200) >= 3 and codes.count(429) >= 1 and set(codes) <= {200, 429}
    for status, headers, body in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1 and body["error"]["code"] == "queue_full"
    assert server.metric("zimage_rejected_requests_total", reason="queue_full") >= 1


def test_a_client_that_keeps_the_queue_exactly_full_is_never_refused(server):
    """Queue size 2: one running and two waiting fit. Three clients that each send their next request the moment
    an answer arrives (what Ray's router does at max_ongoing_requests = queue_size + 1) all get 200s: a job's
    slot is free before its answer is sent, however late the worker takes the next job off the queue."""
    codes = []

    def client(i):
        for k in range(4):
            codes.append(server.post({"prompt": f"keep full {i}", "seed": 10 * i + k, "num_inference_steps": 2})[0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 12


def test_past_the_deadline_is_a_503_and_costs_no_gpu_time(fp32_bundle):
    # Four long jobs, a 1 s deadline: the first runs (and overruns), the three behind it expire in the queue.
    with running_server(fp32_bundle, "--queue-size", "4", "--timeout", "1") as s:
        results = []
        threads = [threading.Thread(target=lambda i=i: results.append(s.post(dict(LONG, seed=i)))) for i in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert [r[0] for r in results] == [503] * 4
        assert all(r[2]["error"]["code"] == "timeout" for r in results)
        # The worker finishes the first job, then reaches the abandoned ones and drops them.
        wait_for(lambda: s.metric("zimage_skipped_jobs_total", reason="deadline") == 3)
        assert s.metric("zimage_images_total") == 4  # the first job's images, nothing else


def test_a_client_that_disconnects_while_queued_costs_no_gpu_time(fp32_bundle):
    with running_server(fp32_bundle, "--queue-size", "4") as s:
        first = threading.Thread(target=lambda: s.post(LONG))
        first.start()
        time.sleep(0.3)
        raw = b'{"prompt": "gone before its turn", "seed": 5}'
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
            time.sleep(0.3)  # queued behind the long job
        first.join()
        wait_for(lambda: s.metric("zimage_skipped_jobs_total", reason="disconnected") == 1)
        assert s.metric("zimage_images_total") == 4  # the long job's, nothing for the one that left


def test_shutdown_finishes_the_request_in_flight(fp32_bundle):
    with running_server(fp32_bundle) as s:
        results = []
        t = threading.Thread(target=lambda: results.append(s.post(LONG)))
        t.start()
        time.sleep(0.5)
        s.proc.send_signal(signal.SIGTERM)
        t.join()
        assert results[0][0] == 200 and len(results[0][2]["data"]) == 4
        # uvicorn re-raises the signal once it has shut down gracefully, so -SIGTERM is a clean exit too.
        assert s.proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in s.proc.stderr.read()
        with pytest.raises(OSError):
            s.get("/health")


def test_serve_refuses_a_missing_bundle(tmp_path):
    out = subprocess.run([sys.executable, "-m", "zimage_trt.cli", "serve", "--bundle", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: bundle") and "Traceback" not in out.stderr


def test_load_test_loses_nothing(fp32_bundle, tmp_path):
    report = tmp_path / "load.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "loadtest.py"
    out = subprocess.run([sys.executable, str(script), "--bundle", str(fp32_bundle), "--device", "cpu",
                          "--queue-size", "2", "--requests", "60", "--time-limit", "120", "--json", str(report)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    import json

    r = json.loads(report.read_text())
    assert r["lost"] == 0 and r["malformed"] == 0 and r["memory_flat"]
    assert r["ok"] + r["rejected_429"] + r["rejected_503"] == r["sent"] == 60
    assert r["ok"] > 0 and r["rejected_429"] > 0  # 4x overload: some served, some told to come back
    assert r["clients"] == 12


def test_load_test_refuses_other_hosts():
    out = subprocess.run([sys.executable, str(Path(loadtest.__file__)), "--url", "http://10.1.2.3:8000"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "only loopback" in out.stderr


# ------------------------------------------------------------------------------------------ sizes from a range
@pytest.fixture(scope="module")
def range_server(fp32_range_bundle):
    with running_server(fp32_range_bundle, "--queue-size", "2") as s:
        yield s


def test_health_reports_the_served_range(range_server):
    import json

    status, _, body = range_server.get("/health")
    info = json.loads(body)
    lo, hi = SIZE_RANGE.split(":")
    assert status == 200 and info["size"] == f"{SIZE}x{SIZE}"
    assert info["sizes"]["min"] == f"{lo}x{lo}" and info["sizes"]["max"] == f"{hi}x{hi}"
    assert info["sizes"]["opt"] == f"{SIZE}x{SIZE}" and info["sizes"]["multiple"] == 16


@pytest.mark.parametrize("size", ["96x128", "128x96", "64x64", "160x160", "auto"])
def test_any_size_in_the_range_is_the_runtimes_image_at_that_size(range_server, fp32_range_bundle, size):
    import torch

    from zimage_trt.runtime.bundle import Bundle
    from zimage_trt.runtime.pipeline import ZImageRuntime
    from zimage_trt.runtime.sizes import parse_size
    from zimage_trt.sessions import open_sessions

    status, _, body = range_server.post({"prompt": PROMPT, "size": size, "seed": 3})
    assert status == 200, body
    width, height = (SIZE, SIZE) if size == "auto" else parse_size(size)
    assert body["size"] == f"{width}x{height}"
    image = decode(body["data"][0])
    assert image.shape == (height, width, 3)
    bundle = Bundle.open(fp32_range_bundle)
    rt = ZImageRuntime(bundle, open_sessions("onnxruntime", bundle, torch.device("cpu")))
    assert np.array_equal(image, rt.generate(PROMPT, 3, size=(width, height)))


@pytest.mark.parametrize(
    "size, needle",
    [
        ("176x128", "outside the served range"),
        ("128x48", "outside the served range"),
        ("2048x2048", "outside the served range"),
        ("120x128", "multiples of 16"),
        ("128x100", "multiples of 16"),
        ("0x0", "outside the served range"),
        ("-64x64", "'WIDTHxHEIGHT'"),
        ("128 by 128", "'WIDTHxHEIGHT'"),
        ("", "'WIDTHxHEIGHT'"),
    ],
)
def test_a_size_outside_the_range_is_a_400_that_states_the_range(range_server, size, needle):
    before = range_server.metric("zimage_images_total")
    status, _, answer = range_server.post({"prompt": "x", "size": size})
    assert status == 400, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "size"
    lo, hi = SIZE_RANGE.split(":")
    assert needle in error["message"] and f"width {lo}..{hi}, height {lo}..{hi}" in error["message"]
    assert range_server.metric("zimage_images_total") == before


# ------------------------------------------------------------------------------------------ hostile bodies
def _hostile_bodies() -> list[bytes]:
    """A corpus of malformed and hostile request bodies: hand-picked ones, then seeded random mixes of the API's
    fields with values of every JSON type."""
    import json
    import random

    raw = [
        b'{"prompt": "\\ud800"}', b'{"prompt": "a \\udfff b"}', b'{"prompt": "\\u0000"}', b'{"prompt": "x", "n": NaN}',
        b'{"prompt": "x", "seed": Infinity}', b'{"prompt": "x", "n": 1e308}', b"null", b"1", b'"prompt"', b"[]",
        b"{", b'{"prompt": "x"} trailing', b"\x00", b"\xc3\x28", b"[" * 100_000, b'{"a":' * 50_000,
        b'{"prompt": "x", "size": "99999999999999999999x128"}', b'{"prompt": "x", "seed": 18446744073709551616}',
        b'{"prompt": "x", "num_inference_steps": 1e10}', b'{"prompt": "x", "response_format": null}',
        json.dumps({"prompt": "x" * 200_000}).encode(), json.dumps({"prompt": ["a"]}).encode(),
        json.dumps({"prompt": {"$gt": ""}}).encode(), json.dumps({"prompt": "x", "n": True}).encode(),
        json.dumps({"prompt": "x", "size": ["128", "128"]}).encode(), json.dumps({"prompt": "x", "seed": 1.5}).encode(),
    ]
    rng = random.Random(1234)
    values = [None, True, False, 0, -1, 1, 3, 2**70, -2**70, 1.5, -0.0, "", " ", "auto", "128x128", "0x0", "x",
              "\u202e\u200b", "🦊" * 3, [], [1, 2], {}, {"k": "v"}, "b64_json", "url"]
    fields = ["prompt", "n", "size", "seed", "response_format", "num_inference_steps", "model", "user"]
    while len(raw) < 80:
        body = {f: rng.choice(values) for f in rng.sample(fields, rng.randint(0, len(fields)))}
        if rng.random() < 0.5:
            body["num_inference_steps"] = rng.choice([1, 2, 0, -5, "9"])  # keep the valid ones short
        raw.append(json.dumps(body).encode())
    return raw


def test_hostile_bodies_get_a_2xx_or_a_4xx_in_the_error_shape_never_a_500(server):
    import json

    bodies = _hostile_bodies()
    assert len(bodies) >= 50
    statuses = []
    for raw in bodies:
        status, _, answer = server.post(None, raw=raw)
        statuses.append(status)
        assert 200 <= status < 300 or 400 <= status < 500, (raw[:80], status, answer)
        if status >= 400:
            assert isinstance(answer["error"]["message"], str) and answer["error"]["type"], (raw[:80], answer)
    assert statuses.count(400) >= 40  # nearly all of them are refused
    status, _, body = server.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ready"  # and the server is healthy after
    assert server.metric("zimage_request_latency_seconds_count", status="500") == 0


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_serve_on_a_gpu_this_machine_lacks_is_one_line(fp32_bundle):
    out = subprocess.run([sys.executable, "-m", "zimage_trt.cli", "serve", "--bundle", str(fp32_bundle),
                          "--device", "cuda:1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last == "error: --device cuda:1: PyTorch sees no CUDA GPU here; use --device cpu"
