#!/usr/bin/env python3
"""One transformer pass at full size: diffusers' module beside the export wrapper (the torch backend), eager.

A quick check of the eager reference's speed that needs no bundle: the real DiT configuration with random
weights, bf16, 1024x1024, a 32-token caption; CUDA events, median of --iters passes after warm-up.

    python scripts/pass_bench.py [--iters 10]
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

    from zimage_trt.export.configs import FULL, dit_flops_per_pass
    from zimage_trt.export.modules import DiffusersDiT, DiTForExport

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    cfg = {k: v for k, v in FULL["transformer"].items() if not k.startswith("_")}
    with torch.device("cuda"):
        torch.manual_seed(0)
        dit = ZImageTransformer2DModel(**cfg).to(torch.bfloat16).eval()
    wrapper = DiTForExport(dit, 128, 128, torch.bfloat16)
    reference = DiffusersDiT(dit)
    g = torch.Generator("cuda").manual_seed(0)
    inputs = (
        torch.randn(1, 16, 128, 128, device="cuda", generator=g),
        torch.tensor([0.3], device="cuda"),
        torch.randn(1, 32, cfg["cap_feat_dim"], device="cuda", generator=g),
        torch.tensor([30], device="cuda"),
    )
    flops = dit_flops_per_pass(cfg, 4096, 32)
    rows = [("diffusers ZImageTransformer2DModel", reference), ("zimage-trt DiTForExport (torch backend)", wrapper)]
    out = {name: module(*inputs) for name, module in rows}
    diff = (out[rows[0][0]] - out[rows[1][0]]).abs().max().item()
    print(f"{torch.cuda.get_device_name()}  bf16  1024x1024  caption 32  {flops / 1e12:.1f} TFLOP per pass")
    for name, module in rows:
        ms = time_ms(lambda: module(*inputs), args.iters)
        print(f"{name:<42} {ms:8.2f} ms  {flops / ms / 1e9:6.0f} TFLOP/s")
    print(f"max |difference| between the two outputs: {diff:.3e}")


if __name__ == "__main__":
    main()
