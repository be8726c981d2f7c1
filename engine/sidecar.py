"""The metadata sidecar of an engine, and the checks that refuse a stale or foreign one.

Each `NAME.engine` has a `NAME.engine.json` beside it that records what it was built from and for:

    network, precision          which graph of the bundle, and its precision
    quantization                the quantization recipe (format, skipped blocks, calibration prompts' hash), if any
    onnx_sha256                 content hash of the ONNX (graph + external data) it was built from
    io                          names, dtypes, shapes and profile (min/opt/max) of every input and output
    backend, backend_version    tensorrt or tensorrt-rtx, and the exact library version
    targets                     TensorRT: the GPU it was built on; TensorRT-RTX: the compute capabilities
    request                     the build options that shape the engine (profile's opt point, opt level, sizes)
    image_sizes                 for the networks that take latents: the image sizes the profile covers
    build                       flags, seconds, date, host, engine size and hash

`build` compares the sidecar with the bundle to rebuild only what is stale; the runtime compares it with the
bundle, the installed library and the GPU, and refuses a mismatch with the reason and the command that fixes
it. The checks here are plain functions of their inputs so they are tested without a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

from zimage_trt.common.errors import UserError
from zimage_trt.common.files import write_atomic
from zimage_trt.runtime.sizes import SizeRange, format_size

SIDECAR_FORMAT = "zimage-trt-engine"
SIDECAR_VERSION = 1


def engine_path(engines_dir: Path, network: str) -> Path:
    return Path(engines_dir) / f"{network}.engine"


def sidecar_path(engine: Path) -> Path:
    return engine.with_name(engine.name + ".json")


def write_sidecar(engine: Path, meta: dict) -> None:
    meta = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, **meta}
    write_atomic(sidecar_path(engine), (json.dumps(meta, indent=2) + "\n").encode())


def read_sidecar(engine: Path) -> dict | None:
    path = sidecar_path(engine)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if meta.get("format") != SIDECAR_FORMAT or meta.get("version") != SIDECAR_VERSION:
        return None
    return meta


def rebuild_command(bundle_dir, engines_dir, backend: str) -> str:
    return f"zimage-trt build --bundle {bundle_dir} --out {engines_dir} --backend {backend}"


def stale_reason(
    meta: dict | None, engine: Path, network: dict, backend: str, backend_version: str, targets, request: dict
) -> str:
    """Why the engine must be rebuilt for this bundle network and build request ('' if it is current)."""
    if meta is None:
        return "no engine" if not engine.exists() else "no valid sidecar"
    if not engine.is_file():
        return "engine file missing"
    if engine.stat().st_size != meta["build"]["engine_bytes"]:
        return "engine file size differs from its sidecar (partial write?)"
    if meta["onnx_sha256"] != network["sha256"]:
        return "the bundle's ONNX changed since the build"
    if meta["backend"] != backend:
        return f"built with {meta['backend']}, {backend} asked for"
    if meta["backend_version"] != backend_version:
        return f"built with {meta['backend']} {meta['backend_version']}, {backend_version} installed"
    flags = meta["build"]["flags"]
    if backend == "tensorrt-rtx" and not flags.get("require_user_allocation") and not flags.get("weight_streaming"):
        return "built without REQUIRE_USER_ALLOCATION, which TensorRT-RTX needs to record the loop in a CUDA graph"
    if meta["targets"] != targets:
        return f"built for {describe_targets(meta['targets'])}; {describe_targets(targets)} asked for"
    built = meta.get("request") or {}
    if built.get("image_sizes") != request.get("image_sizes") and "image_sizes" in request:
        return f"built for sizes {_sizes_text(built.get('image_sizes'))}; {_sizes_text(request['image_sizes'])} asked for"
    if built != request:
        return f"built with {built}; {request} asked for"
    return ""


def _sizes_text(sizes: dict | None) -> str:
    if not sizes:
        return "(not recorded)"
    return SizeRange.from_dict(sizes).describe()


def describe_targets(targets: dict) -> str:
    if "gpu" in targets:
        return f"{targets['gpu']['name']} ({targets['gpu']['compute_capability']})"
    return ", ".join(targets.get("compute_capabilities", [])) or "?"


def check_loadable(
    meta: dict | None,
    engine: Path,
    network_name: str,
    network: dict,
    installed: dict,
    gpu: dict | None,
    fix: str,
) -> None:
    """Refuse an engine that does not belong to this bundle, library or GPU; one line with the fix."""
    check_matches(meta, engine, network_name, network, installed, fix)
    check_gpu(meta, network_name, gpu, fix)


def check_matches(meta: dict | None, engine: Path, network_name: str, network: dict, installed: dict, fix: str) -> None:
    """The checks that need no GPU: the engine is whole, built from this bundle's graph, by this library.

    installed: {"backend": name, "version": str} of the library here; version None (and "error", the import
               failure with its install hint) where it is not installed
    """
    if not engine.is_file():
        raise UserError(f"no engine for {network_name} at {engine}; build it: {fix}")
    if meta is None:
        raise UserError(f"{engine} has no valid sidecar ({sidecar_path(engine).name}); rebuild it: {fix}")
    if meta["network"] != network_name:
        raise UserError(f"{engine} holds the {meta['network']} network, not {network_name}; rebuild: {fix}")
    if engine.stat().st_size != meta["build"]["engine_bytes"]:
        raise UserError(f"{engine} does not match its sidecar's size (interrupted copy?); rebuild: {fix}")
    if meta["onnx_sha256"] != network["sha256"]:
        raise UserError(f"{network_name} engine is stale: the bundle's ONNX changed since it was built; rebuild: {fix}")
    if meta["precision"] != network["precision"]:
        raise UserError(
            f"{network_name} engine is {meta['precision']} but the bundle's graph is {network['precision']}; rebuild: {fix}"
        )
    if installed.get("version") is None:
        raise UserError(
            installed.get("error")
            or f"{network_name} engine needs {meta['backend']} {meta['backend_version']}, which is not installed"
        )
    if meta["backend"] != installed["backend"]:
        raise UserError(f"{network_name} engine was built with {meta['backend']}, not {installed['backend']}; rebuild: {fix}")
    if meta["backend_version"] != installed["version"]:
        raise UserError(
            f"{network_name} engine was built with {meta['backend']} {meta['backend_version']} but "
            f"{installed['version']} is installed; engines do not move between versions; rebuild: {fix}"
        )


def image_sizes(meta: dict):
    """The SizeRange an engine's profile covers, or None for an engine that takes no image (or predates it)."""
    sizes = meta.get("image_sizes")
    return SizeRange.from_dict(sizes) if sizes else None


