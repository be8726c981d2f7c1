#!/usr/bin/env python3
"""Run one zimage-trt command as on a smaller GPU: PyTorch's allocator may take at most SIZE of it.

    python scripts/capped.py 24GiB generate --bundle B --backend torch --model M --vram sequential ...

At exit it prints the allocator's peaks; running out of memory under the cap is one line and exit code 3.
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    from zimage_trt.cli import main as cli
    from zimage_trt.cli_args import parse_bytes

    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    cap = parse_bytes(sys.argv[1], "the cap")
    if not torch.cuda.is_available():  # a dry run on a CPU: nothing to cap
        print("no CUDA GPU: running uncapped")
        return cli(sys.argv[2:]) or 0
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    try:
        code = cli(sys.argv[2:])
    except torch.OutOfMemoryError as exc:
        print(f"out of GPU memory under the {cap / 2**30:.1f} GiB cap: {str(exc).splitlines()[0][:200]}")
        code = 3
    print(f"allocator peaks under the {cap / 2**30:.1f} GiB cap: allocated "
          f"{torch.cuda.max_memory_allocated() / 1e9:.2f} GB, reserved {torch.cuda.max_memory_reserved() / 1e9:.2f} GB")
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
