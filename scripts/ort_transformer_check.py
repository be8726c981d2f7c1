#!/usr/bin/env python3
"""Run a bundle's transformer.onnx once with onnxruntime (on the CPU, or with --ort-device cuda on onnxruntime-gpu's
CUDA provider: real FP16 kernels), beside its eager twin and the float32 reference, at the same inputs: the graph
itself checked at full size, not only the module that was traced.

    eager twin   the exported module run by PyTorch (the bundle's precision and FP16 rescale, on --device)
    float32      the diffusers transformer in float32, offloaded layer by layer to --device (export/reference.py)

Prints one table (max |error| and relative error of each pair, the time of each run) and writes it as JSON:

    python scripts/ort_transformer_check.py --bundle B --model M [--size WxH] [--ort-device cuda] [--json out.json]
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
    ap.add_argument("--ort-device", default="cpu", help="where onnxruntime runs the graph: cpu (default; it computes "
                    "FP16 chains in FP32) or cuda (onnxruntime-gpu, the backend's own session)")
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

    outputs["onnxruntime"] = run_onnxruntime(bundle / net["onnx"], net["precision"], feeds, args, times)

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
    where = f"{args.threads} CPU threads" if args.ort_device == "cpu" else args.ort_device
    print(f"transformer.onnx ({net['precision']}, {net['bytes'] / 1e9:.1f} GB) at {width}x{height}, "
          f"onnxruntime {ort.__version__} on {where}")
    print(table)
    for k, v in times.items():
        print(f"{k:<28} {v:9.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": [width, height], "errors": rows, "seconds": times,
                                               "onnxruntime": ort.__version__, "threads": args.threads,
                                               "ort_device": args.ort_device}, indent=2))


def run_onnxruntime(path, precision, feeds, args, times) -> torch.Tensor:
    """The graph's velocity from onnxruntime on --ort-device (the CPU session as before, or the backend's CUDA
    session bound to device buffers), timing the session's creation and its one run."""
    from zimage_trt.runtime.ort_session import OrtSession

    device = torch.device(args.ort_device)
    start = time.perf_counter()
    session = OrtSession("transformer", path, precision, device, threads=args.threads, cuda_graph=False)
    times["onnxruntime session"] = time.perf_counter() - start
    on_device = {n: t.to(device) for n, t in zip(session.input_names, feeds)}
    out = torch.empty(feeds[0].shape, dtype=torch.float32, device=device)
    start = time.perf_counter()
    session.run(on_device, {session.output_names[0]: out})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times["onnxruntime run"] = time.perf_counter() - start
    session.close()
    return out.cpu()


if __name__ == "__main__":
    main()
