"""Where each weight of the transformer ended up in its ONNX graph: the map that LoRA at run time needs.

The exporter's optimizer folds the transpose of every `nn.Linear` weight into a new, anonymous initializer
(`val_242` holding W^T) or keeps it under its own name for a Gemm; either way the module's parameter name is gone
from the graph. This finds each 2-D parameter's initializer by content (the graph holds the parameter's exact
values, in its export precision, as W or W^T) and records, per parameter:

    initializer   the ONNX initializer's name (also the TensorRT weights name a refit sets)
    transposed    whether it holds W^T
    shape         the parameter's [out, in]
    divisor       the FP16 rescale folded into it (fp16.py): a LoRA delta is divided by it too

A parameter whose values another one shares (the optimizer then keeps one initializer for both) is left out
with its twin: a LoRA on one of them could not be applied without changing the other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so any float type (bf16 included) compares exactly."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def _fingerprint(bits: torch.Tensor) -> tuple:
    """Shape, width and a sample of values: cheap (a few hundred elements leave the device); exact matches are
    confirmed afterwards."""
    flat = bits.reshape(-1)
    step = max(1, flat.numel() // 251)
    sample = torch.cat([flat[:64], flat[-64:], flat[::step][:256]]).cpu().numpy().tobytes()
    return tuple(bits.shape), bits.element_size(), sample


def map_weights(onnx_path: Path, module: torch.nn.Module, prefix: str = "transformer.", divisors=None) -> dict:
    """{parameter name (without `prefix`): {initializer, transposed, shape, divisor}} for every 2-D parameter
    of `module` found in the graph; `divisors`: {parameter: FP16 rescale folded into it}."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    base = str(Path(onnx_path).parent)
    params = {n[len(prefix):]: p for n, p in module.named_parameters() if p.dim() == 2 and n.startswith(prefix)}
    by_print: dict[tuple, list] = {}
    for name, p in params.items():
        bits = _bits(p.detach())
        for transposed, t in ((False, bits), (True, bits.T.contiguous())):
            by_print.setdefault(_fingerprint(t), []).append((name, transposed))
        del bits, t
    found: dict[str, dict] = {}
    for tensor in model.graph.initializer:
        if len(tensor.dims) != 2:
            continue
        # Read only 2-D tensors, one at a time (the full-size graph's weights are 12 GB of external data).
        data = np.array(numpy_helper.to_array(tensor, base_dir=base), order="C")  # a writable copy
        if data.dtype.itemsize not in _INT_OF_SIZE:
            continue
        data = torch.from_numpy(data.view(f"i{data.dtype.itemsize}"))
        for name, transposed in by_print.get(_fingerprint(data), []):
            values = _bits(params[name].detach()).cpu()
            if torch.equal(values.T if transposed else values, data):
                if name in found:  # two initializers hold one parameter's values: keep neither
                    found[name]["ambiguous"] = True
                found.setdefault(name, {
                    "initializer": tensor.name,
                    "transposed": transposed,
                    "shape": list(values.shape),
                    "divisor": float((divisors or {}).get(name, 1.0)),
                })
    owners: dict[str, list[str]] = {}
    for name, entry in found.items():
        owners.setdefault(entry["initializer"], []).append(name)
    return {
        name: entry for name, entry in sorted(found.items())
        if not entry.get("ambiguous") and len(owners[entry["initializer"]]) == 1
    }
