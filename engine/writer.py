"""The build's progress bar and the plan streamed to its file as the builder serializes it."""

from __future__ import annotations

import hashlib

from .trt_api import Flavour


def progress_monitor(flavour: Flavour, bar):
    """An IProgressMonitor that drives a tqdm bar with the builder's top-level phase and names the inner one."""
    trt = flavour.trt

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.top = None

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None and self.top is None:
                self.top = phase_name
                bar.reset(total=max(int(num_steps), 1))
            bar.set_postfix_str(phase_name[:40])

        def step_complete(self, phase_name, step):
            if phase_name == self.top:
                bar.n = int(step) + 1
                bar.refresh()
            return True  # keep building

        def phase_finish(self, phase_name):
            if phase_name == self.top:
                self.top = None

    return Monitor()


def stream_writer(flavour: Flavour, f):
    trt = flavour.trt

    class Writer(trt.IStreamWriter):
        def __init__(self):
            trt.IStreamWriter.__init__(self)
            self.sha = hashlib.sha256()
            self.n = 0
            self.error: OSError | None = None  # the builder only sees "0 bytes written"; the cause is kept here

        def write(self, data):
            view = memoryview(data)
            try:
                f.write(view)
            except OSError as exc:
                self.error = self.error or exc
                return 0
            self.sha.update(view)
            self.n += view.nbytes
            return view.nbytes

    return Writer()
