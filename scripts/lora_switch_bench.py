"""What switching LoRAs costs at full size on the torch backend: one weight update, timed, beside a reload.

The full Z-Image-Turbo transformer (random weights, bf16) on the GPU behind a TorchSession; a rank-R LoRA on
every attention projection and feed-forward weight (the weights Z-Image LoRAs train); the runtime's own path:
patched_weights (one weight at a time) -> set_weights. Prints one table. Usage: python scripts/lora_switch_bench.py [RANK] [--tiny-cpu]
"""

from __future__ import annotations

import sys
import time

import torch


def main(rank: int = 32, device: str = "cuda", tiny: bool = False) -> None:
    from diffusers import ZImageTransformer2DModel

    from zimage_trt.export.configs import FULL
    from zimage_trt.export.modules import DiTForExport
    from zimage_trt.runtime.lora import Lora, patched_weights
    from zimage_trt.runtime.torch_session import TorchSession

    dev = torch.device(device)
    source = FULL if not tiny else __import__("zimage_trt.export.configs", fromlist=["tiny"]).tiny(1000)
    cfg = {k: v for k, v in source["transformer"].items() if not k.startswith("_")}
    with torch.device(dev):
        dit = ZImageTransformer2DModel(**cfg).to(torch.bfloat16)
    session = TorchSession("transformer", DiTForExport(dit, torch.bfloat16, inplace=True), dev, "bf16")
    targets = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
               "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    params = {n: p for n, p in dit.named_parameters() if any(n.endswith(t + ".weight") for t in targets)}
    weights = {n: {"shape": list(p.shape), "divisor": 1.0, "initializer": n, "transposed": False}
               for n, p in params.items()}
    gen = torch.Generator(dev).manual_seed(0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def lora(name):
        pairs = {n: (torch.randn(p.shape[0], rank, device=dev, generator=gen) * 0.01,
                     torch.randn(rank, p.shape[1], device=dev, generator=gen) * 0.01) for n, p in params.items()}
        return Lora(name, None, pairs, {})

    a, b = lora("a"), lora("b")

    def switch(stack) -> float:
        sync()
        t0 = time.perf_counter()
        session.set_weights(patched_weights(session, weights, stack, dev))
        sync()
        return (time.perf_counter() - t0) * 1e3

    switch([(a, 1.0)])  # warm-up (allocator, kernels)
    switch([])
    rows = [("base -> A", switch([(a, 1.0)])), ("A -> B (0.5)", switch([(b, 0.5)])),
            ("B -> A + B stacked", switch([(a, 0.8), (b, 0.5)])), ("stack -> base", switch([]))]
    n_bytes = sum(p.numel() * p.element_size() for p in params.values())
    print(f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}  {'tiny' if tiny else 'full-size'} transformer bf16, {len(params)} LoRA weights "
          f"({n_bytes / 1e9:.2f} GB of them), rank {rank}, pairs {sum(u.numel() + d.numel() for u, d in a.pairs.values()) * 4 / 1e6:.0f} MB")
    print(f"{'switch':<22}{'ms':>10}")
    for what, ms in rows:
        print(f"{what:<22}{ms:>10.1f}")
    if dev.type == "cuda":
        print(f"peak allocated {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(int(args[0]) if args else 32, *(["cpu", True] if "--tiny-cpu" in args else []))
