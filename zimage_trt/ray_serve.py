"""Scale-out with Ray Serve: the same app, one replica per GPU, each with its own runtime and queue.

    zimage-trt serve --bundle B --engines E --backend tensorrt --ray --replicas 4
    zimage-trt serve --bundle B --engines E --backend tensorrt --ray --autoscale 1:8
    serve run zimage_trt.ray_serve:build_app bundle=B engines=E backend=tensorrt replicas=4

Each replica builds the FastAPI app of server.py on its own process (and GPU, where there are GPUs), so
validation, the bounded queue, 429/503 and the metrics behave per replica exactly as in `zimage-trt serve`.
Ray's router spreads requests over replicas; past `max_queued_requests` it answers 503 itself.

Keys (--api-key, ZIMAGE_TRT_API_KEYS), the body limit and its read timeout, and the prompt limits are checked by
each replica's app, as in `zimage-trt serve`. The connection itself (header timeout, keep-alive, connection cap)
is Ray's HTTP proxy's, with Ray's settings.
"""

from __future__ import annotations

from zimage_trt.common.errors import UserError, require

from .serve_auth import check_exposure, read_keys
from .server import ServeOptions, create_app


def deployment(opts: ServeOptions, replicas: int = 1, autoscale: tuple[int, int] | None = None,
               gpus: float | None = None):
    """A bound Ray Serve application of the image API."""
    require("ray", "pip install 'ray[serve]'")
    import torch
    from ray import serve

    if gpus is None:
        gpus = 1 if torch.cuda.is_available() else 0  # one replica per GPU

    def build_replica_app():  # Ray calls a plain function (not a partial) on each replica to build its app
        return create_app(opts)

    @serve.ingress(build_replica_app)
    class ZImageDeployment:
        pass

    options = {
        "name": "zimage",
        "ray_actor_options": {"num_gpus": gpus, "num_cpus": 1},
        # The replica's own queue answers 429; this only keeps Ray from piling more onto a busy replica.
        "max_ongoing_requests": opts.queue_size + 1,
        "max_queued_requests": 4 * (opts.queue_size + 1) * max(replicas, autoscale[1] if autoscale else 1),
        "health_check_period_s": 10,
    }
    if autoscale:
        lo, hi = autoscale
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": 2}
    else:
        options["num_replicas"] = replicas
    return serve.deployment(**options)(ZImageDeployment).bind()


def run(opts: ServeOptions, host: str, port: int, replicas: int, autoscale=None, blocking: bool = True):
    check_exposure(host, opts.api_keys, opts.no_auth)
    require("ray", "pip install 'ray[serve]'")
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(opts, replicas, autoscale), name="zimage", route_prefix="/", blocking=blocking)


def parse_autoscale(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise UserError(f"--autoscale {text!r} must be MIN:MAX replicas, e.g. 1:4") from None
    if not 0 <= lo <= hi or hi < 1:
        raise UserError(f"--autoscale {text!r}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


def build_app(args: dict):
    """`serve run zimage_trt.ray_serve:build_app bundle=DIR [engines=DIR backend=tensorrt replicas=N autoscale=1:4]`.
    Keys come from ZIMAGE_TRT_API_KEYS (never from the command line, which `ps` shows); metrics_public=1 opens
    /metrics."""
    opts = ServeOptions(
        bundle=args["bundle"],
        backend=args.get("backend", "onnxruntime"),
        engines=args.get("engines"),
        model=args.get("model"),
        device=args.get("device", "auto"),
        queue_size=int(args.get("queue_size", 8)),
        timeout_s=float(args.get("timeout", 120)),
        api_keys=read_keys(None),
        metrics_public=str(args.get("metrics_public", "")).lower() in ("1", "true", "yes"),
    )
    return deployment(opts, int(args.get("replicas", 1)), parse_autoscale(args.get("autoscale")))
