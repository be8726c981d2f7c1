"""Scale-out: a local Ray cluster on the CPU runs two replicas of the image API on the tiny bundle, and
concurrent requests are spread over both."""

from __future__ import annotations

import threading

import pytest

from .serving import loadtest

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (CI installs it)")


@pytest.fixture(scope="module")
def ray_app(fp32_range_bundle):
    from ray import serve

    from zimage_trt.ray_serve import deployment
    from zimage_trt.server import ServeOptions

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    port = loadtest.free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        opts = ServeOptions(bundle=str(fp32_range_bundle), device="cpu", queue_size=2)
        serve.run(deployment(opts, replicas=2), name="zimage", route_prefix="/", blocking=False)
        client = loadtest.Client("127.0.0.1", port, timeout=120)
        loadtest.wait_ready(client, 180)
        yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_concurrent_requests(ray_app):
    results = []

    sizes = [(128, 128), (96, 128), (128, 96), (160, 64)]

    def send(i):
        w, h = sizes[i % len(sizes)]
        body = {"prompt": f"a red fox {i}", "seed": i, "size": f"{w}x{h}"}
        results.append((i, ray_app.request("POST", "/v1/images/generations", body)))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 10
    for i, (status, headers, body) in results:
        assert loadtest.classify(status, headers, body, sizes[i % len(sizes)]) == "ok", (status, body[:200])
    replicas = {headers["x-served-by"] for _, (_, headers, _) in results}
    assert len(replicas) == 2  # both replicas took a share


def test_bad_input_through_ray_is_still_a_400(ray_app):
    import json

    status, _, body = ray_app.request("POST", "/v1/images/generations", {"prompt": ""})
    assert status == 400 and json.loads(body)["error"]["param"] == "prompt"
    status, _, body = ray_app.request("POST", "/v1/images/generations", {"prompt": "x", "size": "2048x2048"})
    assert status == 400 and "outside the served range: width 64..160" in json.loads(body)["error"]["message"]


def test_autoscale_option_is_parsed():
    from zimage_trt.common.errors import UserError
    from zimage_trt.ray_serve import parse_autoscale

    assert parse_autoscale("1:4") == (1, 4)
    assert parse_autoscale(None) is None
    for bad in ("4", "a:b", "3:1", "0:0"):
        with pytest.raises(UserError):
            parse_autoscale(bad)
