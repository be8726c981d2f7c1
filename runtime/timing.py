"""Timing of device work without host syncs: CUDA events on the work's stream, perf_counter on a CPU."""

from __future__ import annotations

import time

import torch


class Clock:
    """`stop(start())` returns a function that gives the elapsed ms; call it once the work has finished
    (after the generation's final read-back, or `sync()`), so timing never adds a sync of its own."""

    def __init__(self, device: torch.device, stream: "torch.cuda.Stream | None" = None):
        """stream: where the timed work runs (the runtime's own stream); None: the current stream."""
        self.cuda = torch.device(device).type == "cuda"
        self.stream = stream

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(self.stream)
            return event
        return time.perf_counter()

    def stop(self, begin):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record(self.stream)
            return lambda: begin.elapsed_time(end)
        ms = (time.perf_counter() - begin) * 1e3
        return lambda: ms

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
