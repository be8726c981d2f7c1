"""The export wrappers compute what the diffusers/transformers modules compute (eager, float32)."""

from __future__ import annotations

import pytest
import torch

from zimage_trt.export import checkpoint
from zimage_trt.export.modules import (
    DiTForExport,
    TextEncoderForExport,
    VaeDecoderForExport,
    padded_length,
    rope_tables,
)


@pytest.fixture(scope="module")
def transformer(tiny_model):
    return checkpoint.load_transformer(tiny_model, torch.float32)


def diffusers_velocity(transformer, latents, t, caption):
    """The pipeline's call for batch 1, guidance 0: lists in, [16, 1, h, w] out."""
    with torch.no_grad():
        out = transformer([latents[0].unsqueeze(1)], t, [caption], return_dict=False)[0][0]
    return out.squeeze(1)[None]


@pytest.mark.parametrize(
    "h, w, n_cap",
    [
        (16, 16, 1),  # shortest caption: 31 pad tokens
        (16, 16, 32),  # exactly one multiple: no pad token
        (16, 16, 77),
        (18, 14, 40),  # 9x7 = 63 image tokens: one image pad token at position (0, 0, 0)
        (24, 16, 300),
    ],
)
def test_dit_wrapper_equals_diffusers(transformer, h, w, n_cap):
    g = torch.Generator().manual_seed(h * 1000 + n_cap)
    latents = torch.randn(1, 16, h, w, generator=g)
    caption = torch.randn(n_cap, transformer.config.cap_feat_dim, generator=g) * 3
    t = torch.tensor([0.37])
    want = diffusers_velocity(transformer, latents, t, caption)
    lpad = padded_length(n_cap)
    # The runtime leaves whatever is in the pad rows; the graph must not depend on it.
    padded = torch.cat([caption, torch.randn(lpad - n_cap, caption.shape[1], generator=g) * 100])[None]
    with torch.no_grad():
        got = DiTForExport(transformer)(latents, t, padded, torch.tensor([n_cap]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rope_tables_equal_the_complex_reference(transformer):
    from diffusers.models.transformers.transformer_z_image import RopeEmbedder

    cfg = transformer.config
    ref = RopeEmbedder.precompute_freqs_cis(cfg.axes_dims, cfg.axes_lens, cfg.rope_theta)
    for (cos, sin), table in zip(rope_tables(cfg.axes_dims, cfg.axes_lens, cfg.rope_theta), ref):
        assert torch.equal(cos, table.real) and torch.equal(sin, table.imag)


def test_text_encoder_wrapper_is_hidden_states_minus_two(tiny_model):
    qwen = checkpoint.load_text_encoder(tiny_model, torch.float32)
    ids = torch.randint(0, qwen.config.vocab_size, (1, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = qwen(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        got = TextEncoderForExport(qwen)(ids)
        # Unpadded ids give the rows the pipeline keeps from its right-padded, masked run.
        padded = torch.cat([ids, torch.zeros(1, 11, dtype=torch.long)], dim=1)
        mask = torch.cat([torch.ones(1, 37), torch.zeros(1, 11)], dim=1).bool()
        masked = qwen(input_ids=padded, attention_mask=mask, output_hidden_states=True).hidden_states[-2][:, :37]
    assert len(qwen.layers) == qwen.config.num_hidden_layers  # the caller's model is left whole
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-5)


def test_vae_wrapper_equals_the_pipeline_decode(tiny_model):
    from diffusers.image_processor import VaeImageProcessor

    vae = checkpoint.load_vae(tiny_model, torch.float32)
    latents = torch.randn(1, 16, 12, 20, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z = latents / vae.config.scaling_factor + vae.config.shift_factor
        want = VaeImageProcessor(vae_scale_factor=16).postprocess(vae.decode(z, return_dict=False)[0], "pt")
        got = VaeDecoderForExport(vae)(latents)
    assert got.shape == (1, 3, 96, 160)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_rope_tables_follow_the_weights_device(transformer):
    # At full size the model sits on the GPU; tables built on the CPU broke the export there
    # ("found two different devices cuda:0, cpu"). The meta device shows the same on any machine.
    import copy

    on_meta = copy.deepcopy(transformer).to("meta")
    wrapper = DiTForExport(on_meta, inplace=True)
    assert {b.device.type for b in wrapper.buffers()} == {"meta"}


def test_make_tiny_is_deterministic_for_a_seed(tmp_path):
    from zimage_trt.export.tiny import make_tiny

    a, b, c = (make_tiny(tmp_path / name, seed=s) for name, s in (("a", 3), ("b", 3), ("c", 4)))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) >= 9
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "transformer/diffusion_pytorch_model-00001-of-00003.safetensors").read_bytes() != (
        c / "transformer/diffusion_pytorch_model-00001-of-00003.safetensors"
    ).read_bytes()


def test_make_tiny_writes_the_real_checkpoint_layout(tiny_model):
    """Shards with an index for the transformer and the text encoder, the text encoder a Qwen3ForCausalLM with
    `model.`-prefixed keys and no lm_head (tied), generation_config.json beside it, the VAE in one file: what
    users download, so every run reads it through the real loading code."""
    import json

    te, dit = tiny_model / "text_encoder", tiny_model / "transformer"
    te_index = json.loads((te / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(k.startswith("model.") for k in te_index) and "lm_head.weight" not in te_index
    assert len(set(te_index.values())) >= 2 and json.loads((te / "config.json").read_text())["architectures"] == [
        "Qwen3ForCausalLM"]
    assert (te / "generation_config.json").is_file()
    dit_index = json.loads((dit / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(dit_index.values())) == 3 and not (dit / "diffusion_pytorch_model.safetensors").exists()
    assert (tiny_model / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    from zimage_trt.export.checkpoint import load_text_encoder

    qwen = load_text_encoder(tiny_model)  # a Qwen3Model from the prefixed keys
    assert type(qwen).__name__ == "Qwen3Model" and qwen.embed_tokens.weight.abs().sum() > 0
