"""`serve`: the OpenAI images API over HTTP, on one GPU or scaled out with Ray Serve."""

from __future__ import annotations

from pathlib import Path

from zimage_trt.common.errors import UserError

from . import serve_options as defaults
from .cli_args import runtime_args, weight_budget


def _named_loras(items) -> dict:
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


def byte_count(text: str) -> int:
    """--max-body: bytes, or with a unit: 512KiB, 1MiB, 2MB (a bare number is bytes)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(B|KiB|KB|K|MiB|MB|M)?\s*", text or "")
    if not m or float(m[1]) < 1:
        raise UserError(f"--max-body {text!r} is not a size; write it like 1MiB, 512KiB or 1048576")
    unit = {None: 1, "B": 1, "KiB": 2**10, "K": 2**10, "KB": 10**3, "MiB": 2**20, "M": 2**20, "MB": 10**6}[m[2]]
    return int(float(m[1]) * unit)


def _limits(args) -> dict:
    """The bounded-input options, checked."""
    for name in ("body_timeout", "header_timeout", "keep_alive"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if args.max_connections < 1 or args.max_prompt_chars < 1:
        raise UserError("--max-connections and --max-prompt-chars must be at least 1")
    return {"max_body_bytes": byte_count(args.max_body), "max_prompt_chars": args.max_prompt_chars,
            "body_timeout_s": args.body_timeout, "header_timeout_s": args.header_timeout,
            "keep_alive_s": args.keep_alive, "max_connections": args.max_connections}


def cmd_serve(args) -> None:
    from zimage_trt.serve_auth import check_exposure, read_keys
    from zimage_trt.server import ServeOptions, serve

    if args.queue_size < 1 or args.timeout <= 0:
        raise UserError("--queue-size must be at least 1 and --timeout positive")
    keys = read_keys(args.api_key)
    check_exposure(args.host, keys, args.no_auth)
    opts = ServeOptions(
        bundle=args.bundle, backend=args.backend, engines=args.engines, model=args.model, device=args.device,
        torch_dtype=args.torch_dtype, queue_size=args.queue_size, timeout_s=args.timeout, max_n=args.max_n,
        loras=_named_loras(args.lora), vram=args.vram, weight_budget=weight_budget(args),
        api_keys=keys, no_auth=args.no_auth, metrics_public=args.metrics_public, **_limits(args),
    )
    if args.ray:
        from zimage_trt.ray_serve import parse_autoscale, run
        from zimage_trt.runtime.bundle import Bundle

        Bundle.open(args.bundle)
        run(opts, args.host, args.port, args.replicas, parse_autoscale(args.autoscale))
    else:
        access = f"{len(keys)} API key(s)" if keys else "no API keys"
        print(f"serving {args.bundle} ({args.backend}) on http://{args.host}:{args.port} with {access}  "
              "(POST /v1/images/generations)")
        serve(opts, args.host, args.port)


def access_args(p) -> None:
    g = p.add_argument_group("access (API keys)")
    g.add_argument("--api-key", action="append", metavar="KEY",
                   help="a key a request must send as 'Authorization: Bearer KEY'; repeatable, comma-separated, "
                   "or @FILE (one key a line). Also read from ZIMAGE_TRT_API_KEYS (same forms), which keeps keys "
                   "out of the process list. Without keys the server stays on loopback")
    g.add_argument("--no-auth", action="store_true",
                   help="allow --host other than loopback without keys (behind a proxy that authenticates)")
    g.add_argument("--metrics-public", action="store_true", help="GET /metrics without a key (default: needs one "
                   "when the server has keys; /health is always open)")


def limit_args(p) -> None:
    g = p.add_argument_group("bounded input (one request never takes the server down)")
    g.add_argument("--max-body", default="1MiB", metavar="SIZE",
                   help="largest request body, checked from Content-Length and while reading: 413 (default 1MiB)")
    g.add_argument("--max-prompt-chars", type=int, default=defaults.DEFAULT_MAX_PROMPT_CHARS, metavar="N",
                   help="longest prompt and negative_prompt in characters, checked before tokenizing: 400 "
                   "(default %(default)s, OpenAI's; the model reads the first 512 tokens)")
    g.add_argument("--body-timeout", type=float, default=defaults.DEFAULT_BODY_TIMEOUT, metavar="S",
                   help="seconds the whole body may take to arrive after the headers: 408 (default %(default)g)")
    g.add_argument("--header-timeout", type=float, default=defaults.DEFAULT_HEADER_TIMEOUT, metavar="S",
                   help="seconds the request line and headers may take: 408 and close (default %(default)g)")
    g.add_argument("--keep-alive", type=float, default=defaults.DEFAULT_KEEP_ALIVE, metavar="S",
                   help="seconds an idle keep-alive connection stays open (default %(default)g)")
    g.add_argument("--max-connections", type=int, default=defaults.DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help="open connections; one more is answered 503 and closed (default %(default)s)")


def add_parsers(sub) -> None:
    """serve."""
    p = sub.add_parser(
        "serve",
        help="serve images over HTTP (OpenAI images API), on one GPU or scaled out with Ray Serve",
        description="POST /v1/images/generations (prompt, n, size, response_format=b64_json, output_format, "
        "output_compression, seed, num_inference_steps, ...), GET /v1/models, GET /health, GET /metrics. One worker "
        "owns the GPU behind a bounded queue: a full queue answers 429 with Retry-After, a request past its "
        "deadline 503. Keys, body and prompt limits and timeouts below.",
    )
    runtime_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--queue-size", type=int, default=8, help="requests that may wait for the GPU (default 8)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds a request may take, queue included (default 120)")
    p.add_argument("--max-n", type=int, default=4, help="largest n (images per request) accepted (default 4)")
    p.add_argument("--lora", action="append", metavar="NAME=L.safetensors",
                   help="a LoRA converted by `zimage-trt lora`, loaded at start; a request uses it with "
                   "\"lora\": NAME and \"lora_scale\": s (-4..4, default 1). Repeatable")
    access_args(p)
    limit_args(p)
    p.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (one replica per GPU)")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: number of replicas (default 1)")
    p.add_argument("--autoscale", help="with --ray: MIN:MAX replicas, scaled on ongoing requests")
    p.set_defaults(func=cmd_serve)

