"""Roofline floors of bench's stages: what each would take if it ran at this device's measured peak.

    transformer pass   its matmul FLOPs (counted from the config) over the bf16 matmul rate; for an fp8 transformer
                       the quantized layers' FLOPs over the FP8 rate (torch._scaled_mm, measured) and the rest over
                       the bf16 rate
    text encoder       the larger of its weight bytes over the memory bandwidth (every weight is read once per
                       prompt: on ~100 tokens it is bandwidth-bound) and its FLOPs over the matmul rate
    VAE decode         its FLOPs over the matmul rate (counted by torch's FLOP counter on a meta-device copy)

Rates are measured in the same process, on the same device: bf16 8192^3 matmuls on a GPU (fp32 1024^3 on a CPU),
a 1 GiB copy for the bandwidth (64 MiB on a CPU), FP8 8192^3 on a GPU with FP8 tensor cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zimage_trt.runtime.timing import Clock


def _timed(device, fn, reps: int) -> float:
    """Seconds per call of fn() after warm-up, timed on the device."""
    for _ in range(3):
        fn()
    clock = Clock(device)
    clock.sync()
    begin = clock.start()
    for _ in range(reps):
        fn()
    elapsed = clock.stop(begin)
    clock.sync()
    return elapsed() / 1e3 / reps


def matmul_rate(device: torch.device) -> tuple[float, str]:
    """Sustained dense matmul FLOP/s on this device: bf16 8192^3 on a GPU, fp32 1024^3 on a CPU."""
    n, dtype, reps = (8192, torch.bfloat16, 20) if device.type == "cuda" else (1024, torch.float32, 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _timed(device, lambda: a @ b, reps), f"{str(dtype).split('.')[-1]} {n}^3"


def fp8_rate(device: torch.device) -> float | None:
    """FP8 E4M3 matmul FLOP/s (torch._scaled_mm 8192^3, bf16 out); None without FP8 tensor cores."""
    from zimage_trt.runtime.torch_fp8 import MIN_CAPABILITY

    if device.type != "cuda" or torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        return None
    n = 8192
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=device)
    return 2 * n**3 / _timed(device, lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one,
                                                                out_dtype=torch.bfloat16), 20)


def memory_bandwidth(device: torch.device) -> float:
    """Bytes/s a device-to-device copy moves (read + write)."""
    n = 2**30 if device.type == "cuda" else 2**26
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / _timed(device, lambda: dst.copy_(src), 10)


def _config(model_dir, component: str) -> dict:
    cfg = json.loads((Path(model_dir) / component / "config.json").read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def text_encoder_cost(model_dir, tokens: int) -> tuple[float, int]:
    """(FLOPs, parameters read) of the text encoder on `tokens` tokens: its first N-1 layers, as exported (the
    embedding reads only the prompt's rows). FLOPs: 2 per weight per token, and the attention's two products."""
    from transformers import Qwen3Config, Qwen3Model

    cfg = _config(model_dir, "text_encoder")
    with torch.device("meta"):
        model = Qwen3Model(Qwen3Config(**cfg))
    layers = model.layers[:-1]  # hidden_states[-2]: the last layer never runs
    params = sum(p.numel() for p in layers.parameters())
    attention = 2 * 2 * tokens * tokens * cfg["num_attention_heads"] * cfg["head_dim"] * len(layers)
    return float(2 * tokens * params + attention), params


def vae_flops(model_dir, width: int, height: int) -> float:
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL(**_config(model_dir, "vae"))
    latents = torch.zeros(1, vae.config.latent_channels, height // 8, width // 8, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.decode(latents)
    return float(counter.get_total_flops())


def quantized_flops(cfg: dict, image_tokens: int, caption_tokens: int, quantized_blocks: list[str]) -> float:
    """Matmul FLOPs of one transformer pass in the recipe's FP8 layers (q, k, v, out, w1, w2, w3 of each
    quantized block), over the tokens each block sees."""
    d = cfg["dim"]
    per_token = 2 * (4 * d * d + 3 * d * int(d / 3 * 8))
    tokens = {"noise_refiner": image_tokens, "context_refiner": caption_tokens, "layers": image_tokens + caption_tokens}
    return float(sum(per_token * tokens[b.split(".")[0]] for b in quantized_blocks))


def stage_floors(model_dir, rates: dict, size: tuple[int, int], tokens: int, dit_flops: float, weight_bytes: int,
                 quantized: float | None = None) -> dict:
    """{stage: floor ms} for one system: `rates` from `measure_rates`; `quantized`: its FP8 FLOPs per pass."""
    te_flops, te_params = text_encoder_cost(model_dir, tokens)
    te_ms = max(te_params * weight_bytes / rates["bandwidth"], te_flops / rates["matmul"]) * 1e3
    pass_ms = dit_flops / rates["matmul"] * 1e3
    if quantized and rates.get("fp8"):
        pass_ms = ((dit_flops - quantized) / rates["matmul"] + quantized / rates["fp8"]) * 1e3
    return {"text encoder": te_ms, "transformer x1": pass_ms, "VAE decode": vae_flops(model_dir, *size)
            / rates["matmul"] * 1e3}


def measure_rates(device: torch.device) -> dict:
    rate, how = matmul_rate(device)
    return {"matmul": rate, "matmul_how": how, "fp8": fp8_rate(device), "bandwidth": memory_bandwidth(device)}
