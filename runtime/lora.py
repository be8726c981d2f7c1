"""LoRA at run time: the bundle's own low-rank pairs, summed with strengths, written into the transformer's weights.

A LoRA is converted once, per bundle, by `zimage-trt lora` (which needs diffusers to read every LoRA format): the
file holds, for each transformer weight it changes, the pair

    NAME.lora_up    [out, rank]   alpha / rank already folded in
    NAME.lora_down  [rank, in]

where NAME is the weight's name in the bundle (the keys of the manifest's `networks.transformer.weights`), and its
metadata names the bundle's transformer graph (by hash) it was converted for. A stack of LoRAs with strengths
s_k changes each weight to

    W' = W + sum_k s_k * up_k @ down_k          (computed in float32, then rounded to W's precision)

Each session puts W' where its weights live (`set_weights`, which takes the (key, value) pairs one at a time):
onnxruntime overrides the initializers, eager PyTorch copies into the parameters, TensorRT refits the engine.
The base W is kept (or re-read from the bundle) so that dropping a LoRA gives the base weights back bit for bit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from zimage_trt.common.errors import UserError

LORA_FORMAT = "zimage-trt-lora"
LORA_VERSION = "1"
MAX_STRENGTH = 4.0  # a strength beyond this is a mistake, not an effect


@dataclass
class Lora:
    """A converted LoRA, read: its pairs by bundle weight name, and what it was converted from."""

    name: str
    path: Path
    pairs: dict  # weight name -> (up [out, r], down [r, in]) float32 tensors
    meta: dict

    @property
    def rank(self) -> int:
        return max(up.shape[1] for up, _ in self.pairs.values())


def bundle_weights(bundle) -> dict:
    """The transformer's weight map of a bundle; one line if the bundle predates it."""
    network = bundle.network("transformer")
    if network.get("quantization"):
        raise UserError(f"bundle {bundle.root} has a {network['quantization']['format']} transformer: a LoRA at run "
                        "time would move weights past their calibrated scales; bake it at export (export --lora FILE)")
    weights = network.get("weights")
    if not weights:
        raise UserError(
            f"bundle {bundle.root} has no weight map for LoRA (it was exported before LoRA support); re-export it"
        )
    return weights


