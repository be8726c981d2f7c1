"""torch.compile for the torch backend (`--compile`): what is compiled, where the compiled code is kept, and how
long it took.

What: the regions a module names in `compile_regions` (the text encoder's decoder layers, the transformer's refiner
and main blocks), each compiled whole (fullgraph) with static shapes, or the module itself when it names none (the
VAE). The layers of a stack share one compiled graph per input shape: dynamo traces one layer, not 35 or 34, and
inductor emits its kernels once, while nothing is lost at the seams (between two blocks there is no other op to
fuse). Static shapes: each image size and caption bucket gets kernels specialised to it, compiled once, then
recorded in a CUDA graph (the runtime's loop, or the session's own for the text encoder and the VAE).

Where: inductor's FX-graph and AOT caches on disk, in ZIMAGE_TRT_COMPILE_CACHE (default
~/.cache/zimage-trt/torch-compile), or TORCHINDUCTOR_CACHE_DIR if that is set: a second process reuses the
generated kernels and pays only the tracing.

How long: the first call of each (network, input shape) is timed on its own and printed once, so a benchmark's
warm-up absorbs it and its timed runs never see it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

CACHE_ENV = "ZIMAGE_TRT_COMPILE_CACHE"
# Dynamo keeps its compiled entries per code object, and every compiled region enters through Module._call_impl:
# three block kinds x every (size, caption bucket) pass the default limit of 8, where fullgraph makes the next
# shape an error. Each entry is a few guards, checked on the host (not at all once a CUDA graph replays).
RECOMPILE_LIMIT = 4096


def cache_dir() -> Path:
    chosen = os.environ.get(CACHE_ENV) or os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zimage-trt" / "torch-compile"


def prepare() -> Path:
    """Point inductor at the persistent cache and lift dynamo's per-function limits; returns the cache folder."""
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor

    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)  # read by inductor at each lookup
    inductor.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
    return folder


def compile_regions(module: torch.nn.Module) -> int:
    """Compile `module`'s regions in place (module.compile: its calls go through the compiled code); returns how
    many."""
    regions = getattr(module, "compile_regions", None) or [module]
    for region in regions:
        region.compile(fullgraph=True, dynamic=False)
    return len(regions)


class CompileLog:
    """The first call of each input shape of one network, timed and printed once."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device = name, device
        self.seconds: dict[tuple, float] = {}  # per input shape: the call that compiled it

    def call(self, key: tuple, fn, *args):
        if key in self.seconds:
            return fn(*args)
        self._sync()
        start = time.perf_counter()
        result = fn(*args)
        self._sync()
        self.seconds[key] = time.perf_counter() - start
        shape = " ".join("x".join(map(str, s)) for s in key)
        print(f"torch.compile {self.name} [{shape}]: {self.seconds[key]:.1f} s (cache {cache_dir()})",
              file=sys.stderr, flush=True)
        return result

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def cache_counters() -> dict:
    """Inductor's FX-graph cache hits and misses in this process (what a second process saves)."""
    from torch._dynamo.utils import counters

    return {k: counters["inductor"][k] for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}
