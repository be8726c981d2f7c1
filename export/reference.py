"""The eager reference modules for a bundle: the diffusers/transformers modules wrapped exactly as exported.

These back the runtime's `torch` backend and every parity comparison. They are built from the original model
directory, so they need diffusers; the runtime itself only receives them.
"""

from __future__ import annotations

import torch

from . import checkpoint
from .fp16 import fold_rescale
from .modules import DiTForExport, TextEncoderForExport, VaeDecoderForExport


def reference_modules(model_dir, dtype=torch.float32, device="cpu", fp16_scales: dict | None = None) -> dict:
    """{network name: module} in the given precision, on `device`; they take any image size.

    In fp16, pass the bundle's `fp16_scales`: the transformer is then rescaled exactly as the exported graph
    (without them plain fp16 can overflow, see fp16.py), which makes it the graph's eager twin.
    """
    qwen = checkpoint.load_text_encoder(model_dir, dtype, device)
    if dtype == torch.float16 and fp16_scales:
        # Folded in float32 on the host, then cast and moved: the GPU never holds the float32 transformer
        # (24.6 GB at full size, more than a 24 GB card has).
        dit = checkpoint.load_transformer(model_dir, torch.float32, "cpu")
        fold_rescale(dit, fp16_scales)
    else:
        dit = checkpoint.load_transformer(model_dir, dtype, device)
    vae_dtype = torch.bfloat16 if dtype == torch.float16 else dtype  # the Flux VAE overflows in fp16
    vae = checkpoint.load_vae(model_dir, vae_dtype, device)
    transformer = DiTForExport(dit, dtype, inplace=True).to(device)
    transformer.fp16_folded = dtype == torch.float16 and bool(fp16_scales)  # a LoRA delta is rescaled alike
    return {
        "text_encoder": TextEncoderForExport(qwen, dtype),
        "transformer": transformer,
        "vae_decoder": VaeDecoderForExport(vae, vae_dtype),
    }
