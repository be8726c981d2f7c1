"""Model configurations of Z-Image-Turbo, full size and tiny.

The full-size numbers are those of `Tongyi-MAI/Z-Image-Turbo` (its config files, as in ../shared/real-model): the
DiT, Qwen3-4B as the text encoder, and the Flux VAE; and how the checkpoint stores them. The tiny configuration keeps everything that shapes the code paths (head_dim
128 with the real 32/48/48 RoPE axes, 2 noise and 2 context refiners, GQA in the text encoder, four VAE
levels so the VAE still downsamples by 8, the scaling and shift factors) and shrinks the widths and depths.
"""

from __future__ import annotations

import copy

SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}

FULL = {
    "transformer": {
        "_class_name": "ZImageTransformer2DModel",
        "all_patch_size": [2],
        "all_f_patch_size": [1],
        "in_channels": 16,
        "dim": 3840,
        "n_layers": 30,
        "n_refiner_layers": 2,
        "n_heads": 30,
        "n_kv_heads": 30,
        "norm_eps": 1e-05,
        "qk_norm": True,
        "cap_feat_dim": 2560,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_dims": [32, 48, 48],
        "axes_lens": [1536, 512, 512],
    },
    "text_encoder": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "max_window_layers": 36,
        "rope_scaling": None,
        "sliding_window": None,
        "use_sliding_window": False,
        "use_cache": True,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 16,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "force_upcast": True,
        "mid_block_add_attention": True,
    },
}


# text_encoder/generation_config.json of the real checkpoint (Qwen3-4B's sampling defaults; unused by the pipeline)
GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
}

# The real checkpoint's storage: the transformer in float32 in 3 shards (~24.6 GB), the text encoder in bfloat16 in
# 3 shards with `model.`-prefixed keys (a Qwen3ForCausalLM whose lm_head is tied), the VAE in one 168 MB file
# (half precision: 84 M parameters). Measured with make-tiny --size full: shards of 3.96/3.99/0.10 GB (text
# encoder) and 9.97/9.97/4.67 GB (transformer), as the real repository lists them.
FULL_STORAGE = {"transformer": ("float32", "10GB"), "text_encoder": ("bfloat16", "4GB"), "vae": ("bfloat16", None)}
# The tiny model keeps the layout (shards, index, prefixes) in float32, with shard sizes that give 2-3 shards.
TINY_STORAGE = {"transformer": ("float32", "10MB"), "text_encoder": ("float32", "1MB"), "vae": ("float32", None)}


def tiny(vocab_size: int) -> dict:
    """The tiny configuration; the text encoder's vocabulary is the tiny tokenizer's size."""
    cfg = copy.deepcopy(FULL)
    cfg["transformer"].update(dim=256, n_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=128)
    cfg["text_encoder"].update(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        max_window_layers=3,
        bos_token_id=None,
        eos_token_id=None,
    )
    cfg["vae"].update(block_out_channels=[32, 32, 64, 64], layers_per_block=1, sample_size=256)
    return cfg


def dit_flops_per_pass(cfg: dict, image_tokens: int, caption_tokens: int) -> float:
    """Matmul FLOPs of one transformer pass (2 per multiply-add), counted from the config.

    Counts the projections, the attention score and value products, and the SwiGLU FFN of every block over the
    tokens it sees (noise refiners: image tokens; context refiners: caption tokens; main blocks: both), plus the
    patch and caption embedders and the final projection. Elementwise work is left out: it is not matmul-bound.
    """
    d = cfg["dim"]
    ffn = int(d / 3 * 8)

    def block(n: int) -> float:
        proj = 2 * n * d * d * 4  # q, k, v, out
        attn = 2 * 2 * n * n * d  # QK^T and PV
        mlp = 2 * n * d * ffn * 3  # w1, w3, w2
        return proj + attn + mlp

    n_main = image_tokens + caption_tokens
    blocks = (
        cfg["n_refiner_layers"] * block(image_tokens)
        + cfg["n_refiner_layers"] * block(caption_tokens)
        + cfg["n_layers"] * block(n_main)
    )
    patch = 2 * image_tokens * 64 * d * 2  # embedder in, final projection out
    caption = 2 * caption_tokens * cfg["cap_feat_dim"] * d
    return float(blocks + patch + caption)
