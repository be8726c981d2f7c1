"""onnxruntime backend: the bundle's ONNX graphs, bound to the caller's torch tensors with IOBinding.

On a CPU it is the reference backend of the project's tests. On a GPU (onnxruntime-gpu) each network is one
session, created once, on the CUDA provider (runtime/ort_cuda.py says with what): bound by address to the
runtime's buffers, enqueued on the session's torch stream with no host wait, and placed node by node where its
report says (runtime/ort_placement.py), printed once when the session opens.

`capturable` is False: the runtime's own torch CUDA graph cannot hold an onnxruntime run (onnxruntime allocates
from its arena inside a run, and its own graph replay is a cudaGraphLaunch, which CUDA refuses inside another
capture). The transformer records itself instead, where onnxruntime's rules allow: one onnxruntime CUDA graph
per input layout (image size and caption length), replayed for every later pass of that layout; the runtime's
Euler steps between the passes stay eager torch kernels on the same stream.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import numpy as np
import torch

from zimage_trt.common.errors import UserError, require

from .lora import graph_weight_key, read_initializers
from .ort_cuda import (CUDA_EP, SKIP_GRAPH, GraphSlots, graph_refusal, gpu_build_missing, io_key, missing_kernel,
                       providers_for, require_cuda_provider, run_options, session_options)
from .session import check_io

_NP = {torch.float32: np.float32, torch.int64: np.int64, torch.float16: np.float16, torch.int32: np.int32}
MAX_BINDINGS = 32  # bound I/O layouts kept per session (each is a handful of pointers)
_STREAMS: dict[int, torch.cuda.Stream] = {}


def ort_stream(device: torch.device) -> "torch.cuda.Stream":
    """The one stream every onnxruntime session of a GPU enqueues on (`device` with its index): the three
    networks run in order on it; work on another stream is ordered against it with events (OrtSession.run)."""
    if device.index not in _STREAMS:
        _STREAMS[device.index] = torch.cuda.Stream(device)
    return _STREAMS[device.index]


class OrtSession:
    capturable = False  # see the module's docstring

    def __init__(self, name: str, path, precision: str, device: torch.device, threads: int = 0, stream=None,
                 cuda_graph: bool | None = None, model_bytes: bytes | None = None):
        """`cuda_graph` (GPU only): record the runs in onnxruntime CUDA graphs (default: the transformer alone,
        the one network run many times per image). `model_bytes`: run this graph instead of the file's (its
        external weights read beside `path`)."""
        ort = require("onnxruntime", "pip install onnxruntime  (or onnxruntime-gpu for CUDA)")
        self.name, self.precision, self.path = name, precision, path
        self.threads, self.model_bytes = threads, model_bytes
        self.cuda = device.type == "cuda"
        self.device = self._on_gpu(ort, device, stream) if self.cuda else self._on_cpu(device)
        self.ort_device = ("cuda", self.device.index) if self.cuda else ("cpu", 0)
        self.cuda_graph = self.cuda and (name == "transformer" if cuda_graph is None else cuda_graph)
        self.overrides: dict = {}  # initializer name -> OrtValue replacing it (LoRA); kept alive with the session
        self.report: str | None = None
        self._open()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        if self.report:
            print(self.report, file=sys.stderr, flush=True)

    def _on_gpu(self, ort, device: torch.device, stream) -> torch.device:
        """The CUDA device with its index (one for the provider, the stream and the bindings), once onnxruntime
        is known to be a GPU build; the stream the provider will enqueue on."""
        missing = gpu_build_missing(ort)
        if missing:
            raise UserError(missing)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.zeros(1, device=device)  # torch's CUDA libraries loaded first: onnxruntime-gpu links the same ones
        self.stream = stream or ort_stream(device)
        return device

    def _on_cpu(self, device: torch.device) -> torch.device:
        if self.precision == "bf16":
            raise UserError(
                f"{self.name} is a BF16 graph and onnxruntime's CPU provider has no BF16 kernels;"
                " re-export with fp32 for this network (e.g. --vae-precision fp32) or use another backend"
            )
        return device

    # ------------------------------------------------------------------ opening
    def _open(self) -> None:
        """(Re)create the session; on a GPU also its placement, CUDA-graph slots and report."""
        ort = require("onnxruntime", "pip install onnxruntime")
        self._bindings: OrderedDict = OrderedDict()
        self._run_opts: dict = {}
        self.graphs, self.graph_note = None, None
        self.session, self.records = self._create(ort, self.cuda_graph)
        if self.cuda:
            self._check_placement(ort)

    def _create(self, ort, cuda_graph: bool) -> tuple:
        """(InferenceSession, whether it records CUDA graphs); where onnxruntime refuses to record this graph, the
        same session eagerly, with the reason kept for the report."""
        stream = self.stream.cuda_stream if self.cuda else None
        external = self.path.parent if self.model_bytes is not None else None
        options = session_options(ort, self.cuda, self.threads, self.overrides, external)
        source = self.model_bytes if self.model_bytes is not None else str(self.path)
        try:
            providers = providers_for(self.device, stream, cuda_graph)
            return ort.InferenceSession(source, options, providers=providers), cuda_graph
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types; anything unknown re-raised
            refused = graph_refusal(exc) if cuda_graph else None
            if refused is not None:
                self.graph_note = refused
                return self._create(ort, False)
            known = missing_kernel(exc, self.name, self.precision, ort.__version__)
            if known is not None:
                raise known from None
            raise

    def _check_placement(self, ort) -> None:
        """The placement report; the refusals it implies; the CUDA-graph slots where the rules hold."""
        from .ort_placement import Placement, precision_refusal

        require_cuda_provider(self.session, self.name)
        self.placement = Placement.of(self.session, self._model_proto(), CUDA_EP)
        refusal = precision_refusal(self.name, self.precision, self.placement, ort.__version__)
        if refusal is not None:
            raise refusal
        blockers = self.placement.graph_blockers()
        if self.records and not blockers:
            self.graphs = GraphSlots(release=getattr(self.session, "release_captured_graph", None))
        elif self.records:
            self.graph_note = f"eager: {'; '.join(blockers)}"
        self.report = (f"onnxruntime CUDA, {self.name} ({self.precision}): {self.placement.describe()}; "
                       f"{self.graph_line()}")

    def graph_line(self) -> str:
        """Which way this session's runs go on the GPU, in a few words."""
        if self.graphs is not None:
            return "CUDA graph: one per input layout, recorded after onnxruntime's warm-up runs, replayed after"
        if self.graph_note:
            return f"CUDA graph: off ({self.graph_note})"
        return "CUDA graph: off (eager)"

    def _model_proto(self):
        import onnx

        if self.model_bytes is not None:
            return onnx.load_from_string(self.model_bytes)
        return onnx.load(str(self.path), load_external_data=False)

    # ------------------------------------------------------------------ LoRA
    # weights are the graph's initializers, replaced by rebuilding the session (runtime/lora.py)
    weight_key = staticmethod(graph_weight_key)

    def base_weights(self, keys) -> dict:
        return read_initializers(self.path, keys)

    def set_weights(self, values) -> None:
        """Run with these initializers replaced ((key, value) pairs) and every other one as the file has it (so
        none is the base, exactly): one session rebuild (its recorded CUDA graphs go with the old one)."""
        ort = require("onnxruntime", "pip install onnxruntime")
        self.overrides = {k: ort.OrtValue.ortvalue_from_numpy(v.cpu().numpy()) for k, v in values}
        self._open()

    def close(self) -> None:
        """Drop the onnxruntime session, its bindings and its recorded graphs."""
        self.session = self.graphs = None
        self._bindings = OrderedDict()

    # ------------------------------------------------------------------ running
    def _binding_for(self, key: tuple, inputs, outputs):
        """The IOBinding of this layout, made at its first run (addresses and shapes are the key)."""
        binding = self._bindings.get(key)
        if binding is not None:
            self._bindings.move_to_end(key)
            return binding
        binding = self.session.io_binding()
        kind, index = self.ort_device
        for n in self.input_names:
            t = inputs[n]
            binding.bind_input(n, kind, index, _NP[t.dtype], tuple(t.shape), t.data_ptr())
        for n in self.output_names:
            t = outputs[n]
            binding.bind_output(n, kind, index, _NP[t.dtype], tuple(t.shape), t.data_ptr())
        self._bindings[key] = binding
        while len(self._bindings) > MAX_BINDINGS:
            self._bindings.popitem(last=False)
        return binding

    def _options_for(self, key: tuple):
        """RunOptions of this layout: its CUDA-graph id where the session records, else a plain GPU run."""
        # a recording session given no id would record under onnxruntime's default one: say "skip" instead
        graph_id = SKIP_GRAPH if self.records else None
        if self.graphs is not None:
            graph_id = self.graphs.id_for(key)
        if graph_id not in self._run_opts:
            self._run_opts[graph_id] = run_options(require("onnxruntime", "pip install onnxruntime"), graph_id)
        return self._run_opts[graph_id]

    def run(self, inputs, outputs) -> None:
        check_io(self.name, inputs, self.input_names)
        check_io(self.name, outputs, self.output_names)
        key = io_key({n: inputs[n] for n in self.input_names}, {n: outputs[n] for n in self.output_names})
        binding = self._binding_for(key, inputs, outputs)
        if not self.cuda:
            self.session.run_with_iobinding(binding)
            return
        options = self._options_for(key)
        caller = torch.cuda.current_stream(self.device)
        if caller != self.stream:
            self.stream.wait_stream(caller)  # the inputs were written on the caller's stream
        self.session.run_with_iobinding(binding, options)
        if caller != self.stream:
            caller.wait_stream(self.stream)  # the caller reads the outputs, or frees the inputs, after the run
