"""Which fused attention kernel each network of the torch backend runs, chosen by measurement, and said.

PyTorch's scaled_dot_product_attention picks among flash, cuDNN, memory-efficient and the unfused math path by a
fixed priority and what each supports. The fastest for a given shape differs by GPU and library (cuDNN's attention
leads on Hopper for Z-Image's 30 heads of 128 in bf16; flash does not take the VAE's single head of 512). So the
session records the attention calls of one eager run, times each fused kernel on those shapes, and puts the
fastest first for every later call (compiled code keeps what was first when it was traced). The math path stays
last, for a call no fused kernel takes. On a CPU nothing is timed: PyTorch's own order stands.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

NAMES = {SDPBackend.FLASH_ATTENTION: "flash", SDPBackend.CUDNN_ATTENTION: "cuDNN",
         SDPBackend.EFFICIENT_ATTENTION: "efficient", SDPBackend.MATH: "math"}
FUSED = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


class AttentionCalls(TorchFunctionMode):
    """Records (q, k, v shapes, dtype, keyword arguments) of each attention call made inside it, with a count."""

    def __init__(self):
        super().__init__()
        self.calls: dict[tuple, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            extra = tuple(sorted((n, _describe(a)) for n, a in kwargs.items()))
            key = (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, extra)
            self.calls[key] = self.calls.get(key, 0) + 1
        return func(*args, **kwargs)


class Attention:
    """The attention kernel order of one network; `context()` applies it around a call."""

    def __init__(self, device: torch.device):
        self.device = device
        self.order: list | None = None  # None: PyTorch's own
        self.ran = "none"  # what the recorded calls run, e.g. "cuDNN" or "flash+efficient"
        self.timed: dict[str, float] = {}  # ms of every recorded call on each fused kernel that takes them all

    def choose(self, calls: dict[tuple, int]) -> None:
        if self.device.type == "cuda" and calls:
            times = {b: _total_ms(b, calls, self.device) for b in FUSED}
            fused = sorted((b for b in FUSED if times[b] < float("inf")), key=times.get)
            self.order = fused + [SDPBackend.MATH]
            self.timed = {NAMES[b]: times[b] for b in fused}
        with self.context():
            self.ran = "+".join(sorted({_chosen(key, self.device) for key in calls})) or "none"

    def context(self):
        return sdpa_kernel(self.order, set_priority=True) if self.order else contextlib.nullcontext()


def _describe(arg):
    """A keyword argument as a hashable value; a tensor (a mask) by its shape and dtype."""
    return ("tensor", tuple(arg.shape), arg.dtype) if isinstance(arg, torch.Tensor) else arg


def _inputs(key, device):
    q_shape, k_shape, v_shape, dtype, extra = key
    q, k, v = (torch.randn(s, device=device, dtype=dtype) for s in (q_shape, k_shape, v_shape))
    kwargs = {n: torch.zeros(a[1], dtype=a[2], device=device) if isinstance(a, tuple) and a[:1] == ("tensor",) else a
              for n, a in extra}
    return q, k, v, kwargs


def _chosen(key, device) -> str:
    q, k, v, kwargs = _inputs(key, device)
    return NAMES.get(SDPBackend(torch._fused_sdp_choice(q, k, v, **kwargs)), "other")


def _total_ms(backend, calls: dict[tuple, int], device, reps: int = 5) -> float:
    """Time of every recorded call on `backend` (each shape timed, times its count); inf if it takes any not."""
    total = 0.0
    for key, count in calls.items():
        q, k, v, kwargs = _inputs(key, device)
        try:
            with sdpa_kernel([backend]), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # why a kernel does not apply: the inf says it
                for _ in range(2):
                    F.scaled_dot_product_attention(q, k, v, **kwargs)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps):
                    F.scaled_dot_product_attention(q, k, v, **kwargs)
                end.record()
                end.synchronize()
        except RuntimeError:  # this kernel does not take the shape, dtype or arguments
            return float("inf")
        total += start.elapsed_time(end) / reps * count
    return total
