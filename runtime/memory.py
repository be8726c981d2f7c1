"""What a generation needs on the GPU, per memory mode, from what is loaded: said before the work starts.

    weights      per network: a torch module's parameters and buffers, an engine's plan size (its weights and
                 kernels; with weight streaming, at most its budget), nothing for onnxruntime on the CPU
    buffers      the runtime's own tensors (captions, latents, velocity, image), allocated once
    activations  TensorRT: the shared execution block the engines report (exact), plus the block each context of a
                 weight-streamed engine allocates itself (device_memory_size_v2, which covers the streaming scratch
                 per NvInferRuntime.h; one context, as such an engine is never recorded): then "at least", since
                 what TensorRT allocates for streaming is UNVERIFIED here; eager PyTorch: not predicted (the
                 allocator's measured peak is printed after the run instead)

    all          text encoder + transformer + VAE + buffers + activations
    sequential   max(text encoder, transformer + VAE) + buffers + activations
"""

from __future__ import annotations

import torch

from .pipeline import VRAM_MODES


def weight_bytes(session) -> int:
    module = getattr(session, "module", None)
    if module is not None:  # wherever it is now: in sequential mode it is on the GPU in its turn
        return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    meta = getattr(session, "meta", None)
    if meta is not None:
        size = int(meta["build"]["engine_bytes"])
        budget = getattr(session, "weight_budget", None)
        return min(size, budget) if budget else size
    return 0


def vram_plan(rt) -> dict:
    """Bytes per part and the predicted peak of each mode, for the runtime `rt` as loaded (on a CPU: zeros)."""
    if rt.device.type != "cuda":
        return {}
    w = {name: weight_bytes(s) for name, s in rt.sessions.items()}
    buffers = sum(t.numel() * t.element_size() for t in (
        rt.ids, rt.caption, rt.cap_len, rt.timestep, rt._latents_store, rt._velocity_store, rt._image_store))
    block = getattr(rt.transformer, "shared_memory", None)
    own = sum(getattr(s, "own_device_memory", 0) for s in rt.sessions.values())  # weight-streamed engines
    activations = block.numel() + own if isinstance(block, torch.Tensor) else None
    base = buffers + (activations or 0)
    return {
        "weights": w,
        "buffers": buffers,
        "activations": activations,
        "activations_exact": not own,
        "all": w["text_encoder"] + w["transformer"] + w["vae_decoder"] + base,
        "sequential": max(w["text_encoder"], w["transformer"] + w["vae_decoder"]) + base,
    }


def describe(plan: dict, mode: str) -> str:
    """One line: the predicted peak of each mode, its parts, and which mode runs."""
    if not plan:
        return "predicted VRAM: nothing on a GPU (CPU run)"
    gb = lambda n: f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"  # noqa: E731
    w = plan["weights"]
    acts = (f" + engine activations {gb(plan['activations'])}" if plan["activations"] is not None
            else " + activations (eager PyTorch: measured after the run)")
    if not plan.get("activations_exact", True):
        acts = acts.replace("activations", "activations at least", 1) + " (weight streaming: TensorRT's own blocks)"
    at_least = "" if plan.get("activations_exact", True) else "at least "
    modes = ", ".join(f"{m} {at_least}{gb(plan[m])}{' (this run)' if m == mode else ''}" for m in VRAM_MODES)
    return (f"predicted peak VRAM: {modes}; parts: text encoder {gb(w['text_encoder'])} + transformer "
            f"{gb(w['transformer'])} + VAE {gb(w['vae_decoder'])} + buffers {gb(plan['buffers'])}{acts}")


def measured_line(device) -> str:
    if device.type != "cuda":
        return ""
    return (f"measured peak (PyTorch's allocator, which holds torch weights, the runtime's buffers and torch "
            f"activations; not TensorRT's own): {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB")
