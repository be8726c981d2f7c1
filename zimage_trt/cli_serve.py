"""`serve`: the OpenAI images API over HTTP, on one GPU or scaled out with Ray Serve."""

from __future__ import annotations

from pathlib import Path

from zimage_trt.common.errors import UserError

from .cli_args import runtime_args, weight_budget


def _namedlora_stack(items) -> dict:
    """serve --lora NAME=L.safetensors, repeatable -> {name: path}."""
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path:
            raise UserError(f"--lora {item!r}: serve takes NAME=L.safetensors (a request picks it with \"lora\": NAME)")
        if name in out:
            raise UserError(f"--lora: the name {name!r} is given twice")
        if not Path(path).is_file():
            raise UserError(f"--lora {item}: no such file {path}")
        out[name.strip()] = path
    return out


def cmd_serve(args) -> None:
    from zimage_trt.server import ServeOptions, serve

    if args.queue_size < 1 or args.timeout <= 0:
        raise UserError("--queue-size must be at least 1 and --timeout positive")
    opts = ServeOptions(
        bundle=args.bundle, backend=args.backend, engines=args.engines, model=args.model, device=args.device,
        torch_dtype=args.torch_dtype, queue_size=args.queue_size, timeout_s=args.timeout, max_n=args.max_n,
        loras=_namedlora_stack(args.lora), vram=args.vram, weight_budget=weight_budget(args),
    )
    if args.ray:
        from zimage_trt.ray_serve import parse_autoscale, run
        from zimage_trt.runtime.bundle import Bundle

        Bundle.open(args.bundle)
        run(opts, args.host, args.port, args.replicas, parse_autoscale(args.autoscale))
    else:
        print(f"serving {args.bundle} ({args.backend}) on http://{args.host}:{args.port}  (POST /v1/images/generations)")
        serve(opts, args.host, args.port)


def add_parsers(sub) -> None:
    """serve."""
    p = sub.add_parser(
        "serve",
        help="serve images over HTTP (OpenAI images API), on one GPU or scaled out with Ray Serve",
        description="POST /v1/images/generations (prompt, n, size, response_format=b64_json, seed, "
        "num_inference_steps), GET /health, GET /metrics. One worker owns the GPU behind a bounded queue: a full "
        "queue answers 429 with Retry-After, a request past its deadline 503.",
    )
    runtime_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--queue-size", type=int, default=8, help="requests that may wait for the GPU (default 8)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take, queue included (default 120)")
    p.add_argument("--max-n", type=int, default=4, help="largest n (images per request) accepted (default 4)")
    p.add_argument("--lora", action="append", metavar="NAME=L.safetensors",
                   help="a LoRA converted by `zimage-trt lora`, loaded at start; a request uses it with "
                   "\"lora\": NAME and \"lora_scale\": s (-4..4, default 1). Repeatable")
    p.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (one replica per GPU)")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: number of replicas (default 1)")
    p.add_argument("--autoscale", help="with --ray: MIN:MAX replicas, scaled on ongoing requests")
    p.set_defaults(func=cmd_serve)