def size_rebuild_command(meta: dict, fix: str, width: int | None = None, height: int | None = None) -> str:
    """The build command whose engines cover this engine's profile corners and, if given, width x height."""
    r = image_sizes(meta)
    if r is None:
        return fix
    sizes = [(r.min_width, r.min_height), r.opt, r.largest] + ([(width, height)] if width else [])
    return f"{fix} --sizes {','.join(format_size(*s) for s in dict.fromkeys(sizes))}"


def check_size(meta: dict, network_name: str, width: int, height: int, fix: str) -> None:
    """Refuse a size the engine's optimization profile does not cover: the size, the profile, the build command."""
    r = image_sizes(meta)
    if r is not None and not r.covers(width, height):
        raise UserError(
            f"size {width}x{height} is outside the {network_name} engine's profile ({r.describe()}); build engines "
            f"that cover it: {size_rebuild_command(meta, fix, width, height)}"
        )


# The oldest compute capability with tensor cores for each quantized format: FP8 from Ada (sm89) and Hopper,
# NVFP4 from Blackwell (sm100 datacenter, sm120 RTX).
QUANT_MIN_CC = {"fp8": 89, "nvfp4": 100}
QUANT_GPUS = {"fp8": "Ada, Hopper, Blackwell", "nvfp4": "Blackwell"}


def cc_number(name: str) -> int:
    """'sm89' -> 89, 'sm120' -> 120."""
    return int(name.lower().removeprefix("sm"))


def check_quantized_target(network_name: str, quantization: dict | None, cc: str, where: str) -> None:
    """A quantized network needs its format's tensor cores: one line naming the GPU (`where`) when they are absent."""
    fmt = (quantization or {}).get("format")
    if fmt and cc_number(cc) < QUANT_MIN_CC[fmt]:
        older = "an fp8 or fp16" if fmt == "nvfp4" and cc_number(cc) >= QUANT_MIN_CC["fp8"] else "an fp16"
        raise UserError(f"the {network_name} is {fmt}-quantized and {where} ({cc}) has no {fmt.upper()} tensor cores "
                        f"(sm{QUANT_MIN_CC[fmt]} or newer: {QUANT_GPUS[fmt]}); export {older} bundle for it")


def check_gpu(meta: dict, network_name: str, gpu: dict | None, fix: str) -> None:
    """The engine was built for this GPU: the same GPU type (TensorRT) or a targeted compute capability (RTX).

    gpu: {"name": str, "compute_capability": "sm89"} of the GPU to run on, or None if there is none
    """
    if gpu is None:
        raise UserError(f"{network_name} engine needs a CUDA GPU and PyTorch sees none here")
    check_quantized_target(network_name, meta.get("quantization"), gpu["compute_capability"], gpu["name"])
    targets = meta["targets"]
    if "gpu" in targets:
        built = targets["gpu"]
        if built["compute_capability"] != gpu["compute_capability"]:
            raise UserError(
                f"{network_name} engine was built on {built['name']} ({built['compute_capability']}), this GPU is "
                f"{gpu['name']} ({gpu['compute_capability']}); build engines on each GPU type: {fix}"
            )
    else:
        ccs = targets.get("compute_capabilities", [])
        if gpu["compute_capability"] not in ccs:
            raise UserError(
                f"{network_name} engine targets {', '.join(ccs)}; this GPU is {gpu['name']} "
                f"({gpu['compute_capability']}); rebuild with --target {gpu['compute_capability']}: {fix}"
            )
