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

    def __init__(
        self, name: str, module: torch.nn.Module, device: torch.device, precision: str = "fp32", resident: bool = True
    ):
        """resident=False (--vram sequential): the module stays in host memory until the runtime acquires it."""
        self.name, self.device, self.precision = name, device, precision
        self.module = (module.to(device) if resident else module).eval()
        self.input_names = list(module.input_names)
        self.output_names = list(module.output_names)

        self._base: dict[str, torch.Tensor] = {}  # parameters a LoRA changed, as they were (to restore exactly)
        self.weights_in_place = True  # set_weights copies into the same storage: recorded CUDA graphs stay valid

    def close(self) -> None:
        """Drop the module (its weights go once nothing else holds them)."""
        self.module = None
        self._base = {}

    # --vram sequential: the module's weights leave the GPU between uses (to host memory, then back)
    def release(self) -> None:
        if self.device.type == "cuda" and self.module is not None:
            self.module.to("cpu")
            self._base = {k: v.to("cpu") for k, v in self._base.items()}

    def acquire(self) -> None:
        if self.device.type == "cuda" and self.module is not None:
            self.module.to(self.device)
            self._base = {k: v.to(self.device) for k, v in self._base.items()}

    # LoRA (runtime/lora.py): weights are the module's parameters, changed in place
    def weight_key(self, name: str, entry: dict) -> tuple[str, bool, float]:
        # The module is rescaled for FP16 exactly as the graph only when it was built folded (fp16 with scales).
        folded = getattr(self.module, "fp16_folded", False)
        return f"transformer.{name}", False, entry["divisor"] if folded else 1.0

    def base_weights(self, keys) -> dict:
        params = dict(self.module.named_parameters())
        return {k: self._base.get(k, params[k].detach()) for k in keys}

    @torch.no_grad()
    def set_weights(self, values) -> None:
        """These parameters take these values ((key, value) pairs, taken one at a time); every other one changed
        before goes back to its base, bit for bit. The bases stay on the device: a switch is copies, no transfer."""
        params = dict(self.module.named_parameters())
        changed = set()
        for key, value in values:
            if key not in self._base:
                self._base[key] = params[key].detach().clone()
            params[key].copy_(value)
            changed.add(key)
        for key in [k for k in self._base if k not in changed]:
            params[key].copy_(self._base.pop(key))

    @torch.no_grad()
    def run(self, inputs, outputs) -> None:
        check_io(self.name, inputs, self.input_names)
        result = self.module(*(inputs[n] for n in self.input_names))
        outputs[self.output_names[0]].copy_(result)
