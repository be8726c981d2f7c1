"""Peak memory of a long job, whole and stage by stage.

`ru_maxrss` is the process's peak so far: it shows when a stage raises the peak, but a stage that stays below an
earlier one's peak (the ONNX writing after the loading, say) is hidden under it. `StagePeaks` samples the resident
set (and PyTorch's reserved GPU memory) on a thread, so each stage gets its own peak.
"""

from __future__ import annotations

import os
import resource
import threading

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def host_peak_bytes() -> int:
    """This process's peak resident host memory so far (Linux reports ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def host_now_bytes() -> int:
    """This process's resident host memory now (Linux /proc; elsewhere the peak so far, the best it has)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return host_peak_bytes()


class StagePeaks:
    """Each stage's own peak host memory and, on a GPU, PyTorch's reserved memory, sampled every `interval` s.

        peaks = StagePeaks(device)
        peaks.enter("loading"); ...; peaks.enter("exporting"); ...; peaks.close()
        peaks.stages  ->  [{"stage": "loading", "host_peak_gb": ..., "gpu_peak_gb": ...}, ...]

    Sampling misses a peak shorter than the interval; the weights of a network stay for seconds, so it sees them.
    """

    def __init__(self, device=None, interval: float = 0.05):
        self.stages: list[dict] = []
        self._cuda = device is not None and getattr(device, "type", str(device)).startswith("cuda")
        self._device, self._interval = device, interval
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread: threading.Thread | None = None

    def _gpu_now(self) -> int:
        if not self._cuda:
            return 0
        import torch

        return torch.cuda.memory_reserved(self._device)

    def _sample(self) -> None:
        host, gpu = host_now_bytes(), self._gpu_now()
        with self._lock:
            if self.stages:
                stage = self.stages[-1]
                stage["host_peak_gb"] = max(stage["host_peak_gb"], round(host / 1e9, 2))
                stage["gpu_peak_gb"] = max(stage["gpu_peak_gb"], round(gpu / 1e9, 2))

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def enter(self, name: str) -> None:
        """End the current stage (a last sample) and start `name`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="stage-peaks", daemon=True)
            self._thread.start()
        self._sample()
        with self._lock:
            self.stages.append({"stage": name, "host_peak_gb": 0.0, "gpu_peak_gb": 0.0})
        self._sample()

    def close(self) -> None:
        """End the last stage and stop sampling (again: nothing)."""
        if self._stop.is_set():
            return
        self._sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def release_memory(device) -> None:
    """Collect dropped modules and hand PyTorch's cached GPU memory back, before the next thing is loaded."""
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
