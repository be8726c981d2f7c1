"""The network's inputs and outputs and its one optimization profile: caption length over its full range,
optimized at a typical prompt; latent height and width over the bundle's size range (or the box around
`--sizes`), optimized at its opt size."""

from __future__ import annotations

from zimage_trt.common.errors import UserError
from zimage_trt.runtime.bundle import Bundle
from zimage_trt.runtime.sizes import SizeRange, format_size

from .trt_api import Flavour

TYPICAL_PROMPT_TOKENS = 128  # opt point of the caption profile: a one- or two-sentence prompt in its chat turn


def image_profile(bundle: Bundle, sizes: list[tuple[int, int]] | None) -> SizeRange:
    """The image sizes the engines cover: the bundle's range, or the smallest box around `sizes` in it."""
    rng = bundle.sizes
    if not sizes:
        return rng
    if rng.is_single:
        only = format_size(*rng.opt)
        if any(s != rng.opt for s in sizes):
            raise UserError(
                f"bundle {bundle.root} is for one size ({only}); --sizes needs a bundle exported with --size-range"
            )
        return rng
    for w, h in sizes:
        rng.check(w, h, f"bundle {bundle.root}", "export a bundle with a --size-range that covers it")
    return SizeRange.covering(sizes, opt=rng.opt)


def profile_ranges(bundle: Bundle, opt_tokens: int, image: SizeRange) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) for each named dynamic dimension of the bundle's graphs."""
    top = bundle.max_caption_tokens
    opt = min(max(opt_tokens, 1), top)
    return {
        "tokens": (1, opt, top),
        "cap_tokens": (bundle.caption_multiple, bundle.padded_caption_length(opt), top),
        **image.latent_dims(),
    }


def takes_image(network: dict) -> bool:
    """Whether a bundle network's inputs include the latents (its engine's profile then covers image sizes)."""
    return any(i["name"] == "latents" for i in network["inputs"])


_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32", "BOOL": "bool"}


def _dtype_name(dtype) -> str:
    key = str(dtype).split(".")[-1].upper()
    return _DTYPE_NAMES.get(key, key.lower())


def add_io_and_profile(flavour: Flavour, builder, network, io_spec: dict, ranges: dict):
    """Describe the network's I/O for the sidecar and build the one optimization profile."""
    profile = builder.create_optimization_profile()
    dyn_names = {i["name"]: i["shape"] for i in io_spec["inputs"]}
    io, dynamic = [], False
    for k in range(network.num_inputs):
        t = network.get_input(k)
        shape = list(t.shape)
        entry = {"name": t.name, "mode": "input", "dtype": _dtype_name(t.dtype), "shape": shape}
        if any(d < 0 for d in shape):
            dims = [[], [], []]
            for axis, d in enumerate(shape):
                if d >= 0:
                    for lst in dims:
                        lst.append(d)
                    continue
                symbol = dyn_names.get(t.name, [None] * len(shape))[axis]
                if symbol not in ranges:
                    raise UserError(f"input {t.name} has a dynamic dimension '{symbol}' this builder has no range for")
                for lst, v in zip(dims, ranges[symbol]):
                    lst.append(v)
            profile.set_shape(t.name, *dims)
            entry["profile"] = {"min": dims[0], "opt": dims[1], "max": dims[2]}
            dynamic = True
        io.append(entry)
    for k in range(network.num_outputs):
        t = network.get_output(k)
        io.append({"name": t.name, "mode": "output", "dtype": _dtype_name(t.dtype), "shape": list(t.shape)})
    return io, (profile if dynamic else None)
