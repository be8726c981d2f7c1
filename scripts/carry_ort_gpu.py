#!/usr/bin/env python3
"""Prepare onnxruntime-gpu for a GPU machine that cannot reach PyPI, in parts one device call can carry.

The wheel (255 MB for 1.31.1, a CUDA 13 build) is over what one call carries (64 MiB with the working tree), so:

    1. pip download onnxruntime-gpu==VERSION for the device's Python (3.12, manylinux x86-64), no dependencies
       (the device's torch CUDA 13 build brings the CUDA 13 and cuDNN 9 libraries it links)
    2. unpack it and pack the files as tar | xz (smaller than the wheel's zip), then split that into parts of at
       most --part-mib MiB in --out (default .whl/ort-gpu: .gitignore ignores /.whl/, so the parts travel only
       where a call names them in `carry`)
    3. print the device calls: one per part, in quick succession (a warm machine keeps /tmp; it is given back
       after 30 s idle), each copying its part to /tmp/ortw, then the join step (cat, sha256 check, untar into
       /tmp/site) and the check that onnxruntime sees its CUDA provider; every later command starts with
       `export PYTHONPATH=/tmp/site`

    python scripts/carry_ort_gpu.py [--version 1.31.1] [--wheel FILE] [--out .whl/ort-gpu] [--part-mib 46]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
STAGE = "/tmp/ortw"  # where the parts gather on the device machine
SITE = "/tmp/site"  # where the package is unpacked there (PYTHONPATH)


def download(version: str, dest: Path) -> Path:
    """The wheel for the device's Python, from PyPI through pip."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest),
           f"onnxruntime-gpu=={version}"]
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob(f"onnxruntime_gpu-{version}-*.whl"))
    if not wheels:
        sys.exit(f"error: pip saved no onnxruntime_gpu-{version} wheel in {dest}")
    return wheels[-1]


def pack(wheel: Path, archive: Path) -> None:
    """The wheel's files as one tar.xz (xz -6 on every core)."""
    with tempfile.TemporaryDirectory() as tmp:
        zipfile.ZipFile(wheel).extractall(tmp)
        tar = subprocess.Popen(["tar", "cf", "-", "-C", tmp, "."], stdout=subprocess.PIPE)
        with open(archive, "wb") as out:
            subprocess.run(["xz", "-6", "-T0"], stdin=tar.stdout, stdout=out, check=True)
        tar.stdout.close()
        if tar.wait() != 0:
            sys.exit("error: tar failed while packing the wheel")


def split(archive: Path, out: Path, part_bytes: int) -> list[Path]:
    """archive -> out/part-00, part-01, ... of at most part_bytes each."""
    parts = []
    with open(archive, "rb") as f:
        while chunk := f.read(part_bytes):
            part = out / f"part-{len(parts):02d}"
            part.write_bytes(chunk)
            parts.append(part)
    return parts


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def device_calls(parts: list[Path], digest: str) -> list[dict]:
    """The `run` calls, as the device tool takes them: one per part, then the join and the check."""
    calls = []
    for part in parts:
        rel = part.relative_to(REPO).as_posix()
        calls.append({"command": f"mkdir -p {STAGE} && cp {rel} {STAGE}/ && ls -l {STAGE}", "carry": [rel]})
    join = (f"cat {STAGE}/part-* > {STAGE}/ort.tar.xz && echo '{digest}  {STAGE}/ort.tar.xz' | sha256sum -c && "
            f"mkdir -p {SITE} && xz -dc {STAGE}/ort.tar.xz | tar xf - -C {SITE} && rm {STAGE}/part-* && "
            f"export PYTHONPATH={SITE} && python3 -c \"import torch; torch.zeros(1).cuda(); import onnxruntime as o; "
            "print(o.__file__, o.__version__, o.get_available_providers())\"")
    calls.append({"command": join})
    return calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", default="1.31.1", help="onnxruntime-gpu version (default 1.31.1, CUDA 13)")
    ap.add_argument("--wheel", help="a wheel already downloaded (skips pip)")
    ap.add_argument("--out", default=str(REPO / ".whl" / "ort-gpu"), help="folder for the parts (ignored by git)")
    ap.add_argument("--part-mib", type=int, default=46, help="largest part in MiB (default 46: the rest of a call's "
                    "64 MiB is left for the working tree)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    if not out.is_relative_to(REPO):
        sys.exit(f"error: --out {out} must be inside the checkout {REPO}: a device call carries only paths there")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    wheel = Path(args.wheel) if args.wheel else download(args.version, out / "wheel")
    archive = out / "ort.tar.xz"
    print(f"packing {wheel.name} ({wheel.stat().st_size / 2**20:.0f} MiB) as tar.xz ...", flush=True)
    pack(wheel, archive)
    digest = sha256(archive)
    parts = split(archive, out, args.part_mib * 2**20)
    archive.unlink()
    shutil.rmtree(out / "wheel", ignore_errors=True)
    print(f"{len(parts)} parts of at most {args.part_mib} MiB in {out} (sha256 of the whole {digest})")
    calls = device_calls(parts, digest)
    (out / "calls.json").write_text(json.dumps(calls, indent=1) + "\n")
    print("device calls, in quick succession on one warm machine (also in calls.json):")
    for i, call in enumerate(calls, 1):
        print(f"  {i}. run {json.dumps(call)}")
    print(f"then begin every command there with: export PYTHONPATH={SITE};")
    return 0


if __name__ == "__main__":
    sys.exit(main())
