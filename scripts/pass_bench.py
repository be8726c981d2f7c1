#!/usr/bin/env python3
"""One transformer pass at full size, per image size: diffusers' module beside the export wrapper (the torch
backend), eager, with the roofline floor of each size.

Needs no bundle: the real DiT configuration with random weights, bf16, a 32-token caption; CUDA events, median
of --iters passes after warm-up. For each size it prints the pass time of both modules, the matmul + attention
FLOPs counted from the config, the floor at the bf16 matmul rate measured in the same run, and time / floor.

    python scripts/pass_bench.py [--iters 10] [--sizes 768x768,1024x1024,1536x1024,1536x1536,2048x2048]
"""

from __future__ import annotations

import argparse
import statistics

import torch


def time_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    from diffusers import ZImageTransformer2DModel

    from zimage_trt.bench import matmul_rate
    from zimage_trt.export.configs import FULL, dit_flops_per_pass, tiny
    from zimage_trt.export.modules import DiffusersDiT, DiTForExport, padded_length
    from zimage_trt.runtime.sizes import latent_shape, parse_size

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--sizes", default="768x768,1024x1024,1536x1024,1536x1536,2048x2048")
    ap.add_argument("--size", default="full", choices=("full", "tiny"), help="tiny: a quick dry run of the script")
    args = ap.parse_args()
    device = torch.device("cuda")
    rate, how = matmul_rate(device)
    cfg = FULL["transformer"] if args.size == "full" else tiny(1000)["transformer"]
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    with torch.device("cuda"):
        torch.manual_seed(0)
        dit = ZImageTransformer2DModel(**cfg).to(torch.bfloat16).eval()
    modules = {"diffusers": DiffusersDiT(dit), "runtime": DiTForExport(dit, torch.bfloat16)}
    g = torch.Generator("cuda").manual_seed(0)
    caption = torch.randn(1, 32, cfg["cap_feat_dim"], device="cuda", generator=g)
    print(f"{torch.cuda.get_device_name()}  bf16  caption 32 tokens  matmul rate {rate / 1e12:.0f} TFLOP/s ({how})")
    head = f"{'size':<10} {'tokens':>6} {'TFLOP':>7} {'floor ms':>9} {'diffusers ms':>13} {'runtime ms':>11} {'x floor':>8}  max|diff|"
    print(head)
    print("-" * len(head))
    for text in args.sizes.split(","):
        width, height = parse_size(text)
        inputs = (
            torch.randn(latent_shape(width, height), device="cuda", generator=g),
            torch.tensor([0.3], device="cuda"),
            caption,
            torch.tensor([30], device="cuda"),
        )
        tokens = padded_length((width // 16) * (height // 16))
        flops = dit_flops_per_pass(cfg, tokens, 32)
        floor = flops / rate * 1e3
        diff = (modules["diffusers"](*inputs) - modules["runtime"](*inputs)).abs().max().item()
        ms = {name: time_ms(lambda m=m: m(*inputs), args.iters) for name, m in modules.items()}
        print(f"{text:<10} {tokens:>6} {flops / 1e12:7.1f} {floor:9.1f} {ms['diffusers']:13.2f} {ms['runtime']:11.2f}"
              f" {ms['runtime'] / floor:8.2f}  {diff:.2e}")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
