"""What can fail before a long build, checked first: the targets the library and GPU allow, and each engine's
host memory need (about 3x its weights)."""

from __future__ import annotations

from pathlib import Path

from zimage_trt.common.errors import UserError

from .trt_api import RTX_UNSUPPORTED_CC, Flavour, rtx_targets

# Peak host memory of one engine's build = FACTOR x its ONNX weight bytes + BASE. Measured with TensorRT-RTX 1.7.1
# (H200 host, BENCHMARKS.md): fp16 transformer 34.7 GB for 12.4 GB of weights, fp8 (fp16 weights under Q/DQ) 26.4
# GB for 12.4, nvfp4 13.2 GB for 3.7 GB of FP4 weights, 6.7 GB for 2.2 GB fp16 earlier: the base covers the
# builder itself, which the small nvfp4 weights make visible.
BUILD_MEMORY_FACTOR = 3.0
BUILD_MEMORY_BASE = 3 << 30


def resolve_targets(flavour: Flavour, requested: list[str], gpu: dict | None) -> tuple[dict, list]:
    """The sidecar's `targets` and, for TensorRT-RTX, the ComputeCapability values to set."""
    auto = requested in ([], ["auto"])
    if not flavour.is_rtx:
        if not auto:
            raise UserError("--target is for tensorrt-rtx; TensorRT builds for the GPU it runs on (omit --target)")
        if gpu is None:
            raise UserError("TensorRT builds on the GPU it targets and PyTorch sees no CUDA GPU here")
        return {"gpu": {"name": gpu["name"], "compute_capability": gpu["compute_capability"]}}, []
    if auto:
        if gpu is None:
            raise UserError("no GPU here to target; name the RTX GPUs to build for, e.g. --target sm89,sm120")
        if gpu["cc"] in RTX_UNSUPPORTED_CC:
            raise UserError(
                f"TensorRT-RTX does not support {gpu['name']} (compute capability {gpu['cc'][0]}.{gpu['cc'][1]}); "
                "use --backend tensorrt on this GPU, or --target sm89,... to build for RTX GPUs elsewhere"
            )
        requested = [gpu["compute_capability"]]
    values = rtx_targets(flavour, requested)
    names = [r.strip().lower() for r in requested]
    return {"compute_capabilities": names}, values


def available_host_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_memory_need(weight_bytes: int) -> int:
    """Peak host memory of one engine's build (the engines are built one at a time, each freed before the next)."""
    return int(BUILD_MEMORY_FACTOR * weight_bytes + BUILD_MEMORY_BASE)


def check_host_memory(name: str, weight_bytes: int, available: int | None) -> None:
    need = host_memory_need(weight_bytes)
    if available is not None and need > available:
        raise UserError(
            f"building {name} needs about {need / 1e9:.1f} GB of host memory ({BUILD_MEMORY_FACTOR:.0f}x its "
            f"{weight_bytes / 1e9:.1f} GB of weights + {BUILD_MEMORY_BASE / 1e9:.1f} GB) and {available / 1e9:.1f} "
            "GB is available; build on a machine with more memory (TensorRT-RTX builds for RTX GPUs on any Linux "
            "host), or pass --skip-memory-check"
        )


def check_rtx_refit_host(targets: dict, gpu: dict | None) -> None:
    """A refittable TensorRT-RTX engine is built on a GPU of its one target architecture. Measured with
    TensorRT-RTX 1.7.1: without CUDA the build fails at "Determining refit engines" (CUDA driver error 35), and on an
    H200 a build for sm89 and sm120 fails there too (CUDA error 222: the builder loads the kernels it compiled for
    the target on the GPU it runs on)."""
    wanted = targets.get("compute_capabilities", [])
    if gpu is None or wanted != [gpu["compute_capability"]]:
        here = f"this host's {gpu['name']} ({gpu['compute_capability']})" if gpu else "this host (no CUDA GPU)"
        raise UserError(
            f"a refittable TensorRT-RTX engine is built on a GPU of its one target architecture, and {here} is not "
            f"{' or '.join(wanted) or 'one'}; run `build --refittable --target auto` on the RTX GPU itself, or build "
            "here without --refittable (LoRAs then need --lora at export)"
        )
