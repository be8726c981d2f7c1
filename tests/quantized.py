"""What the fp8 and nvfp4 tests share: the tiny bundle export with a quantized transformer, its manifest entry, and
a one-Linear model where the recipe looks for a layer."""

from __future__ import annotations

import json

import torch

from .conftest import PROMPT, SIZE

SKIP = "first:1,noise_refiner.*"  # the first main layer and both noise refiners stay fp16
PER_BLOCK = 7  # layers quantized in each block: to_q, to_k, to_v, to_out.0, w1, w2, w3
CALIBRATION_PROMPTS = [PROMPT, "a bowl of ramen"]


def export_quantized(tiny_model, tmp_path_factory, fmt: str):
    """The tiny model's bundle with a `fmt` (fp8 | nvfp4) transformer, the fp16 text encoder and fp32 VAE."""
    from zimage_trt.export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / fmt
    prec = {"text_encoder": "fp16", "transformer": fmt, "vae_decoder": "fp32"}
    # FP16 scales given (none needed on this model) and a 3-step calibration: a test's budget, not a recipe
    export_bundle(tiny_model, out, ExportOptions(height=SIZE, width=SIZE, precision=prec, quant_skip=SKIP,
                                                 fp16_scales={}, calibration_steps=3,
                                                 calibration_prompts=CALIBRATION_PROMPTS))
    return out


def blocks_of(model) -> list[str]:
    """The transformer's block names (noise refiners, context refiners, main layers) from the model's config."""
    from zimage_trt.export.fp16 import block_names

    return block_names(json.loads((model / "transformer" / "config.json").read_text()))


def transformer_of(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())["networks"]["transformer"]


def linear_model(features: int) -> torch.nn.Module:
    """One Linear (`features` -> 96) at a block's feed-forward w1, where the recipe looks for it."""

    class Model(torch.nn.Module):
        input_names, output_names = ("x",), ("y",)

        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Module()])
            self.layers[0].feed_forward = torch.nn.Module()
            self.layers[0].feed_forward.w1 = torch.nn.Linear(features, 96)

        def forward(self, x):
            return self.layers[0].feed_forward.w1(x)

    return Model()
