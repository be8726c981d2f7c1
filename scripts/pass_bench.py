#!/usr/bin/env python3
"""One transformer pass at full size, per image size: diffusers' module beside the export wrapper (the torch
backend), eager, with the roofline floor of each size.

Needs no bundle: the real DiT configuration with random weights, bf16, a 32-token caption; CUDA events, median
of --iters passes after warm-up. For each size it prints the pass time of both modules, the matmul + attention
FLOPs counted from the config, the floor at the bf16 matmul rate measured in the same run, and time / floor.

    python scripts/pass_bench.py [--iters 10] [--sizes 768x768,1024x1024,1536x1024,1536x1536,2048x2048]

--fp8-error instead measures the torch backend's FP8 transformer (an fp8 bundle's graph scales on torch._scaled_mm)
against the bf16 and float32 transformers of the same model, one pass at each size, max|err| / max|reference|:

    python scripts/pass_bench.py --fp8-error --model MODEL --fp8-bundle BUNDLE [--sizes 1024x1024] [--json F]
"""

from __future__ import annotations

import argparse
import statistics

import torch

# The fake-quantized eager twin of the full-size fp8 transformer against float32 (H200, random weights; README,
# Precision): what ModelOpt's own emulation costs, beside which the torch backend's FP8 error is read.
TWIN_REL = 6.3e-2


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
def fp8_errors(model, fp8_bundle, sizes: list, device: torch.device) -> list[dict]:
    """One pass per size of the FP8 torch transformer, the bf16 one and the float32 one (one at a time on the
    device), and the FP8 one's error against each. A CPU runs the FP8 matmuls emulated (the rehearsal)."""
    from zimage_trt.export.reference import graph_fp8_amax, one_pass_inputs, reference_modules
    from zimage_trt.runtime.bundle import Bundle

    bundle = Bundle.open(fp8_bundle)
    caption_dim = bundle.caption_dim
    amax = graph_fp8_amax(bundle.onnx_path("transformer"))
    scales = bundle.network("transformer").get("fp16_scales")
    outputs = {}
    for name, dtype, fp8 in (("fp8", torch.bfloat16, amax), ("bf16", torch.bfloat16, None),
                             ("fp32", torch.float32, None)):
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # a float32 reference in float32 (facts: TF32)
        dit = reference_modules(model, dtype, device, scales, networks=("transformer",), fp8_amax=fp8)["transformer"]
        outputs[name] = [dit(*one_pass_inputs(caption_dim, w, h, device)).float().cpu() for w, h in sizes]
        del dit
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = []
    for k, (w, h) in enumerate(sizes):
        got = outputs["fp8"][k]
        row = {"size": f"{w}x{h}"}
        for ref in ("bf16", "fp32"):
            want = outputs[ref][k]
            row[f"rel_vs_{ref}"] = ((got - want).abs().max() / want.abs().max()).item()
        row["bf16_vs_fp32"] = ((outputs["bf16"][k] - outputs["fp32"][k]).abs().max()
                               / outputs["fp32"][k].abs().max()).item()
        rows.append(row)
    return rows


def fp8_error_main(args) -> None:
    import json

    from zimage_trt.runtime.sizes import parse_size

    device = torch.device(args.device)
    rows = fp8_errors(args.model, args.fp8_bundle, [parse_size(t) for t in args.sizes.split(",")], device)
    print(f"{'size':<10} {'fp8 vs bf16':>12} {'fp8 vs fp32':>12} {'bf16 vs fp32':>13}   fake-quantized twin "
          f"(export check, H200): {TWIN_REL:.1e} vs fp32")
    for r in rows:
        print(f"{r['size']:<10} {r['rel_vs_bf16']:12.3e} {r['rel_vs_fp32']:12.3e} {r['bf16_vs_fp32']:13.3e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "twin_rel_vs_fp32": TWIN_REL}, f, indent=2)


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
    ap.add_argument("--fp8-error", action="store_true", help="measure the FP8 torch transformer's error instead")
    ap.add_argument("--model", help="--fp8-error: the model folder")
    ap.add_argument("--fp8-bundle", help="--fp8-error: an fp8 bundle of that model")
    ap.add_argument("--device", default="cuda", help="--fp8-error: cuda (default) or cpu for a rehearsal")
    ap.add_argument("--json", help="--fp8-error: also write the rows here")
    args = ap.parse_args()
    if args.fp8_error:
        return fp8_error_main(args)
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
    head = (f"{'size':<10} {'tokens':>6} {'TFLOP':>7} {'floor ms':>9} {'diffusers ms':>13} {'runtime ms':>11} "
            f"{'x floor':>8}  max|diff|")
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
