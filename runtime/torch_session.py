"""Eager PyTorch backend: the reference modules behind the same interface as the engines.

The runtime does not build these modules (that needs diffusers); the caller passes them in, typically
`zimage_trt.export.reference.reference_modules(model_dir, bundle)`, which wraps the diffusers modules exactly
as they are exported.
"""

from __future__ import annotations

import torch

from .session import check_io


class TorchSession:
    capturable = True  # pure tensor code with no host syncs

    def __init__(self, name: str, module: torch.nn.Module, device: torch.device, precision: str = "fp32"):
        self.name, self.device, self.precision = name, device, precision
        self.module = module.to(device).eval()
        self.input_names = list(module.input_names)
        self.output_names = list(module.output_names)

    def close(self) -> None:
        """Drop the module (its weights go once nothing else holds them)."""
        self.module = None

    @torch.no_grad()
    def run(self, inputs, outputs) -> None:
        check_io(self.name, inputs, self.input_names)
        result = self.module(*(inputs[n] for n in self.input_names))
        outputs[self.output_names[0]].copy_(result)
