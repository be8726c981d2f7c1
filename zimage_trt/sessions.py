"""Open the three sessions of a bundle on one backend: the switch between backends lives here, once.

    onnxruntime   the bundle's ONNX graphs (CPU here; CUDA with onnxruntime-gpu)
    torch         the eager reference modules, built from the original model directory (needs diffusers)
    tensorrt      engines built by `zimage-trt build` (TensorRT or TensorRT-RTX, per the engines' sidecars)
"""

from __future__ import annotations

import torch

from zimage_trt.common.errors import UserError
from zimage_trt.runtime.bundle import NETWORKS, Bundle

BACKENDS = ("onnxruntime", "torch", "tensorrt")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: this project runs on cpu or cuda, not {dev.type}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: PyTorch sees no CUDA GPU here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise UserError(f"--device {device}: this machine has {n} CUDA GPU{'s' if n > 1 else ''} (cuda:0..cuda:{n - 1})")
    return dev


def open_sessions(
    backend: str,
    bundle: Bundle,
    device: torch.device,
    model_dir=None,
    engines=None,
    torch_dtype: str = "fp32",
    weight_budget: int | None = None,
    vram: str = "all",
) -> dict:
    """The three sessions of `bundle` on `backend`. vram="sequential": nothing is left on the GPU at load beyond
    what one group needs (the runtime's --vram sequential then moves the groups in turn)."""
    sequential = vram == "sequential" and device.type == "cuda"
    quantized = (bundle.network("transformer").get("quantization") or {}).get("format")
    if backend == "onnxruntime":
        from zimage_trt.runtime.ort_session import OrtSession

        if quantized == "nvfp4":
            raise UserError("this bundle's transformer is nvfp4 and onnxruntime has no FP4 kernels: run it with "
                            "--backend tensorrt on a Blackwell GPU (sm100, sm120), or export an fp8 bundle for "
                            "onnxruntime")

        return {n: OrtSession(n, bundle.onnx_path(n), bundle.network(n)["precision"], device) for n in NETWORKS}
    if backend == "torch":
        if model_dir is None:
            raise UserError("--backend torch runs the eager reference modules and needs --model DIR (the original model)")
        from zimage_trt.export.reference import reference_modules
        from zimage_trt.runtime.torch_session import TorchSession

        if quantized:
            where = ("--backend onnxruntime (any CPU) or tensorrt (sm89 and newer)" if quantized == "fp8" else
                     "--backend tensorrt (sm100, sm120)")
            raise UserError(f"--backend torch runs the unquantized eager twins; this bundle's transformer is "
                            f"{quantized}: use {where}")
        scales = bundle.network("transformer").get("fp16_scales")
        # sequential: built in host memory, moved to the GPU by the runtime when their turn comes
        mods = reference_modules(model_dir, TORCH_DTYPES[torch_dtype], "cpu" if sequential else device, scales)
        precision = {n: torch_dtype for n in mods}
        if torch_dtype == "fp16":
            precision["vae_decoder"] = "bf16"
        return {n: TorchSession(n, m, device, precision[n], resident=not sequential) for n, m in mods.items()}
    if backend == "tensorrt":
        if engines is None:
            raise UserError("--backend tensorrt needs --engines DIR (made by `zimage-trt build`)")
        from zimage_trt.runtime.trt_session import open_engine_sessions

        return open_engine_sessions(bundle, engines, device, weight_budget, sequential=sequential)
    raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
