"""onnxruntime backend: the bundle's ONNX graphs, bound to the caller's torch tensors with IOBinding."""

from __future__ import annotations

import numpy as np
import torch

from zimage_trt.common.errors import UserError, require

from .lora import graph_weight_key, read_initializers
from .session import check_io

_NP = {torch.float32: np.float32, torch.int64: np.int64, torch.float16: np.float16, torch.int32: np.int32}


class OrtSession:
    capturable = False  # onnxruntime runs on its own streams

    def __init__(self, name: str, path, precision: str, device: torch.device, threads: int = 0):
        ort = require("onnxruntime", "pip install onnxruntime  (or onnxruntime-gpu for CUDA)")
        self.name, self.device, self.precision = name, device, precision
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError(
                    "onnxruntime here has no CUDA provider; install onnxruntime-gpu, or run with --device cpu"
                )
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
            self.ort_device = ("cuda", device.index or 0)
        else:
            if precision == "bf16":
                raise UserError(
                    f"{name} is a BF16 graph and onnxruntime's CPU provider has no BF16 kernels;"
                    " re-export with fp32 for this network (e.g. --vae-precision fp32) or use another backend"
                )
            providers = ["CPUExecutionProvider"]
            self.ort_device = ("cpu", 0)
        self.path, self.providers, self.threads = path, providers, threads
        self.overrides: dict = {}  # initializer name -> OrtValue replacing it (LoRA); kept alive with the session
        self._open()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _open(self) -> None:
        ort = require("onnxruntime", "pip install onnxruntime")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        for name, value in self.overrides.items():
            options.add_initializer(name, value)
        self.session = ort.InferenceSession(str(self.path), options, providers=self.providers)
        self.binding = self.session.io_binding()

    # LoRA (runtime/lora.py): weights are the graph's initializers, replaced by rebuilding the session
    weight_key = staticmethod(graph_weight_key)

    def base_weights(self, keys) -> dict:
        return read_initializers(self.path, keys)

    def set_weights(self, values) -> None:
        """Run with these initializers replaced ((key, value) pairs) and every other one as the file has it (so
        none is the base, exactly): one session rebuild."""
        ort = require("onnxruntime", "pip install onnxruntime")
        self.overrides = {k: ort.OrtValue.ortvalue_from_numpy(v.cpu().numpy()) for k, v in values}
        self._open()

    def close(self) -> None:
        """Drop the onnxruntime session and its bindings."""
        self.binding = self.session = None

    def _bind(self, bind, name: str, t: torch.Tensor) -> None:
        bind(name, self.ort_device[0], self.ort_device[1], _NP[t.dtype], tuple(t.shape), t.data_ptr())

    def run(self, inputs, outputs) -> None:
        check_io(self.name, inputs, self.input_names)
        check_io(self.name, outputs, self.output_names)
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for n in self.input_names:
            self._bind(b.bind_input, n, inputs[n])
        for n in self.output_names:
            self._bind(b.bind_output, n, outputs[n])
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # onnxruntime does not wait on torch's stream
        self.session.run_with_iobinding(b)
