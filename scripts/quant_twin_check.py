#!/usr/bin/env python3
"""The quantized transformer's error at full size, before any export: ModelOpt's fake-quantized eager twin (fp8 or
nvfp4) against the fp16 twin and the float32 reference, on one transformer pass.

It runs what `export --dit-precision FORMAT` runs up to the ONNX step: the calibration prompts' caption features
(text encoder alone), the FP16 rescale calibration, then the FP8/NVFP4 calibration of the rescaled transformer
through the whole schedule (export/quantize.py). Then one pass at --size of: the quantized twin (fp16 with Q/DQ on
the quantized layers), the fp16 twin (the torch backend's module), and diffusers' float32 transformer (offloaded).

    python scripts/quant_twin_check.py --model M [--format fp8|nvfp4] [--size 1024x1024] [--quant-skip first:2]
                                       [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", default="1024x1024", help="WxH of the calibration and the pass (default 1024x1024)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--format", default="fp8", choices=("fp8", "nvfp4"), help="quantization format (default fp8)")
    ap.add_argument("--quant-skip", help="blocks kept unquantized (as export --quant-skip)")
    ap.add_argument("--prompts", type=int, default=0, help="use the first N calibration prompts (default all)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    from zimage_trt.calibration import default_prompts
    from zimage_trt.export import checkpoint
    from zimage_trt.export.calibrate import calibrate, caption_features, run_schedule, schedule_pipeline
    from zimage_trt.export.fp16 import blocks, choose_scales, fold_rescale
    from zimage_trt.export.modules import DiffusersDiT, DiTForExport
    from zimage_trt.export.onnx_export import pair_errors
    from zimage_trt.export.quantize import QuantRecipe, parse_skip, prompts_sha256, quantize
    from zimage_trt.export.reference import float32_reference, one_pass_inputs, reference_modules
    from zimage_trt.common.peaks import release_memory

    width, height = map(int, args.size.lower().split("x"))
    device = torch.device(args.device)
    cal = torch.bfloat16 if device.type == "cuda" else torch.float32
    prompts = default_prompts()[: args.prompts or None]
    seconds = {}

    start = time.perf_counter()
    features = caption_features(args.model, prompts, cal, device)
    scales = choose_scales(calibrate(args.model, prompts, height, width, 9, cal, device, features=features))
    seconds["fp16 calibration (features + peaks)"] = time.perf_counter() - start
    dit = checkpoint.load_transformer(args.model, cal, device)
    fold_rescale(dit, scales)
    recipe = QuantRecipe(args.format, parse_skip(args.quant_skip, list(blocks(dit))), prompts_sha256(prompts))
    start = time.perf_counter()
    pipe = schedule_pipeline(args.model, dit)
    layers = quantize(dit, recipe, lambda _: run_schedule(pipe, features, height, width, recipe.steps))
    seconds[f"{args.format} calibration"] = time.perf_counter() - start
    del pipe, features

    feeds = one_pass_inputs(dit.config.cap_feat_dim, width, height, device)
    out = {}
    with torch.no_grad():
        twin = DiTForExport(dit, torch.float16, inplace=True)
        out[f"{args.format} twin"] = twin(*feeds).cpu()
        del twin, dit
        twin = reference_modules(args.model, torch.float16, device, scales, networks=("transformer",))["transformer"]
        out["fp16 twin"] = twin(*feeds).cpu()
        del twin
        release_memory(device)
        reference = float32_reference(functools.partial(checkpoint.load_transformer, args.model), DiffusersDiT, device)
        out["float32"] = reference(*feeds).cpu()

    q = f"{args.format} twin"
    rows, table = pair_errors(out, ((q, "float32"), (q, "fp16 twin"), ("fp16 twin", "float32")))
    print(f"{args.format.upper()} transformer at {width}x{height}: {layers} layers quantized, "
          f"skip {recipe.skip or 'none'}, "
          f"{len(prompts)} calibration prompts x 9 steps")
    print(table)
    for k, v in seconds.items():
        print(f"{k:<36} {v:8.1f} s")
    if device.type == "cuda":
        print(f"GPU allocator peak: {torch.cuda.max_memory_allocated(device) / 1e9:.1f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps({"format": args.format, "size": [width, height], "layers": layers,
                                               "skip": recipe.skip, "unblocked": recipe.unblocked,
                                               "errors": rows, "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
