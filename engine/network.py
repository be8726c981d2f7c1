"""An ONNX graph parsed into a strongly typed network, and what the builder must be told about it: attention
that may run unfused, weights that stay refittable."""

from __future__ import annotations

from pathlib import Path

from zimage_trt.common.errors import UserError

from .trt_api import Flavour


def parse_network(flavour: Flavour, builder, logger, path: Path):
    trt = flavour.trt
    network = builder.create_network(flavour.network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        err = parser.get_error(0)
        node = err.node_name() or f"#{err.node()}"
        raise UserError(
            f"{path.name} does not parse with {flavour.name} {flavour.version}: node '{node}' "
            f"({err.node_operator()}): {err.desc()}"
        )
    return network, parser


MAX_FUSED_HEAD_DIM = 256  # the largest head size TensorRT's fused attention kernels take


def allow_unfused_attention(flavour: Flavour, network, fp32: bool) -> int:
    """Let attention that has no fused kernel fall back to unfused ones; returns how many were marked.

    The fused attention kernels are FP16/BF16 (and FP8) with head sizes up to 256. An FP32 graph's attention and
    the Flux VAE's single-head attention (head size 512) have no dedicated kernel, and the builder refuses them
    unless they are marked decomposable (a one-size VAE engine can still find one; a size range cannot). FP32
    engines are for parity checks, not speed, and the VAE's one attention is a small part of its time; the
    transformer's FP16/BF16 attention (head size 128) is never decomposed, so a missing fused kernel there fails
    the build instead of running slowly.
    """
    trt = flavour.trt
    kind = getattr(trt.LayerType, "ATTENTION_INPUT", None)
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if kind is not None and layer.type == kind:
            layer.__class__ = trt.IAttentionInputLayer  # the Python API's documented downcast
            head_dim = layer.attention.get_input(0).shape[-1]
            if fp32 or head_dim > MAX_FUSED_HEAD_DIM:
                layer.attention.decomposable = True
                count += 1
    return count


def mark_refittable(flavour: Flavour, network, config, net_info: dict) -> int:
    """REFIT_INDIVIDUAL with the transformer's mapped weights (the ones a LoRA can change) marked refittable: the
    rest stay constants the builder may fold and fuse. Returns how many were marked."""
    weights = net_info.get("weights")
    if not weights:
        raise UserError("--refittable needs the bundle's weight map, which this bundle predates; re-export it")
    config.set_flag(flavour.trt.BuilderFlag.REFIT_INDIVIDUAL)
    marked = 0
    for entry in weights.values():
        if not network.mark_weights_refittable(entry["initializer"]):
            raise UserError(f"the transformer graph has no weights named {entry['initializer']!r} to mark refittable; "
                            "the bundle's weight map is stale, re-export it")
        marked += 1
    return marked
