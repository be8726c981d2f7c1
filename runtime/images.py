"""Images in and out of the runtime: the finished pixels written as PNG.

The pipelines to come read their input images here too (img2img's image, inpaint's mask, ControlNet's control
image), resized to the request's size as diffusers' image processor does, before the input step encodes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from zimage_trt.common.errors import UserError
from zimage_trt.common.files import write_atomic, writing


def save_png(pixels: np.ndarray, path) -> None:
    """Write an HxWx3 uint8 array as PNG, atomically (a temp file renamed into place). A full disk or an
    unwritable folder is one line, and no temp file is left; one left by a killed run is removed first."""
    import io

    from PIL import Image

    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    with writing(path, "free space there or pass another --out"):
        write_atomic(path, buf.getvalue())
