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
    compile: bool = False,
    fp8_on_cpu: bool = False,
) -> dict:
    """The three sessions of `bundle` on `backend`. vram="sequential": nothing is left on the GPU at load beyond
    what one group needs (the runtime's --vram sequential then moves the groups in turn). compile: torch.compile
    the torch backend's networks (--compile). fp8_on_cpu: let the torch backend run an fp8 bundle on a CPU, with
    FP8 emulated (bench's rehearsal of the FP8 system; users get onnxruntime there)."""
    if compile and backend != "torch":
        raise UserError(f"--compile is for --backend torch (torch.compile); {backend} compiles its graphs itself")
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
        return open_torch_sessions(bundle, device, model_dir, torch_dtype, sequential, compile, fp8_on_cpu)
    if backend == "tensorrt":
        if engines is None:
            raise UserError("--backend tensorrt needs --engines DIR (made by `zimage-trt build`)")
        from zimage_trt.runtime.trt_session import open_engine_sessions

        return open_engine_sessions(bundle, engines, device, weight_budget, sequential=sequential)
    raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def open_torch_sessions(bundle: Bundle, device: torch.device, model_dir, torch_dtype: str, sequential: bool,
                        compile: bool = False, fp8_on_cpu: bool = False) -> dict:
    """The reference modules as sessions; an fp8 bundle's transformer with the graph's FP8 layers on FP8 tensor
    cores (export/reference.py: graph_fp8_amax, fp8_transformer)."""
    if model_dir is None:
        raise UserError("--backend torch runs the eager reference modules and needs --model DIR (the original model)")
    from zimage_trt.export.reference import graph_fp8_amax, reference_modules
    from zimage_trt.runtime.torch_session import TorchSession

    network = bundle.network("transformer")
    quantized = (network.get("quantization") or {}).get("format")
    amax = None
    if quantized:
        _check_fp8_device(quantized, device, fp8_on_cpu)
        amax = graph_fp8_amax(bundle.onnx_path("transformer"))
    if compile and device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the VAE's convolutions: the fastest algorithm per size, found once
    # sequential: built in host memory, moved to the GPU by the runtime when their turn comes
    mods = reference_modules(model_dir, TORCH_DTYPES[torch_dtype], "cpu" if sequential else device,
                             network.get("fp16_scales"), fast=compile, fp8_amax=amax)
    precision = {n: torch_dtype for n in mods}
    if torch_dtype == "fp16":
        precision["vae_decoder"] = "bf16"
    if quantized:
        precision["transformer"] = quantized
    return {n: TorchSession(n, m, device, precision[n], resident=not sequential, compile=compile)
            for n, m in mods.items()}


def _check_fp8_device(quantized: str, device: torch.device, fp8_on_cpu: bool) -> None:
    """The torch backend runs fp8 on FP8 tensor cores (sm89+); nvfp4 not at all; a CPU only for bench's rehearsal."""
    if quantized != "fp8":
        raise UserError(f"--backend torch has no {quantized} kernels; this bundle's transformer is {quantized}: use "
                        "--backend tensorrt (sm100, sm120)")
    if device.type == "cuda":
        from zimage_trt.runtime.torch_fp8 import require_fp8_tensor_cores

        require_fp8_tensor_cores(device)
    elif not fp8_on_cpu:
        raise UserError("--backend torch runs an fp8 transformer on FP8 tensor cores (a GPU of sm89 or newer); on "
                        "this CPU use --backend onnxruntime, which emulates fp8")
