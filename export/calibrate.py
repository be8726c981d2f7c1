"""Measure the activation peaks that decide the FP16 rescale (see fp16.py).

The reference pipeline runs the calibration prompts through the whole schedule (9 steps, guidance 0) at the
bundle's resolution; forward hooks record, per block, the largest |value| of the attention output projection,
of the SwiGLU product (the input of w2) and of w2's output.
"""

from __future__ import annotations

import torch

from .fp16 import blocks


@torch.no_grad()
def measure_peaks(pipe, prompts: list[str], height: int, width: int, steps: int = 9, seed: int = 0, progress=None):
    peaks: dict[str, dict[str, float]] = {}
    handles = []

    def record(block: str, key: str, use_input: bool):
        def hook(module, args, output):
            value = args[0] if use_input else output
            peak = float(value.detach().abs().max())
            slot = peaks.setdefault(block, {"attn_out": 0.0, "ffn_product": 0.0, "ffn_out": 0.0})
            slot[key] = max(slot[key], peak)

        return hook

    for name, block in blocks(pipe.transformer).items():
        handles.append(block.attention.to_out[0].register_forward_hook(record(name, "attn_out", False)))
        handles.append(block.feed_forward.w2.register_forward_hook(record(name, "ffn_product", True)))
        handles.append(block.feed_forward.w2.register_forward_hook(record(name, "ffn_out", False)))
    try:
        pipe.set_progress_bar_config(disable=True)
        for i, prompt in enumerate(prompts):
            generator = torch.Generator("cpu").manual_seed(seed + i)
            pipe(
                prompt,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=0.0,
                generator=generator,
                output_type="latent",
            )
            if progress is not None:
                progress.update(1)
    finally:
        for h in handles:
            h.remove()
    return peaks
