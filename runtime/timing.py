"""Timing of device work without host syncs: CUDA events on the current stream, perf_counter on a CPU."""

from __future__ import annotations

import time

import torch


class Clock:
    """`stop(start())` returns a function that gives the elapsed ms; call it once the work has finished
    (after the generation's final read-back, or `sync()`), so timing never adds a sync of its own."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, begin):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return lambda: begin.elapsed_time(end)
        ms = (time.perf_counter() - begin) * 1e3
        return lambda: ms

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
