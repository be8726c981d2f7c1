"""CUDA graphs of one torch session, one per input shape: the text encoder per caption-length bucket, the VAE per
image size.

The text encoder is launch-bound (35 layers on ~100 tokens: hundreds of small kernels whose launches cost more
than their math), the VAE a few hundred kernels; a replayed graph launches them all at once. Each graph owns
static inputs (the caller's tensors are copied in) and a static output (copied out by the session). It is
captured on a side stream after one uncaptured run of the same shape (lazy initialisation, cuDNN's algorithm
search and torch.compile's compilation must not land in the graph) and replayed on the current stream, so it
orders with the runtime's other work on its stream.

Memory: the graphs capture into one pool, which the runtime may hand over (`use_pool`) so that they share the
denoising loop's pool. That is safe for the same reason the loops share it: everything runs in turn on one
stream, each graph's temporaries are dead when it ends, and its static output stays allocated (a pool never
hands out memory that is still in use).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

log = logging.getLogger("zimage_trt")

MAX_GRAPHS = 16  # per session: every caption bucket (512 / 32), or 16 image sizes


@dataclass
class Recorded:
    graph: torch.cuda.CUDAGraph
    inputs: list  # static input tensors
    output: torch.Tensor  # static output, written by each replay


class ShapeGraphs:
    """Per-shape CUDA graphs of `fn` (tensors in, one tensor out), in a bounded LRU."""

    def __init__(self, name: str, device: torch.device, max_graphs: int = MAX_GRAPHS):
        self.name, self.device, self.max_graphs = name, device, max_graphs
        self.graphs: OrderedDict[tuple, Recorded] = OrderedDict()
        self.pool = None  # the memory pool the graphs capture into (the runtime's, once it hands it over)
        self.enabled = True  # false for good after a failed capture: the session then runs eagerly
        self._stream: torch.cuda.Stream | None = None

    def use_pool(self, pool) -> None:
        self.pool = pool

    def run(self, fn, inputs: list) -> torch.Tensor:
        """fn(*inputs), replayed from the graph of these shapes (captured at the first call of a shape)."""
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, fn, inputs)
            if entry is None:
                return fn(*inputs)
        else:
            self.graphs.move_to_end(key)
        for static, x in zip(entry.inputs, inputs):
            static.copy_(x)
        entry.graph.replay()  # on the current stream
        return entry.output

    def _capture(self, key, fn, inputs) -> Recorded | None:
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)[1].graph.reset()
        static = [x.clone() for x in inputs]
        fn(*static)  # uncaptured first: lazy initialisation, algorithm search, compilation
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            # torch.cuda.graph synchronises the device first, so the side stream sees the run above
            with torch.cuda.graph(graph, pool=self.pool, stream=self._stream, capture_error_mode="thread_local"):
                output = fn(*static)
        except Exception as exc:  # noqa: BLE001 - the capture has ended; nothing it recorded has run
            graph.reset()
            self.enabled = False
            self.close()
            log.warning("%s: CUDA graph capture failed (%s: %s); it runs eagerly from now on (same results)",
                        self.name, type(exc).__name__, exc)
            return None
        if self.pool is None:
            self.pool = graph.pool()  # this session's graphs share one pool until the runtime hands over its own
        self.graphs[key] = Recorded(graph, static, output)
        return self.graphs[key]

    def close(self) -> None:
        while self.graphs:
            self.graphs.popitem(last=False)[1].graph.reset()
