"""The two TensorRT flavours behind one name.

`tensorrt` (datacenter and workstation GPUs; builds on and for the GPU it runs on) and `tensorrt_rtx` (GeForce
and RTX GPUs; builds ahead of time for chosen compute capabilities, even without a GPU) share the network,
parser, builder and runtime API this project uses. What differs is small and lives here: which module to import,
how the build targets a GPU, and which flavour has a timing cache (TensorRT) or a runtime cache (TensorRT-RTX).

What only TensorRT-RTX has at run time (its 1.7.1 classes, introspected; TensorRT 10.15-11.1's pyCore.cpp has none
of these, so the runtime asks for them by name, never by version): `IExecutionContext.is_stream_capturable`
(since RTX 1.2), a runtime configuration with a kernel cache (`IRuntimeConfig.create_runtime_cache`,
`set_runtime_cache`; TensorRT's IRuntimeConfig sets only the allocation strategy), and deferred weight loading
(`Runtime.defer_weights_loading`, `ICudaEngine.load_weights` / `unload_weights` / `weights_loaded`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from zimage_trt.common.errors import UserError

BACKENDS = ("tensorrt", "tensorrt-rtx")
_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
_INSTALL = {
    "tensorrt": "pip install tensorrt-cu12 (CUDA 12) or tensorrt-cu13 (CUDA 13), from NVIDIA's index (pypi.nvidia.com)",
    "tensorrt-rtx": "pip install tensorrt-rtx-cu13==1.7.1.116",
}
# TensorRT's ONNX parser gained Attention in 10.14 and RMSNormalization in 10.15 (its CHANGELOG).
# TensorRT-RTX 1.7 parses both (checked here).
MIN_VERSION = {"tensorrt": (10, 15)}
FUSED_OPSET = 23  # the opset from which the exporter writes those two ops; below it they are plain ops
# TensorRT-RTX targets GeForce/RTX architectures; the datacenter Hopper and Blackwell parts are TensorRT's.
RTX_UNSUPPORTED_CC = {(9, 0), (10, 0), (10, 3)}
_LOGGERS: dict = {}  # (module id, verbose) -> the one Logger of that flavour and level


@dataclass(frozen=True)
class Flavour:
    name: str  # "tensorrt" | "tensorrt-rtx"
    trt: object  # the imported module
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt-rtx"

    def logger(self, verbose: bool = False):
        """The flavour's one logger per level: TensorRT keeps the first ILogger it is given for the process and
        warns when a Runtime, Builder or Refitter brings another, so every one of them shares this instance."""
        key = (id(self.trt), verbose)
        if key not in _LOGGERS:
            level = self.trt.Logger.INFO if verbose else self.trt.Logger.ERROR
            _LOGGERS[key] = self.trt.Logger(level)
        return _LOGGERS[key]

    def network_flags(self) -> int:
        # Strongly typed: the ONNX types decide every tensor's precision. TensorRT 11 makes it the only mode and
        # may drop the flag; TensorRT 10.x and TensorRT-RTX need it.
        flag = getattr(self.trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        return 0 if flag is None else 1 << int(flag)


def load_flavour(name: str, opset: int | None = None) -> Flavour:
    """The installed library for `name`; with the opset of the graphs to parse, also refuse a version whose ONNX
    parser cannot read them."""
    if name not in _MODULES:
        raise UserError(f"unknown engine backend {name!r}; choose tensorrt or tensorrt-rtx")
    try:
        trt = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        raise UserError(f"the Python module '{_MODULES[name]}' is not installed ({exc}); {_INSTALL[name]}") from None
    except OSError as exc:  # the wheel is there but its shared libraries are not (PyPI stub packages)
        raise UserError(f"'{_MODULES[name]}' is installed but its libraries do not load ({exc}); {_INSTALL[name]}") from None
    if not hasattr(trt, "Builder"):
        raise UserError(f"'{_MODULES[name]}' is a stub without the TensorRT libraries; {_INSTALL[name]}")
    version = str(trt.__version__)
    if opset is not None:
        check_version(name, version, opset)
    return Flavour(name, trt, version)


def check_version(name: str, version: str, opset: int) -> None:
    """Refuse a TensorRT whose ONNX parser cannot read graphs of this opset (23: Attention, RMSNormalization)."""
    floor = MIN_VERSION.get(name)
    if floor is None or opset < FUSED_OPSET:
        return
    try:
        have = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return  # a development build with no numeric version: let the parser speak for itself
    if have < floor:
        need = ".".join(map(str, floor))
        raise UserError(
            f"{name} {version} is installed; the bundles use ONNX Attention and RMSNormalization (opset 23), which "
            f"TensorRT's ONNX parser reads from {need} on; upgrade ({_INSTALL[name]}), or export with --opset 18 "
            "for an older TensorRT"
        )


def rtx_targets(flavour: Flavour, targets: list[str]) -> list:
    """Parse `sm89,sm120` into TensorRT-RTX ComputeCapability values, with a one-line error for a bad name."""
    known = {k.lower(): v for k, v in flavour.trt.ComputeCapability.__members__.items() if k.startswith("SM")}
    out = []
    for t in targets:
        key = t.strip().lower().replace("_", "")
        if key not in known:
            raise UserError(f"--target {t!r} is not a TensorRT-RTX compute capability; choose from {', '.join(sorted(known))}")
        out.append(known[key])
    return out


def cc_name(major: int, minor: int) -> str:
    return f"sm{major}{minor}"


def gpu_info(index: int = 0) -> dict | None:
    """Name and compute capability of CUDA GPU `index`, or None where PyTorch sees no GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "compute_capability": cc_name(major, minor), "cc": (major, minor)}
