"""Measure the activation peaks that decide the FP16 rescale (see fp16.py).

The reference pipeline runs the calibration prompts through the whole schedule (9 steps, guidance 0) at the
bundle's resolution; forward hooks record, per block, the largest |value| of the attention output projection,
of the SwiGLU product (the input of w2) and of w2's output.

`calibrate` does it one network at a time, so the GPU never holds the text encoder and the transformer together
(8 + 12 GB at full size in bf16): the text encoder alone computes every prompt's caption features and is freed,
then the transformer alone runs the schedule on them. The same pipeline code computes both halves, so the peaks
equal those of the whole pipeline (tested).
"""

from __future__ import annotations

import torch

from .fp16 import blocks


@torch.no_grad()
def run_schedule(pipe, prompts, height: int, width: int, steps: int = 9, seed: int = 0, progress=None) -> None:
    """The whole schedule (guidance 0) for each prompt: texts, or caption features (a list of [tokens, dim]
    tensors, one per prompt: what ZImagePipeline.encode_prompt gives) for a pipeline without a text encoder."""
    pipe.set_progress_bar_config(disable=True)
    for i, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        text = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_embeds": [prompt]}
        pipe(**text, height=height, width=width, num_inference_steps=steps, guidance_scale=0.0,
             generator=generator, output_type="latent")
        if progress is not None:
            progress.update(1)


@torch.no_grad()
def measure_peaks(pipe, prompts, height: int, width: int, steps: int = 9, seed: int = 0, progress=None):
    """The FP16 rescale's peaks over `run_schedule(pipe, prompts, ...)`, per block."""
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
        run_schedule(pipe, prompts, height, width, steps, seed, progress)
    finally:
        for h in handles:
            h.remove()
    return peaks


@torch.no_grad()
def caption_features(model_dir, prompts: list[str], dtype, device) -> list[torch.Tensor]:
    """Each prompt's caption features as the reference pipeline computes them, with the text encoder loaded alone
    (and freed on return)."""
    from diffusers import ZImagePipeline

    from . import checkpoint

    text_encoder = checkpoint.load_text_encoder(model_dir, dtype, device)
    pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=text_encoder,
                          tokenizer=checkpoint.load_tokenizer(model_dir), transformer=None)
    features = [pipe.encode_prompt(p, device, do_classifier_free_guidance=False)[0][0] for p in prompts]
    del pipe, text_encoder
    return features


def schedule_pipeline(model_dir, transformer):
    """The reference pipeline around `transformer` alone (no text encoder, no VAE): it runs the schedule on
    caption features."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    from . import checkpoint

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(checkpoint.check_layout(model_dir) / "scheduler")
    return ZImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)


def calibrate(model_dir, prompts: list[str], height: int, width: int, steps: int, dtype, device, loras=(),
              features: list[torch.Tensor] | None = None) -> dict:
    """The peaks of `measure_peaks`, one network on the GPU at a time (see the module docstring); `loras`
    (read LoRAs, export/lora.py SourceLora) are baked into the transformer first, so the peaks are those of what is
    exported. `features`: the prompts' caption features if already computed (`caption_features`)."""
    from zimage_trt.common.peaks import release_memory

    from . import checkpoint

    if features is None:
        features = caption_features(model_dir, prompts, dtype, device)
        release_memory(torch.device(device))
    transformer = checkpoint.load_transformer(model_dir, dtype, device)
    if loras:
        from .lora import bake_loras

        bake_loras(transformer, loras)
    pipe = schedule_pipeline(model_dir, transformer)
    try:
        return measure_peaks(pipe, features, height, width, steps)
    finally:
        del pipe, transformer
