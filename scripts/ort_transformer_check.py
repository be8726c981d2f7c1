#!/usr/bin/env python3
"""Run a bundle's transformer.onnx once with onnxruntime on the CPU, beside its eager twin and the float32
reference, at the same inputs: the graph itself checked at full size, not only the module that was traced.

    eager twin   the exported module run by PyTorch (the bundle's precision and FP16 rescale, on --device)
    float32      the diffusers transformer in float32, offloaded layer by layer to --device (export/reference.py)

Prints one table (max |error| and relative error of each pair, the time of each run) and writes it as JSON:

    python scripts/ort_transformer_check.py --bundle B --model M [--size 1024x1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--model", required=True, help="the model folder the bundle was exported from")
    ap.add_argument("--size", help="WxH to run at (default: the bundle's opt size)")
    ap.add_argument("--device", default="cuda", help="where the eager twin and the reference run")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="onnxruntime intra-op threads")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import onnxruntime as ort

    from zimage_trt.export import checkpoint
    from zimage_trt.export.options import DTYPES
    from zimage_trt.export.modules import DiffusersDiT
    from zimage_trt.export.onnx_export import pair_errors
    from zimage_trt.export.reference import float32_reference, one_pass_inputs, reference_modules
    from zimage_trt.common.peaks import release_memory

    bundle = Path(args.bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    net = manifest["networks"]["transformer"]
    width, height = (map(int, args.size.lower().split("x")) if args.size
                     else (manifest["width"], manifest["height"]))
    device = torch.device(args.device)
    feeds = one_pass_inputs(manifest["caption_dim"], width, height, "cpu")
    times, outputs = {}, {}

    start = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(bundle / net["onnx"]), options, providers=["CPUExecutionProvider"])
    times["onnxruntime session"] = time.perf_counter() - start
    names = [i.name for i in session.get_inputs()]
    start = time.perf_counter()
    outputs["onnxruntime"] = torch.from_numpy(session.run(None, dict(zip(names, (t.numpy() for t in feeds))))[0])
    times["onnxruntime run"] = time.perf_counter() - start
    del session

    with torch.no_grad():
        twin = reference_modules(args.model, DTYPES[net["precision"]], device, net.get("fp16_scales"),
                                 networks=("transformer",))["transformer"]
        on_device = tuple(t.to(device) for t in feeds)
        start = time.perf_counter()
        outputs["eager twin"] = twin(*on_device).cpu()
        times["eager twin run"] = time.perf_counter() - start
        del twin
        release_memory(device)
        reference = float32_reference(functools.partial(checkpoint.load_transformer, args.model), DiffusersDiT, device)
        start = time.perf_counter()
        outputs["float32"] = reference(*on_device).cpu()
        times["float32 run (offloaded)"] = time.perf_counter() - start

    rows, table = pair_errors(outputs, (("onnxruntime", "eager twin"), ("onnxruntime", "float32"),
                                        ("eager twin", "float32")))
    print(f"transformer.onnx ({net['precision']}, {net['bytes'] / 1e9:.1f} GB) at {width}x{height}, "
          f"onnxruntime {ort.__version__} on {args.threads} CPU threads")
    print(table)
    for k, v in times.items():
        print(f"{k:<28} {v:9.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": [width, height], "errors": rows, "seconds": times,
                                               "onnxruntime": ort.__version__, "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()
