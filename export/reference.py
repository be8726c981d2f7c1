"""The eager reference modules for a bundle: the diffusers/transformers modules wrapped exactly as exported.

These back the runtime's `torch` backend and every parity comparison. They are built from the original model
directory, so they need diffusers; the runtime itself only receives them.

`fast=True` prepares them for `torch.compile` without changing what they compute (the torch backend's --compile):
each wrapper names its repeated blocks in `compile_regions` (the text encoder's decoder layers, the transformer's
refiner and main blocks; the VAE is compiled whole), the transformer's RoPE is the real-valued rotation (inductor
has no complex kernels) and the VAE runs channels-last (cuDNN's fastest convolution layout). `fp8_amax` makes the
transformer the FP8 twin of an fp8 bundle's graph: its quantized layers become `runtime.torch_fp8.Fp8Linear` with
the graph's own scales (`graph_fp8_amax`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zimage_trt.runtime.torch_fp8 import E4M3_MAX, swap_fp8_linears

from . import checkpoint
from .fp16 import fold_rescale
from .modules import DiTForExport, RealRopeAttnProcessor, TextEncoderForExport, VaeDecoderForExport


def reference_modules(model_dir, dtype=torch.float32, device="cpu", fp16_scales: dict | None = None,
                      networks=("text_encoder", "transformer", "vae_decoder"), fast: bool = False,
                      fp8_amax: dict | None = None) -> dict:
    """{network name: module} in the given precision, on `device`; they take any image size.

    In fp16, pass the bundle's `fp16_scales`: the transformer is then rescaled exactly as the exported graph
    (without them plain fp16 can overflow, see fp16.py), which makes it the graph's eager twin. Each network is
    loaded straight into its precision on `device`, and folded there, as the export does: the same weights, bit
    for bit, and no float32 copy of the transformer anywhere (24.6 GB at full size).
    """
    out = {}
    if "text_encoder" in networks:
        out["text_encoder"] = TextEncoderForExport(checkpoint.load_text_encoder(model_dir, dtype, device), dtype)
        out["text_encoder"].compile_regions = list(out["text_encoder"].model.layers)
    if "transformer" in networks:
        if fp8_amax is not None:
            out["transformer"] = fp8_transformer(model_dir, dtype, device, fp16_scales, fp8_amax)
        else:
            dit = checkpoint.load_transformer(model_dir, dtype, device)
            folded = dtype == torch.float16 and bool(fp16_scales)
            if folded:
                fold_rescale(dit, fp16_scales)
            out["transformer"] = DiTForExport(dit, dtype, inplace=True)
            out["transformer"].fp16_folded = folded  # a LoRA delta is rescaled alike
        out["transformer"].compile_regions = dit_blocks(out["transformer"])
        if fast:
            for block in out["transformer"].compile_regions:
                block.attention.set_processor(CompiledRopeAttnProcessor())
    if "vae_decoder" in networks:
        vae_dtype = torch.bfloat16 if dtype == torch.float16 else dtype  # the Flux VAE overflows in fp16
        wrapper = ChannelsLastVae if fast else VaeDecoderForExport
        out["vae_decoder"] = wrapper(checkpoint.load_vae(model_dir, vae_dtype, device), vae_dtype)
    return out


def dit_blocks(module: DiTForExport) -> list:
    tr = module.transformer
    return [*tr.noise_refiner, *tr.context_refiner, *tr.layers]


class CompiledRopeAttnProcessor(RealRopeAttnProcessor):
    """The export's attention with RoPE as the real rotation of interleaved pairs in float32, always: what the
    exporter traces (modules.rotate_pairs), here for inductor, which has no complex kernels. The same function
    as the complex product of eager runs, to float32 rounding."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        heads = attn.heads
        q, k, v = (lin(hidden_states).unflatten(-1, (heads, -1)) for lin in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)  # Z-Image always has qk_norm
        cos, sin = freqs_cis
        q, k = real_rotation(q, cos, sin), real_rotation(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return attn.to_out[0](out.transpose(1, 2).flatten(2, 3).to(q.dtype))


def real_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(x[2i], x[2i+1]) rotated by the angle whose cos and sin are given, in float32. x: [B,S,H,D]; cos: [S,D/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).to(x.dtype)


class ChannelsLastVae(VaeDecoderForExport):
    """The VAE decoder with its weights and activations channels-last (NHWC): cuDNN's fastest layout for these
    convolutions. Layout only: the same values."""

    def __init__(self, vae, dtype=torch.float32):
        super().__init__(vae, dtype)
        self.vae.to(memory_format=torch.channels_last)

    def forward(self, latents):
        return super().forward(latents.contiguous(memory_format=torch.channels_last)).contiguous()


def fp8_transformer(model_dir, dtype, device, fp16_scales: dict | None, amax: dict) -> DiTForExport:
    """The transformer of an fp8 bundle, as its graph computes it: loaded in fp16 and rescaled as exported (the
    calibrated scales were measured on that model), its quantized layers FP8 from those fp16 weights, which
    makes them the graph's FP8 weights; everything else then in `dtype`. The fp16 model stays in host memory and
    each layer is quantized onto `device`: the GPU never holds the 12.3 GB fp16 transformer, only its FP8 form."""
    dit = checkpoint.load_transformer(model_dir, torch.float16, "cpu")
    if fp16_scales:
        fold_rescale(dit, fp16_scales)
    module = DiTForExport(dit, torch.float16, inplace=True)
    swap_fp8_linears(module, amax, dtype, device)
    # Not Module.to(dtype): it would cast the FP8 weights too. The embedders stay float32 (DiTForExport).
    for t in [*module.transformer.parameters(), *module.transformer.buffers()]:
        if t.dtype == torch.float16:
            t.data = t.data.to(dtype)
    module.dtype = dtype
    module.fp16_folded = False
    return module.to(device)


def graph_fp8_amax(onnx_path) -> dict[str, tuple[float, float]]:
    """{layer: (input amax, weight amax)} of an fp8 transformer graph, from its Q/DQ: each MatMul whose two inputs
    are DequantizeLinear outputs is a quantized layer, named by its weight quantizer's scope (the exporter keeps
    the module path of each node); its amax is the DequantizeLinear's scale x 448. Layers reading one input share
    one Q/DQ (to_q, to_k, to_v; w1, w3), so the input's scale is the one feeding each layer's MatMul."""
    import ast

    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    values = {t.name: t for t in graph.initializer}
    values.update({n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant"})
    producer = {o: n for n in graph.node for o in n.output}

    def dequantized(name):  # the DequantizeLinear behind layout ops, if any
        node = producer.get(name)
        while node is not None and node.op_type in ("Transpose", "Reshape", "Cast", "Identity"):
            node = producer.get(node.input[0])
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def layer(dq):
        scopes = ast.literal_eval({p.key: p.value for p in dq.metadata_props}.get("pkg.torch.onnx.name_scopes", "[]"))
        return next((s.removesuffix(".weight_quantizer") for s in scopes if s.endswith(".weight_quantizer")), None)

    def amax(dq) -> float:
        return float(numpy_helper.to_array(values[dq.input[1]]).astype(np.float32)) * E4M3_MAX

    found = {}
    for node in (n for n in graph.node if n.op_type in ("MatMul", "Gemm")):
        a, b = dequantized(node.input[0]), dequantized(node.input[1])
        if a is None or b is None:
            continue
        x, w = (a, b) if layer(b) else (b, a)
        if layer(w) is None:
            raise ValueError(f"{onnx_path}: the quantized MatMul {node.name} names no weight quantizer")
        found[layer(w)] = (amax(x), amax(w))
    return found


def float32_reference(load, wrap, device, offload: bool | None = None) -> torch.nn.Module:
    """`wrap(load())`: a float32 reference to check an exported graph against, runnable on `device`.

    On a GPU its weights stay in host memory and accelerate moves each layer's weights to the GPU only while that
    layer runs (`cpu_offload`), so the GPU holds the exported network and one layer of its reference, never two
    copies of the weights. Wrap before offloading: the export wrappers cut and re-route the libraries' modules,
    and the offload hooks must sit on what is actually called. `offload`: None offloads on a GPU only.
    """
    model = wrap(load(torch.float32, "cpu"))
    if offload if offload is not None else torch.device(device).type != "cpu":
        from accelerate import cpu_offload

        cpu_offload(model, execution_device=torch.device(device))
    return model


def one_pass_inputs(caption_dim: int, width: int, height: int, device) -> tuple:
    """The transformer's inputs for a one-pass check at (width, height): seeded latents, a mid-schedule
    timestep, and a 32-row padded caption of 21 real tokens."""
    g = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(1, 16, height // 8, width // 8, generator=g)
    caption = torch.randn(1, 32, caption_dim, generator=g)
    return tuple(t.to(device) for t in (latents, torch.tensor([0.6]), caption, torch.tensor([21], dtype=torch.int64)))
