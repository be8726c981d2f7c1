"""The denoising loop and its CUDA graphs.

`run_loop` is the loop itself: per pass the transformer on the latents, the caption and the pass's timestep, the
guidance combination on guided passes, and the Euler step x += dt * (-v), all on the runtime's buffers. A `Plan` is
a schedule with its per-pass rows on the device, so a recorded loop replays exactly.

`LoopRecorder` records the whole loop once per (image size, caption length, step count, guidance layout) in a CUDA
graph and replays it, so the host does constant work per image. The graphs live in a bounded LRU and share one
memory pool: memory is bounded by the largest single loop, however many are cached. If a capture is refused or
fails, it is ended cleanly, one warning is logged, and every loop runs eagerly from then on.

The seam for the pipelines to come: img2img starts the same loop from the plan's pass that `strength` selects, with
the input step's latents; inpainting blends the noised original back outside the mask after each step; ControlNet
feeds the transformer its hints as further inputs each pass. Each is a change of what `run_loop` reads and writes
per pass, recorded in the same graph.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .guidance import GuidedRun, combine_guidance
from .scheduler import Schedule

log = logging.getLogger("zimage_trt")

MAX_CUDA_GRAPHS = 16  # e.g. every padded caption length (512 / 32) at one size, or 4 lengths at 4 sizes


@dataclass
class Plan:
    """A schedule and its rows on the device: each step reads its row, so a recorded loop replays it exactly."""

    schedule: Schedule
    t_rows: list  # [1]-shaped views: the transformer's timestep of each pass
    neg_dt_rows: list  # 0-d views: -(sigma_next - sigma) of each pass


def run_loop(rt, lpad: int, plan: Plan, cfg: "GuidedRun | None" = None) -> None:
    """Every pass and Euler step of `plan` over rt.latents, in place, eagerly (guided where `cfg` says); what a
    recorded loop replays."""
    feeds, out = rt.feeds(lpad), {"velocity": rt.velocity}
    guided = cfg.guided if cfg is not None else (False,) * plan.schedule.passes
    for t_row, neg_dt, guide in zip(plan.t_rows, plan.neg_dt_rows, guided):
        rt.timestep.copy_(t_row)
        rt.transformer.run(feeds, out)
        if guide:
            rt.transformer.run(rt.feeds(cfg.neg_lpad, negative=True), {"velocity": rt.neg_velocity})
            combine_guidance(rt.velocity, rt.neg_velocity, rt.cfg_scale, rt.cfg_limit, cfg.normalize)
        # Euler: x + dt * (-v); sign flips are exact, so this equals the reference bit for bit.
        rt.velocity.mul_(neg_dt)
        rt.latents.add_(rt.velocity)


class LoopRecorder:
    """The runtime's recorded loops (see the module docstring). `enabled` turns false for good after a refusal."""

    def __init__(self, rt, enabled: bool, max_graphs: int = MAX_CUDA_GRAPHS):
        self.rt = rt  # whose buffers, sessions, stream and size the loops record
        self.enabled = enabled
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, torch.cuda.CUDAGraph] = OrderedDict()
        self.pool = None  # one memory pool for every captured loop (they never run at the same time)
        self.evicted = 0
        self.failures = 0  # captures refused or failed; after the first the loop runs eagerly

    def graph_for(self, lpad: int, plan: Plan, cfg: "GuidedRun | None" = None) -> "torch.cuda.CUDAGraph | None":
        """The recorded loop for this size, caption length, plan and guidance layout; None if it cannot be
        recorded (then the runtime warns once, counts it in `cuda_graph_failures`, and runs every loop eagerly
        from then on)."""
        rt = self.rt
        key = (rt.size, lpad, plan.schedule.passes, cfg)
        graph = self.graphs.get(key)
        if graph is not None:
            self.graphs.move_to_end(key)
            return graph
        while len(self.graphs) >= self.max_graphs:
            self._evict_oldest()
        feeds = rt.feeds(lpad)
        # An engine gives recorded shapes a context each (others share one); they go with the last graph using them.
        shapes = [self._feed_shapes(rt.size, n) for n in ([lpad, cfg.neg_lpad] if cfg is not None else [lpad])]
        for s in shapes:
            getattr(rt.transformer, "record_shapes", lambda _: None)(s)
        # One eager pass first: engines and kernels initialise lazily, and that must not land in the graph
        # (TensorRT: run once after a shape change before capturing, NVIDIA/TensorRT#3011).
        rt.transformer.run(feeds, {"velocity": rt.velocity})
        if cfg is not None:
            rt.transformer.run(rt.feeds(cfg.neg_lpad, negative=True), {"velocity": rt.neg_velocity})
        torch.cuda.synchronize(rt.device)
        capturable = getattr(rt.transformer, "stream_capturable", None)
        try:  # deciding may fail too (a library without the query, a driver error): that is a refusal as well
            refused = capturable is not None and not capturable(feeds, rt.stream)
            why = "the engine says this stream cannot be captured (is_stream_capturable)"
        except Exception as exc:  # noqa: BLE001 - nothing was captured; the loop runs eagerly
            refused, why = True, f"could not ask whether the stream can be captured ({type(exc).__name__}: {exc})"
        if refused:
            self.stop(why)
            for s in shapes:
                getattr(rt.transformer, "release_shapes", lambda _: None)(s)
            return None
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # Sharing the pool is safe: each loop frees all its temporaries before it ends and writes only the
        # runtime's own buffers, and the loops run one at a time on one stream. "thread_local": work that other
        # threads enqueue meanwhile (TensorRT-RTX compiles kernels in background threads) is not captured and
        # does not break the capture.
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=rt.stream, capture_error_mode="thread_local"):
                run_loop(rt, lpad, plan, cfg)
        except Exception as exc:  # noqa: BLE001 - the capture has ended; nothing it recorded has run
            graph.reset()
            self.stop(f"CUDA graph capture failed ({type(exc).__name__}: {exc})")
            for s in shapes:
                getattr(rt.transformer, "release_shapes", lambda _: None)(s)
            return None
        self.graphs[key] = graph
        return graph

    def stop(self, why: str) -> None:
        self.failures += 1
        if self.enabled:
            log.warning("%s; the denoising loop runs eagerly from now on (same results, more host work)", why)
        self.enabled = False
        self.drop()

    def drop(self) -> None:
        while self.graphs:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        (size, lpad, _, cfg), graph = self.graphs.popitem(last=False)
        graph.reset()  # frees the graph's executable now, not whenever Python collects it
        self.evicted += 1
        release = getattr(self.rt.transformer, "release_shapes", None)
        if release is None:
            return
        in_use = {(k[0], k[1]) for k in self.graphs} | {(k[0], k[3].neg_lpad) for k in self.graphs if k[3]}
        for length in {lpad, cfg.neg_lpad} if cfg else {lpad}:
            if (size, length) not in in_use:
                release(self._feed_shapes(size, length))  # no cached graph uses that shape's context any more

    def _feed_shapes(self, size: tuple[int, int], lpad: int) -> dict[str, tuple]:
        return {
            "latents": self.rt.bundle.latent_shape_for(*size),
            "timestep": (1,),
            "cap_feats": (1, lpad, self.rt.bundle.caption_dim),
            "cap_len": (1,),
        }

    def close(self) -> None:
        self.drop()
        self.pool = None
