"""Tensor-only wrappers of the three networks: exactly what each ONNX graph computes.

The diffusers transformer takes Python lists, pads captions with Python loops and applies RoPE with complex
numbers; neither ONNX exporter handles that. `DiTForExport` is the same function for batch 1 and one branch
(guidance 0) written with tensors alone:

    latents [1,16,h,w] f32, timestep [1] f32 (= 1 - sigma), cap_feats [1,Lpad,C] f32, cap_len [1] i64
        -> velocity [1,16,h,w] f32 (the transformer's output; the pipeline negates it)

Lpad is the caption length padded to a multiple of 32 (the only dynamic size); rows at and after cap_len are
replaced by the learned pad token, as the reference does, and are attended like any other token. The image
size is fixed when the wrapper is built. RoPE uses cos/sin tables computed exactly as the reference builds its
complex table (float64 angles, cast to float32, torch.polar) and rotates interleaved pairs in float32.

All three wrappers take and return float32 (ids: int64) whatever their internal precision, so every backend
and the runtime share one set of buffer types.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

SEQ_MULTIPLE = 32  # captions and image tokens are padded to this multiple (diffusers SEQ_MULTI_OF)
MAX_CAPTION_TOKENS = 512  # the pipeline's max_sequence_length


def padded_length(n_tokens):
    """n_tokens rounded up to a multiple of 32. Works on traced sizes too: operands stay non-negative, where
    ONNX's integer Div (which truncates) and Python's // (which floors) agree."""
    return (n_tokens + SEQ_MULTIPLE - 1) // SEQ_MULTIPLE * SEQ_MULTIPLE


