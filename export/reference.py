"""The eager reference modules for a bundle: the diffusers/transformers modules wrapped exactly as exported.

These back the runtime's `torch` backend and every parity comparison. They are built from the original model
directory, so they need diffusers; the runtime itself only receives them.
"""

from __future__ import annotations

import torch

from . import checkpoint
from .fp16 import fold_rescale
from .modules import DiTForExport, TextEncoderForExport, VaeDecoderForExport


def reference_modules(model_dir, dtype=torch.float32, device="cpu", fp16_scales: dict | None = None,
                      networks=("text_encoder", "transformer", "vae_decoder")) -> dict:
    """{network name: module} in the given precision, on `device`; they take any image size.

    In fp16, pass the bundle's `fp16_scales`: the transformer is then rescaled exactly as the exported graph
    (without them plain fp16 can overflow, see fp16.py), which makes it the graph's eager twin. Each network is
    loaded straight into its precision on `device`, and folded there, as the export does: the same weights, bit
    for bit, and no float32 copy of the transformer anywhere (24.6 GB at full size).
    """
    out = {}
    if "text_encoder" in networks:
        out["text_encoder"] = TextEncoderForExport(checkpoint.load_text_encoder(model_dir, dtype, device), dtype)
    if "transformer" in networks:
        dit = checkpoint.load_transformer(model_dir, dtype, device)
        folded = dtype == torch.float16 and bool(fp16_scales)
        if folded:
            fold_rescale(dit, fp16_scales)
        out["transformer"] = DiTForExport(dit, dtype, inplace=True)
        out["transformer"].fp16_folded = folded  # a LoRA delta is rescaled alike
    if "vae_decoder" in networks:
        vae_dtype = torch.bfloat16 if dtype == torch.float16 else dtype  # the Flux VAE overflows in fp16
        out["vae_decoder"] = VaeDecoderForExport(checkpoint.load_vae(model_dir, vae_dtype, device), vae_dtype)
    return out


def float32_reference(load, wrap, device, offload: bool | None = None) -> torch.nn.Module:
    """`wrap(load())`: a float32 reference to check an exported graph against, runnable on `device`.

    On a GPU its weights stay in host memory and accelerate moves each layer's weights to the GPU only while that
    layer runs (`cpu_offload`), so the GPU holds the exported network and one layer of its reference, never two
    copies of the weights. Wrap before offloading: the export wrappers cut and re-route the libraries' modules,
    and the offload hooks must sit on what is actually called. `offload`: None offloads on a GPU only.
    """
    model = wrap(load(torch.float32, "cpu"))
    if offload if offload is not None else torch.device(device).type != "cpu":
        from accelerate import cpu_offload

        cpu_offload(model, execution_device=torch.device(device))
    return model


def one_pass_inputs(caption_dim: int, width: int, height: int, device) -> tuple:
    """The transformer's inputs for a one-pass check at (width, height): seeded latents, a mid-schedule
    timestep, and a 32-row padded caption of 21 real tokens."""
    g = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(1, 16, height // 8, width // 8, generator=g)
    caption = torch.randn(1, 32, caption_dim, generator=g)
    return tuple(t.to(device) for t in (latents, torch.tensor([0.6]), caption, torch.tensor([21], dtype=torch.int64)))
