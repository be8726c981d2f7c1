"""What an export will take before it starts: disk for the bundle, and host and GPU memory for its largest
network, from the checkpoint's headers; and the cap that makes an export on a big GPU prove it fits a small one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from zimage_trt.common.errors import UserError

from . import checkpoint
from .options import DTYPES, NETWORKS, QUANTIZED, ExportOptions


# component folder of the checkpoint that each network is exported from
SOURCE_COMPONENT = {"text_encoder": "text_encoder", "transformer": "transformer", "vae_decoder": "vae"}


def estimate_bundle_bytes(model_dir: Path, precision: dict) -> int:
    """Bytes the bundle will take: each network's weights in its export precision, and the tokenizer (the VAE's
    encoder is counted though only the decoder is exported: a few tens of MB of margin)."""
    weights = sum(
        checkpoint.weight_count(model_dir, SOURCE_COMPONENT[net]) * DTYPES[precision[net]].itemsize
        for net in NETWORKS
    )
    return weights + sum(f.stat().st_size for f in (Path(model_dir) / "tokenizer").iterdir() if f.is_file())


# What the export holds besides the weights it states: the libraries, the exporter's graph, activations at the opt
# size (measured at full size on the H200: BENCHMARKS.md, "memory-lean export").
GPU_MARGIN = 2 * 10**9
HOST_MARGIN = 4 * 10**9
# Host bytes per transformer weight while an NVFP4 graph's weights are rewritten to FP4 (quantize.finish_nvfp4):
# the fp16 graph read whole, ModelOpt's FP4 values and FP8 and float32 block scales held as node attributes, and
# the copy onnx.save makes. Measured at full size on the H200: 31.4 GB host peak, 3.3 GB of it the libraries.
NVFP4_REWRITE_BYTES = 4.6


@dataclass
class ExportNeeds:
    gpu: int  # bytes of GPU memory (0 for a CPU export)
    host: int  # bytes of host memory
    largest: str  # the network that decides them

    def line(self, device: str) -> str:
        gpu = f"{self.gpu / 1e9:.1f} GB of GPU memory and " if self.gpu else ""
        return f"export on {device} needs about {gpu}{self.host / 1e9:.1f} GB of host memory (largest: {self.largest})"


def export_needs(model_dir: Path, opts: ExportOptions) -> ExportNeeds:
    """The export's peaks, from the checkpoint's headers: one network at a time, each loaded in its export
    precision where it runs (fp16 calibration: bf16 on a GPU, fp32 on a CPU).

    On a CPU the host peak is the loading: the network, and the checkpoint shard being read and cast (measured,
    stage by stage: the ONNX writing holds the weights once). On a GPU the host holds the exporter's copy of the
    graph's weights and the float32 reference a GPU check streams from (reference.py); the GPU, the network and
    its activations. Measured at full size on the H200 (BENCHMARKS.md, "memory-lean export") while the exporter
    still kept every written network alive (fixed since: onnx_export.release_weights): CPU 29.0 GB (now predicted
    26.3), GPU export 46.5 GB host and 21.6 GB GPU (predicted 40.9 and 14.3); the text encoder's 7.8 GB, still
    held, account for each gap. With full-width networks of fewer blocks, every stage now peaks within these terms.
    Since the fix, on the H200 (fp8 and nvfp4 GPU exports): GPU 13.9 GB (predicted 14.3), host 27.9 GB with
    checks (predicted 40.9: the exporter's copy is gone before the float32 reference is built) and 31.4 GB for
    nvfp4 unchecked (the FP4 rewrite; predicted 32.3)."""
    on_gpu = opts.device.startswith("cuda")
    checked = opts.check != "never" and on_gpu
    needs = {}  # network -> (GPU bytes, host bytes)
    for net in NETWORKS:
        count = checkpoint.weight_count(model_dir, SOURCE_COMPONENT[net])
        held = count * DTYPES[opts.precision[net]].itemsize  # the network where it runs
        calibrated = opts.precision[net] in QUANTIZED or (opts.precision[net] == "fp16" and opts.fp16_scales is None)
        if net == "transformer" and calibrated:  # in the calibration's precision (also while quantizing)
            held = max(held, count * (2 if on_gpu else 4))
        if on_gpu:
            copy = count * DTYPES[opts.precision[net]].itemsize  # the exporter's, while it writes the graph
            needs[net] = (held, copy + (count * 4 if checked else 0))
        else:
            needs[net] = (0, held + checkpoint.largest_shard_bytes(model_dir, SOURCE_COMPONENT[net]))
        if opts.precision[net] == "nvfp4":
            needs[net] = (needs[net][0], max(needs[net][1], int(count * NVFP4_REWRITE_BYTES)))
    largest = max(needs, key=lambda net: needs[net][0 if on_gpu else 1])
    return ExportNeeds(max(g for g, _ in needs.values()) + GPU_MARGIN if on_gpu else 0,
                       max(h for _, h in needs.values()) + HOST_MARGIN, largest)


def cap_gpu_memory(device: torch.device, limit: int) -> None:
    """Let this process take at most `limit` bytes of the GPU (PyTorch's allocator refuses beyond it), so an
    export that fits here fits a card of that size."""
    device = torch.device("cuda", torch.cuda.current_device()) if device.index is None else device
    total = torch.cuda.get_device_properties(device).total_memory
    if limit > total:
        raise UserError(f"--max-gpu-memory {limit / 2**30:.1f} GiB is more than this GPU's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(limit / total, device)