def rope_tables(axes_dims, axes_lens, theta: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per axis, (cos, sin) of shape [len, dim/2] in float32, equal to the reference's complex64 table."""
    tables = []
    for dim, length in zip(axes_dims, axes_lens):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles = torch.outer(torch.arange(length, dtype=torch.float64), freqs).float()
        polar = torch.polar(torch.ones_like(angles), angles)
        tables.append((polar.real.contiguous(), polar.imag.contiguous()))
    return tables


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Multiply interleaved pairs (x[2i], x[2i+1]) by cos + i·sin, in float32. x: [B,S,H,D]; cos, sin: [S,D/2].

    While tracing for export this is written with real tensors (the exporters have no complex support); run
    eagerly it is the reference's complex product, which is one kernel instead of eight and gives the same bits.
    """
    b, s, h, d = x.shape
    if not torch.compiler.is_exporting():
        rotated = torch.view_as_complex(x.float().unflatten(-1, (d // 2, 2))) * torch.complex(cos, sin)[None, :, None, :]
        return torch.view_as_real(rotated).flatten(-2).to(x.dtype)
    pairs = x.float().unflatten(-1, (d // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class RealRopeAttnProcessor:
    """Z-Image's single-stream attention with RoPE as a real rotation; freqs_cis is a (cos, sin) pair."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        heads = attn.heads
        head_dim = hidden_states.shape[-1] // heads
        q = attn.to_q(hidden_states).unflatten(-1, (heads, head_dim))
        k = attn.to_k(hidden_states).unflatten(-1, (heads, head_dim))
        v = attn.to_v(hidden_states).unflatten(-1, (heads, head_dim))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if freqs_cis is not None:
            cos, sin = freqs_cis
            q = rotate_pairs(q, cos, sin)
            k = rotate_pairs(k, cos, sin)
        # Batch 1, one branch: every token attends every token, so no mask (the reference passes None too).
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        return attn.to_out[0](out)


def use_real_rope(transformer: nn.Module) -> None:
    """Swap every block's attention processor for the real-valued one (weights untouched)."""
    for module in transformer.modules():
        if module.__class__.__name__ == "ZImageTransformerBlock":
            module.attention.set_processor(RealRopeAttnProcessor())


class DiTForExport(nn.Module):
    """One transformer pass for batch 1 at any latent size; see the module docstring for the interface.

    The image size is read from the latents' shape, so one module (and one graph, when exported with dynamic
    latent dims) serves every size. The RoPE of image tokens is computed inside the graph from that shape, by
    slicing the per-axis cos/sin tables (constants of the graph) rather than fed by the runtime as per-size
    tables: the values are the very rows the reference's table lookup gives, for any size, with no second copy
    of the RoPE code in the runtime, no extra inputs to bind, and the same four inputs for a one-size bundle.
    The slices cost a few small gathers per pass, nothing beside the attention they feed.
    """

    input_names = ("latents", "timestep", "cap_feats", "cap_len")
    output_names = ("velocity",)

    def __init__(self, transformer: nn.Module, dtype=torch.float32, inplace=False):
        super().__init__()
        cfg = transformer.config
        # By default work on a copy, so the caller's module (often the reference itself) keeps its processors
        # and dtype; `inplace` adopts the module instead (it saves a copy of 6 B parameters).
        self.transformer = transformer if inplace else copy.deepcopy(transformer)
        use_real_rope(self.transformer)
        nn.Module.to(self.transformer, dtype)  # ModelMixin.to warns about fp32 modules we handle below
        # diffusers marks these two precision-sensitive; they are small, so they stay in float32.
        self.transformer.t_embedder.float()
        self.transformer.cap_embedder.float()
        self.dtype = dtype
        self.patch = cfg.all_patch_size[0]
        self.channels = cfg.in_channels
        self.t_scale = float(cfg.t_scale)

        device = next(self.transformer.parameters()).device  # the tables live beside the weights
        for axis, (cos, sin) in zip("thw", rope_tables(cfg.axes_dims, cfg.axes_lens, cfg.rope_theta)):
            self.register_buffer(f"cos_{axis}", cos.to(device), persistent=False)
            self.register_buffer(f"sin_{axis}", sin.to(device), persistent=False)

    def _rope(self, h_tokens, w_tokens, lpad, cos: bool):
        """(image rows, caption rows) of the cos or sin table, in the reference's token order.

        Image tokens sit at (Lpad + 1, h, w) in (h, w) order, then the image pad tokens (up to the next multiple
        of 32) at (0, 0, 0); caption tokens at (1..Lpad, 0, 0). Written without branches on sizes, so the graph
        stays dynamic (an empty pad is a concatenation of zero rows).
        """
        t, h, w = (self.cos_t, self.cos_h, self.cos_w) if cos else (self.sin_t, self.sin_h, self.sin_w)
        dt, dh, dw = t.shape[1], h.shape[1], w.shape[1]
        n_img = h_tokens * w_tokens
        n_pad = padded_length(n_img) - n_img
        # Every expand names its sizes: ONNX Expand broadcasts and has no -1 ("keep this dim").
        grid = torch.cat(
            [h[:h_tokens, None, :].expand(h_tokens, w_tokens, dh), w[None, :w_tokens, :].expand(h_tokens, w_tokens, dw)],
            dim=-1,
        ).flatten(0, 1)
        image = torch.cat([t[lpad + 1].expand(n_img, dt), grid], dim=-1)
        origin = torch.cat([t[0], h[0], w[0]])
        image = torch.cat([image, origin.expand(n_pad, dt + dh + dw)])
        caption = torch.cat([t[1 : lpad + 1], torch.cat([h[0], w[0]]).expand(lpad, dh + dw)], dim=-1)
        return image, caption

    def patchify(self, latents: torch.Tensor, h_tokens, w_tokens) -> torch.Tensor:
        """[1, C, h, w] -> [h/p * w/p, p*p*C], token order (h, w), features (ph, pw, C) as the reference."""
        p, c = self.patch, self.channels
        x = latents[0].unflatten(1, (h_tokens, p)).unflatten(3, (w_tokens, p))  # [C, ht, p, wt, p]
        return x.permute(1, 3, 2, 4, 0).flatten(2).flatten(0, 1)

    def unpatchify(self, tokens: torch.Tensor, h_tokens, w_tokens) -> torch.Tensor:
        p, c = self.patch, self.channels
        x = tokens.unflatten(0, (h_tokens, w_tokens)).unflatten(2, (p, p, c)).permute(4, 0, 2, 1, 3)
        return x.flatten(3, 4).flatten(1, 2)[None]

    def forward(self, latents, timestep, cap_feats, cap_len):
        tr = self.transformer
        key = f"{self.patch}-1"
        lpad = cap_feats.shape[1]
        h_tokens, w_tokens = latents.shape[2] // self.patch, latents.shape[3] // self.patch
        n_img = h_tokens * w_tokens
        img_cos, cap_cos = self._rope(h_tokens, w_tokens, lpad, cos=True)
        img_sin, cap_sin = self._rope(h_tokens, w_tokens, lpad, cos=False)

        adaln = tr.t_embedder(timestep * self.t_scale).to(self.dtype)

        x = tr.all_x_embedder[key](self.patchify(latents.to(self.dtype), h_tokens, w_tokens))
        n_pad = padded_length(n_img) - n_img
        x = torch.cat([x, tr.x_pad_token.to(x.dtype).expand(n_pad, x.shape[1])])[None]
        for layer in tr.noise_refiner:
            x = layer(x, None, (img_cos, img_sin), adaln)

        cap = tr.cap_embedder(cap_feats).to(self.dtype)
        is_pad = torch.arange(lpad, device=cap.device)[None, :, None] >= cap_len.view(1, 1, 1)
        cap = torch.where(is_pad, tr.cap_pad_token.to(cap.dtype), cap)
        for layer in tr.context_refiner:
            cap = layer(cap, None, (cap_cos, cap_sin))

        unified = torch.cat([x, cap], dim=1)
        cos = torch.cat([img_cos, cap_cos])
        sin = torch.cat([img_sin, cap_sin])
        for layer in tr.layers:
            unified = layer(unified, None, (cos, sin), adaln)
        unified = tr.all_final_layer[key](unified, c=adaln)
        return self.unpatchify(unified[0, :n_img], h_tokens, w_tokens).float()


class DiffusersDiT(nn.Module):
    """The diffusers transformer called as the pipeline calls it, behind DiTForExport's tensor interface.

    This is the reference the exported graph is checked against: the list-based forward with complex RoPE,
    the caption cut to cap_len and padded by diffusers itself.
    """

    input_names = DiTForExport.input_names
    output_names = DiTForExport.output_names

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, latents, timestep, cap_feats, cap_len):
        dtype = self.transformer.dtype
        caption = cap_feats[0, : int(cap_len[0])].to(dtype)
        out = self.transformer([latents[0].unsqueeze(1).to(dtype)], timestep, [caption], return_dict=False)[0][0]
        return out.squeeze(1)[None].float()


