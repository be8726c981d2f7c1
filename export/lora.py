"""Read a LoRA in any format diffusers knows, and turn it into the bundle's own low-rank pairs (or bake it in).

diffusers' `ZImageLoraLoaderMixin.lora_state_dict` does the format work: diffusers/PEFT (`lora_A`/`lora_B`, with
the adapter config in the file's metadata), kohya (`lora_unet_*`, `lora_down`/`lora_up`, `alpha`), ComfyUI
(`diffusion_model.*`) and the dotted and fused-qkv trainer formats all come out as PEFT keys, with kohya's
alpha / rank folded into the pair. What remains here is PEFT's own scaling (lora_alpha / r from the adapter
config, per module with its patterns; / sqrt(r) with rsLoRA) and the check that every pair fits a weight.

The result, per transformer weight the LoRA changes: up [out, r] (scaling folded in) and down [r, in], so that
the weight becomes W + strength * up @ down.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from zimage_trt.common.errors import UserError
from zimage_trt.common.files import sha256_of, write_atomic, writing
from zimage_trt.runtime.lora import LORA_FORMAT, LORA_VERSION, bundle_weights, metadata_json

from .checkpoint import check_safetensors

_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def _adapter_scaling(module: str, rank: int, config: dict | None) -> float:
    """PEFT's scaling of one module: lora_alpha / r (alpha_pattern first), / sqrt(r) with rsLoRA; 1 without a
    config (diffusers then takes alpha = rank)."""
    if not config:
        return 1.0
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            alpha = value
            break
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def read_lora(path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{transformer parameter name: (up [out, r] with its scaling, down [r, in])} in float32."""
    from diffusers import ZImagePipeline

    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA {path}: no such file")
    if path.suffix == ".safetensors":
        check_safetensors(f"LoRA {path.name}", path)  # a truncated download is one line, before diffusers
    try:
        state, config = ZImagePipeline.lora_state_dict(str(path), return_lora_metadata=True)
    except Exception as exc:  # noqa: BLE001 - whatever diffusers raises about the file is the user's one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"LoRA {path} cannot be read as a Z-Image LoRA: {first[:300]}") from None
    if config:
        config = {k.removeprefix("transformer."): v for k, v in config.items()}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(state):
        m = _PAIR.match(key.removeprefix("transformer."))
        if m is None:
            raise UserError(f"LoRA {path}: key '{key}' is not a LoRA pair of the transformer (LoKr, DoRA, biases "
                            "and text-encoder LoRAs are not supported)")
        parts.setdefault(m["module"], {})[m["part"]] = state[key]
    pairs = {}
    for module, p in parts.items():
        if set(p) != {"A", "B"}:
            raise UserError(f"LoRA {path}: '{module}' has lora_{''.join(p)} but not its partner")
        down, up = p["A"].float(), p["B"].float()
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise UserError(f"LoRA {path}: '{module}' has pair shapes {tuple(up.shape)} @ {tuple(down.shape)}")
        pairs[f"{module}.weight"] = (up * _adapter_scaling(module, down.shape[0], config), down)
    if not pairs:
        raise UserError(f"LoRA {path} holds no LoRA pairs")
    return pairs


def check_fits(pairs: dict, shapes: dict[str, list[int]], what: str, path) -> None:
    """Every pair must name a weight of `shapes` ({name: [out, in]}) and match it; one line for the first that
    does not (checked before anything is applied or written)."""
    for name, (up, down) in pairs.items():
        if name not in shapes:
            raise UserError(f"LoRA {path} is not for this model: key '{name.removesuffix('.weight')}.lora_A.weight' "
                            f"names no weight of {what}")
        if [up.shape[0], down.shape[1]] != list(shapes[name]):
            raise UserError(f"LoRA {path} is not for this model: key '{name.removesuffix('.weight')}' changes a "
                            f"[{up.shape[0]}, {down.shape[1]}] weight, {what} has [{shapes[name][0]}, "
                            f"{shapes[name][1]}]")


def convert_lora(bundle, lora_path, out) -> dict:
    """`zimage-trt lora`: the LoRA's pairs under the bundle's weight names, in a safetensors file of its own."""
    from safetensors.torch import save

    weights = bundle_weights(bundle)
    pairs = read_lora(lora_path)
    check_fits(pairs, {n: e["shape"] for n, e in weights.items()}, f"bundle {bundle.root}'s transformer", lora_path)
    tensors = {}
    for name, (up, down) in pairs.items():
        tensors[f"{name}.lora_up"] = up.contiguous()
        tensors[f"{name}.lora_down"] = down.contiguous()
    meta = {
        "format": LORA_FORMAT,
        "version": LORA_VERSION,
        "name": Path(lora_path).stem,
        "source": str(Path(lora_path).resolve()),
        "source_sha256": sha256_of([Path(lora_path)]),
        "transformer_sha256": bundle.network("transformer")["sha256"],
        "weights": len(pairs),
        "rank": max(up.shape[1] for up, _ in pairs.values()),
    }
    out = Path(out)
    with writing(out, "pass another --out"):
        write_atomic(out, save(tensors, metadata=metadata_json(meta)))
    return meta


@dataclass
class SourceLora:
    """A LoRA read for baking into the transformer at export: its file, scale and pairs (read once)."""

    path: Path
    scale: float
    pairs: dict

    def record(self) -> dict:
        """What the manifest keeps of it."""
        return {"name": self.path.stem, "sha256": sha256_of([self.path]), "scale": self.scale,
                "weights": len(self.pairs)}


def read_sources(loras: list[tuple[str, float]], shapes: dict[str, list[int]]) -> list[SourceLora]:
    """Each (file, scale) read and checked against the transformer's weight shapes, before anything is applied."""
    sources = []
    for path, scale in loras:
        pairs = read_lora(path)
        check_fits(pairs, shapes, "the transformer", path)
        sources.append(SourceLora(Path(path), scale, pairs))
    return sources


@torch.no_grad()
def bake_loras(transformer: torch.nn.Module, sources: list[SourceLora]) -> None:
    """W += scale * up @ down for each LoRA, in the transformer's own weights, whatever their precision."""
    params = dict(transformer.named_parameters())
    for source in sources:
        for name, (up, down) in source.pairs.items():
            p = params[name]
            # the sum in float32, rounded once to the weight's precision
            p.copy_(p.float() + ((up * source.scale) @ down).to(p.device, torch.float32))
