"""FP16 without overflow: the exact rescale in front of each post-norm RMSNorm.

In Z-Image's blocks the attention output projection and the SwiGLU FFN feed an RMSNorm ("sandwich" norm)
before they reach the residual stream. On the real weights those activations peak near 63k, at the edge of
FP16 (65504). RMSNorm does not care about a common scale of its input:

    rmsnorm(x, eps) = x / sqrt(mean(x^2) + eps) = (x/s) / sqrt(mean((x/s)^2) + eps/s^2) = rmsnorm(x/s, eps/s^2)

so dividing the weights that produce x by s and the norm's eps by s^2 gives the same function. With s a power of
two the division is exact in every precision. For attention, 1/s goes into `to_out` (no bias); for the FFN it
goes into `w3`, which scales the SwiGLU product silu(w1 x) * (w3 x) and so w2's output too. The norm computes
its mean of squares and adds eps in FP32 (the graph's RMSNormalization has stash_type=1), so eps/s^2 is kept.
The scales come from calibration (peaks measured on the FP32/BF16 reference), see `calibrate.py`.
"""

from __future__ import annotations

import math

import torch

# After the rescale no calibrated peak exceeds this: 16x headroom below FP16's 65504 for prompts that drive
# the activations harder than the calibration prompts did.
FP16_TARGET_PEAK = 4096.0


def power_of_two_scale(peak: float, target: float = FP16_TARGET_PEAK) -> float:
    """The smallest power of two s >= 1 with peak / s <= target."""
    if not math.isfinite(peak):
        raise ValueError(f"calibration peak is {peak}; the reference itself is not finite")
    if peak <= target:
        return 1.0
    return float(2 ** math.ceil(math.log2(peak / target)))


def choose_scales(peaks: dict[str, dict[str, float]], target: float = FP16_TARGET_PEAK) -> dict[str, dict[str, float]]:
    """Per block: {"attn": s, "ffn": s} from the measured peaks (see calibrate.measure_peaks)."""
    scales = {}
    for block, p in peaks.items():
        scales[block] = {
            "attn": power_of_two_scale(p["attn_out"], target),
            "ffn": power_of_two_scale(max(p["ffn_product"], p["ffn_out"]), target),
        }
    return scales


def blocks(transformer) -> dict[str, torch.nn.Module]:
    """The transformer's blocks by their module path: noise_refiner.i, context_refiner.i, layers.i."""
    out = {}
    for group in ("noise_refiner", "context_refiner", "layers"):
        for i, block in enumerate(getattr(transformer, group)):
            out[f"{group}.{i}"] = block
    return out


def block_names(config: dict) -> list[str]:
    """The names `blocks` gives, from the transformer's config.json alone."""
    return ([f"noise_refiner.{i}" for i in range(config["n_refiner_layers"])]
            + [f"context_refiner.{i}" for i in range(config["n_refiner_layers"])]
            + [f"layers.{i}" for i in range(config["n_layers"])])


@torch.no_grad()
def fold_rescale(transformer, scales: dict[str, dict[str, float]]) -> int:
    """Fold the scales into the transformer in place; returns how many blocks changed."""
    by_name = blocks(transformer)
    unknown = set(scales) - set(by_name)
    if unknown:
        raise ValueError(f"scales name blocks the transformer does not have: {sorted(unknown)[:3]}")
    changed = 0
    for name, s in scales.items():
        block = by_name[name]
        if s["attn"] != 1.0:
            out = block.attention.to_out[0]
            out.weight.div_(s["attn"])
            if out.bias is not None:
                out.bias.div_(s["attn"])
            block.attention_norm2.eps = block.attention_norm2.eps / s["attn"] ** 2
        if s["ffn"] != 1.0:
            block.feed_forward.w3.weight.div_(s["ffn"])
            block.ffn_norm2.eps = block.ffn_norm2.eps / s["ffn"] ** 2
        changed += s["attn"] != 1.0 or s["ffn"] != 1.0
    return changed


def fp16_divisors(scales: dict | None) -> dict[str, float]:
    """The weights `fold_rescale` divides, by parameter name, and by what (a LoRA delta on them is divided too)."""
    out = {}
    for block, s in (scales or {}).items():
        if s["attn"] != 1.0:
            out[f"{block}.attention.to_out.0.weight"] = s["attn"]
        if s["ffn"] != 1.0:
            out[f"{block}.feed_forward.w3.weight"] = s["ffn"]
    return out