class TextEncoderForExport(nn.Module):
    """Qwen3 cut to what `hidden_states[-2]` needs: all layers but the last, and no final norm.

    input_ids [1, L] i64 (the prompt's tokens, unpadded) -> features [1, L, hidden] f32. Attention is causal
    and the prompt is right-padded in the reference, so the unpadded run gives the same rows.
    """

    input_names = ("input_ids",)
    output_names = ("features",)

    def __init__(self, qwen3_model: nn.Module, dtype=torch.float32):
        super().__init__()
        model = copy.copy(qwen3_model)  # shallow: shares the weights, gets its own module table and config
        model._modules = dict(qwen3_model._modules)
        model.layers = nn.ModuleList(list(qwen3_model.layers)[:-1])
        model.norm = nn.Identity()
        model.config = copy.deepcopy(qwen3_model.config)
        model.config.num_hidden_layers -= 1
        self.model = copy.deepcopy(model).to(dtype) if dtype != qwen3_model.dtype else model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).last_hidden_state.float()


class VaeDecoderForExport(nn.Module):
    """Latents [1,16,h,w] f32 -> image [1,3,8h,8w] f32 in [0, 1].

    The scaling and shift (latents / 0.3611 + 0.1159) and the [-1,1] -> [0,1] map are in the graph, in the
    order the reference pipeline applies them: cast to the VAE's precision first, then scale.
    """

    input_names = ("latents",)
    output_names = ("image",)

    def __init__(self, vae: nn.Module, dtype=torch.float32):
        super().__init__()
        self.vae = copy.deepcopy(vae).to(dtype) if dtype != vae.dtype else vae
        self.dtype = dtype
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(vae.config.shift_factor)

    def forward(self, latents):
        z = latents.to(self.dtype) / self.scaling + self.shift
        image = self.vae.decode(z, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1).float()
