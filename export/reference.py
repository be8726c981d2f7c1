"""The eager reference modules for a bundle: the diffusers/transformers modules wrapped exactly as exported.

These back the runtime's `torch` backend and every parity comparison. They are built from the original model
directory, so they need diffusers; the runtime itself only receives them.
"""

from __future__ import annotations

import torch

from . import checkpoint
from .modules import DiTForExport, TextEncoderForExport, VaeDecoderForExport


def reference_modules(model_dir, height: int, width: int, dtype=torch.float32, device="cpu") -> dict:
    """{network name: module} at the given resolution and precision, on `device`."""
    h, w = height // 8, width // 8
    qwen = checkpoint.load_text_encoder(model_dir, dtype, device)
    dit = checkpoint.load_transformer(model_dir, dtype, device)
    vae = checkpoint.load_vae(model_dir, dtype, device)
    return {
        "text_encoder": TextEncoderForExport(qwen, dtype),
        "transformer": DiTForExport(dit, h, w, dtype, inplace=True).to(device),
        "vae_decoder": VaeDecoderForExport(vae, dtype),
    }