def parse_lora_arg(text: str) -> tuple[str, float]:
    """'FILE[:STRENGTH]' -> (FILE, strength); strength 1.0 when absent."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            strength = float(tail)
        except ValueError:
            path, strength = text, 1.0  # a ':' in the file name, no strength
    else:
        path, strength = text, 1.0
    check_strength(strength, f"--lora {text}")
    return path, strength


def check_strength(strength, what: str) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or abs(strength) > MAX_STRENGTH:
        raise UserError(f"{what}: the LoRA strength must be a number from -{MAX_STRENGTH:g} to {MAX_STRENGTH:g}")
    return float(strength)


def load_lora(path, bundle) -> Lora:
    """Read a file made by `zimage-trt lora` for this bundle; one line for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA {path}: no such file")
    hint = f"convert it for this bundle: zimage-trt lora --bundle {bundle.root} --lora ORIGINAL --out {path}"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != LORA_FORMAT:
                raise UserError(f"LoRA {path} is not a converted LoRA (no '{LORA_FORMAT}' metadata); {hint}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"LoRA {path} cannot be read (truncated or corrupt?): {first}") from None
    if meta.get("version") != LORA_VERSION:
        raise UserError(f"LoRA {path} has format version {meta.get('version')}, this runtime reads {LORA_VERSION}")
    if meta.get("transformer_sha256") != bundle.network("transformer")["sha256"]:
        raise UserError(f"LoRA {path} was converted for another bundle's transformer; {hint}")
    weights = bundle_weights(bundle)
    pairs = {}
    for key in sorted(tensors):
        name, _, part = key.rpartition(".")
        if part not in ("lora_up", "lora_down") or name not in weights:
            raise UserError(f"LoRA {path}: key '{key}' names no transformer weight of bundle {bundle.root}")
        if part == "lora_up":
            down = tensors.get(f"{name}.lora_down")
            up = tensors[key]
            out_dim, in_dim = weights[name]["shape"]
            if down is None or up.shape[0] != out_dim or down.shape[1] != in_dim or up.shape[1] != down.shape[0]:
                got = f"{tuple(up.shape)} @ {tuple(down.shape) if down is not None else 'missing'}"
                raise UserError(f"LoRA {path}: '{name}' is {got}, the weight is [{out_dim}, {in_dim}]")
            pairs[name] = (up.float(), down.float())
    return Lora(meta.get("name") or path.stem, path, pairs, meta)


def graph_weight_key(name: str, entry: dict) -> tuple[str, bool, float]:
    """`weight_key` of a session whose weights are the bundle graph's initializers (onnxruntime, TensorRT): the
    initializer's name, whether it stores W^T, and the FP16 rescale folded into it."""
    return entry["initializer"], entry["transposed"], entry["divisor"]


class PatchedWeights:
    """W + sum_k s_k * up_k @ down_k for each weight the stack changes, in the session's own layout and names
    (`session.weight_key`: its key, whether it stores W^T, and the FP16 rescale folded into it), computed in float32
    on `device` and rounded once to W's precision, one weight at a time: a full-size stack never holds more than one
    float32 delta. Iterating gives the (key, value) pairs every session's `set_weights` takes; `keys` lists them
    first and `value(key)` computes one on demand (a TensorRT refit needs a fused partner's value out of order)."""

    def __init__(self, session, weights: dict, stack: list[tuple[Lora, float]], device):
        names = sorted({name for lora, _ in stack for name in lora.pairs})
        self._stack, self._device = stack, device
        self._entry = {}  # session key -> (bundle weight name, transposed, divisor)
        for name in names:
            key, transposed, divisor = session.weight_key(name, weights[name])
            self._entry[key] = (name, transposed, divisor)
        self.keys = list(self._entry)
        self._base = session.base_weights(self.keys)  # references, or host copies read once

    def value(self, key: str) -> torch.Tensor:
        name, transposed, divisor = self._entry[key]
        delta = None
        for lora, strength in self._stack:
            if name in lora.pairs:
                up, down = lora.pairs[name]
                d = (up.to(self._device) * strength) @ down.to(self._device)
                delta = d if delta is None else delta + d
        w = self._base[key].to(self._device)
        delta = delta / divisor
        return (w.float() + (delta.T if transposed else delta)).to(w.dtype).contiguous()

    def __iter__(self):
        return ((key, self.value(key)) for key in self.keys)


def patched_weights(session, weights: dict, stack: list[tuple[Lora, float]], device) -> PatchedWeights:
    """The new values of the weights this stack changes, for `session.set_weights` (see PatchedWeights)."""
    return PatchedWeights(session, weights, stack, device)


def read_initializers(onnx_path: Path, names) -> dict[str, torch.Tensor]:
    """The named initializers of an ONNX file as CPU tensors (their dtype; external data read per tensor)."""
    import onnx
    from onnx import numpy_helper

    wanted = set(names)
    model = onnx.load(str(onnx_path), load_external_data=False)
    out = {}
    for tensor in model.graph.initializer:
        if tensor.name in wanted:
            array = numpy_helper.to_array(tensor, base_dir=str(Path(onnx_path).parent))
            if array.dtype.kind == "V" or str(array.dtype) == "bfloat16":  # ml_dtypes bf16
                out[tensor.name] = torch.from_numpy(array.view("int16").copy()).view(torch.bfloat16)
            else:
                out[tensor.name] = torch.from_numpy(array.copy())
    missing = wanted - set(out)
    if missing:
        raise UserError(f"{onnx_path} has no initializer {sorted(missing)[0]!r}; the bundle's weight map is stale")
    return out


def describe(stack: list[tuple[Lora, float]]) -> str:
    return ", ".join(f"{lora.name}:{strength:g}" for lora, strength in stack) or "none"


def metadata_json(meta: dict) -> dict:
    """safetensors metadata holds strings only."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
