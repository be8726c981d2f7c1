"""LoRA files for the tiny model in the formats users bring: diffusers/PEFT (with its adapter config in the
metadata, lora_alpha != r) and kohya (`lora_unet_*`, lora_down/lora_up with an alpha != rank)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

# The weights a typical Z-Image LoRA trains: attention projections and the feed-forward, in every block.
TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def _blocks(transformer):
    for group in ("noise_refiner", "context_refiner", "layers"):
        for i in range(len(getattr(transformer, group))):
            yield f"{group}.{i}"


def _pairs(transformer, rank: int, seed: int, magnitude: float):
    gen = torch.Generator().manual_seed(seed)
    params = dict(transformer.named_parameters())
    for block in _blocks(transformer):
        for target in TARGETS:
            out_dim, in_dim = params[f"{block}.{target}.weight"].shape
            down = torch.randn(rank, in_dim, generator=gen) / in_dim**0.5
            up = torch.randn(out_dim, rank, generator=gen) * magnitude
            yield f"{block}.{target}", up, down


def write_peft_lora(transformer, path, rank=4, alpha=8, seed=1, magnitude=0.05) -> None:
    tensors, modules = {}, []
    for module, up, down in _pairs(transformer, rank, seed, magnitude):
        tensors[f"transformer.{module}.lora_A.weight"] = down.contiguous()
        tensors[f"transformer.{module}.lora_B.weight"] = up.contiguous()
        modules.append(module)
    # the adapter config as diffusers' save_lora_weights writes it: keys prefixed with the component
    config = {"r": rank, "lora_alpha": alpha, "target_modules": modules, "use_rslora": False}
    metadata = {f"transformer.{k}": v for k, v in config.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})


def write_kohya_lora(transformer, path, rank=8, alpha=2.0, seed=2, magnitude=0.3) -> None:
    tensors = {}
    for module, up, down in _pairs(transformer, rank, seed, magnitude):
        key = "lora_unet_" + module.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
