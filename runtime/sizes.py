"""Image sizes: the one description of which WIDTHxHEIGHT a bundle, an engine or a server covers.

Sizes are written as OpenAI writes them, `WIDTHxHEIGHT`. A side is a multiple of 16 pixels (the VAE's factor 8
times the transformer's patch 2), so every size maps to whole latent pixels and whole image tokens. A range is a
box: height in [min, max] and width in [min, max], both in steps of 16, plus the size engines are tuned for
(`opt`). That is exactly what a TensorRT optimization profile covers (per-axis min/max on the latent shape), so a
bundle's range, an engine's profile and the sizes a server accepts are all one `SizeRange`. A one-size bundle is
the range whose min equals its max.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from zimage_trt.common.errors import UserError

SIDE_MULTIPLE = 16  # pixels per image token side: VAE factor 8 x patch 2
LATENT_FACTOR = 8  # pixels per latent pixel
DEFAULT_OPT_SIDE = 1024  # Z-Image-Turbo's native size: what engines are tuned for unless told otherwise
_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_size(text: str, what: str = "size") -> tuple[int, int]:
    """'1536x1024' -> (width 1536, height 1024); one-line error for anything else."""
    m = _SIZE.match(str(text))
    if not m:
        raise UserError(f"{what} {text!r} is not WIDTHxHEIGHT, e.g. 1024x1024 or 1536x1024")
    return int(m.group(1)), int(m.group(2))


def format_size(width: int, height: int) -> str:
    return f"{width}x{height}"


def check_side(value: int, what: str) -> None:
    if value <= 0 or value % SIDE_MULTIPLE:
        raise UserError(f"{what} {value} must be a positive multiple of {SIDE_MULTIPLE}")


@dataclass(frozen=True)
class SizeRange:
    min_height: int
    max_height: int
    min_width: int
    max_width: int
    opt_height: int
    opt_width: int

    # ---------------------------------------------------------------- construction
    @classmethod
    def single(cls, width: int, height: int) -> "SizeRange":
        check_side(width, "width")
        check_side(height, "height")
        return cls(height, height, width, width, height, width)

    @classmethod
    def square_range(cls, spec: str, opt: tuple[int, int] | None = None) -> "SizeRange":
        """`--size-range MIN:MAX` (both sides in [MIN, MAX]) with the opt size (width, height); without one,
        1024x1024 where the range holds it, else the square size nearest to it inside the range."""
        parts = str(spec).split(":")
        try:
            lo, hi = (int(p) for p in parts)
        except ValueError:
            raise UserError(f"--size-range {spec!r} must be MIN:MAX in pixels, e.g. 512:2048") from None
        check_side(lo, "--size-range minimum")
        check_side(hi, "--size-range maximum")
        if lo > hi:
            raise UserError(f"--size-range {spec!r}: the minimum is larger than the maximum")
        if opt is None:
            side = min(max(DEFAULT_OPT_SIDE, lo), hi)  # lo and hi are on the grid, so the nearest side is too
            opt = (side, side)
        rng = cls(lo, hi, lo, hi, opt[1], opt[0])
        if not rng.covers(*opt):
            raise UserError(f"--opt-size {format_size(*opt)} is outside --size-range {spec} ({rng.describe()})")
        return rng

    @classmethod
    def covering(cls, sizes: list[tuple[int, int]], opt: tuple[int, int] | None = None) -> "SizeRange":
        """The smallest range that covers `sizes` (width, height); opt is `opt` if covered, else the first size."""
        if not sizes:
            raise UserError("no sizes given")
        for w, h in sizes:
            check_side(w, "width")
            check_side(h, "height")
        hs, ws = [h for _, h in sizes], [w for w, _ in sizes]
        box = cls(min(hs), max(hs), min(ws), max(ws), sizes[0][1], sizes[0][0])
        if opt is not None and box.covers(*opt):
            box = cls(box.min_height, box.max_height, box.min_width, box.max_width, opt[1], opt[0])
        return box

    # ---------------------------------------------------------------- manifest / sidecar form
    def to_dict(self) -> dict:
        return {
            "height": [self.min_height, self.opt_height, self.max_height],
            "width": [self.min_width, self.opt_width, self.max_width],
            "multiple": SIDE_MULTIPLE,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SizeRange":
        (h0, h1, h2), (w0, w1, w2) = d["height"], d["width"]
        return cls(int(h0), int(h2), int(w0), int(w2), int(h1), int(w1))

    # ---------------------------------------------------------------- questions
    @property
    def is_single(self) -> bool:
        return self.min_height == self.max_height and self.min_width == self.max_width

    @property
    def opt(self) -> tuple[int, int]:
        return self.opt_width, self.opt_height

    @property
    def largest(self) -> tuple[int, int]:
        return self.max_width, self.max_height

    def covers(self, width: int, height: int) -> bool:
        return (
            self.min_width <= width <= self.max_width
            and self.min_height <= height <= self.max_height
            and width % SIDE_MULTIPLE == 0
            and height % SIDE_MULTIPLE == 0
        )

    def intersect(self, other: "SizeRange") -> "SizeRange | None":
        """The sizes both cover (opt: ours if it is among them, else theirs, else the smallest); None if none."""
        lo_h, hi_h = max(self.min_height, other.min_height), min(self.max_height, other.max_height)
        lo_w, hi_w = max(self.min_width, other.min_width), min(self.max_width, other.max_width)
        if lo_h > hi_h or lo_w > hi_w:
            return None
        box = SizeRange(lo_h, hi_h, lo_w, hi_w, lo_h, lo_w)
        for w, h in (self.opt, other.opt):
            if box.covers(w, h):
                return SizeRange(lo_h, hi_h, lo_w, hi_w, h, w)
        return box

    def describe(self) -> str:
        """'1024x1024' for one size, else 'width 512..2048, height 512..2048 (multiples of 16)'."""
        if self.is_single:
            return format_size(self.min_width, self.min_height)
        return (
            f"width {self.min_width}..{self.max_width}, height {self.min_height}..{self.max_height}"
            f" (multiples of {SIDE_MULTIPLE})"
        )

    def check(self, width: int, height: int, what: str = "this bundle", fix: str = "") -> None:
        """One-line refusal of a size outside the range or off the 16-pixel grid; `fix` is appended."""
        fix = f"; {fix}" if fix else ""
        if width % SIDE_MULTIPLE or height % SIDE_MULTIPLE:
            raise UserError(
                f"size {format_size(width, height)}: width and height must be multiples of {SIDE_MULTIPLE};"
                f" {what} covers {self.describe()}"
            )
        if not self.covers(width, height):
            raise UserError(f"size {format_size(width, height)} is outside {what}: {self.describe()}{fix}")

    def latent_dims(self) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of the latent height and width: the optimization profile's image axes."""
        f = LATENT_FACTOR
        return {
            "latent_height": (self.min_height // f, self.opt_height // f, self.max_height // f),
            "latent_width": (self.min_width // f, self.opt_width // f, self.max_width // f),
        }


def latent_shape(width: int, height: int, channels: int = 16) -> tuple[int, int, int, int]:
    """The pipeline's latent shape for an image size (diffusers: 2 * (side // 16))."""
    return (1, channels, 2 * (height // SIDE_MULTIPLE), 2 * (width // SIDE_MULTIPLE))
