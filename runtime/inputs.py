"""The input step: what the denoising loop starts from.

Text to image starts from noise: randn in float32, of the latent shape diffusers uses for the size, from a
generator seeded on the caller's generator device, so the same seed gives diffusers' image.

The pipelines to come each add an input step here, run before the loop and after the prompt is encoded:
- img2img: the input image (images.py) through the VAE encoder, scaled and shifted as the decoder undoes it,
  noised to the plan's first remaining sigma with the same generator; the loop starts at the pass `strength`
  selects (loop.py).
- inpainting: as img2img, plus the mask and the masked image's latents, which the loop blends in after each step.
- ControlNet: the control image's latents, which the loop hands the transformer as hints each pass.
"""

from __future__ import annotations

import torch


def initial_noise(shape, seed: int, generator_device: str) -> torch.Tensor:
    """Text to image's starting latents, drawn as diffusers draws them for this seed and generator device."""
    gen = torch.Generator(generator_device).manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, device=generator_device)
