"""Load Z-Image-Turbo from a diffusers-format directory (the layout of `Tongyi-MAI/Z-Image-Turbo`).

Each component is checked before it is loaded, so a missing or broken part fails with one line that names it
instead of a traceback from deep inside diffusers or transformers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from zimage_trt.common.errors import UserError

# model_index.json of the real checkpoint: component -> (library, class).
COMPONENT_CLASSES = {
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    "text_encoder": ("transformers", "Qwen3Model"),
    "tokenizer": ("transformers", "Qwen2Tokenizer"),
    "transformer": ("diffusers", "ZImageTransformer2DModel"),
    "vae": ("diffusers", "AutoencoderKL"),
}

# The files that must exist in each component folder (any one name of each tuple).
_REQUIRED = {
    "scheduler": [("scheduler_config.json",)],
    "tokenizer": [("tokenizer.json",), ("tokenizer_config.json",)],
    "text_encoder": [("config.json",), ("model.safetensors", "model.safetensors.index.json")],
    "transformer": [
        ("config.json",),
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    ],
    "vae": [("config.json",), ("diffusion_pytorch_model.safetensors",)],
}


def check_layout(model_dir: str | Path) -> Path:
    """Verify model_index.json and each component folder; returns the directory as a Path."""
    root = Path(model_dir)
    if not root.is_dir():
        raise UserError(f"model directory {root} does not exist (expected a diffusers-format Z-Image-Turbo folder)")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise UserError(f"{root} has no model_index.json; it is not a diffusers-format model directory")
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{index_path} is not valid JSON ({exc})") from None
    if index.get("_class_name") != "ZImagePipeline":
        raise UserError(f"{index_path} describes a {index.get('_class_name')!r}, not a ZImagePipeline")
    for name in COMPONENT_CLASSES:
        if name not in index:
            raise UserError(f"{index_path} lists no '{name}' component")
        folder = root / name
        if not folder.is_dir():
            raise UserError(f"component '{name}' is missing: no folder {folder}")
        for alternatives in _REQUIRED[name]:
            present = [folder / f for f in alternatives if (folder / f).is_file()]
            if not present:
                raise UserError(f"component '{name}' is incomplete: {folder} has no {' or '.join(alternatives)}")
            _check_file(name, present[0])
    return root


def _read_json(component: str, path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"component '{component}': {path.name} is not valid JSON ({exc})") from None


def check_safetensors(component: str, path: Path) -> dict:
    """Read the header and check the file holds every byte it promises: catches truncated downloads early.
    Returns the header (name -> dtype, shape, offsets)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or n > size - 8:
            raise UserError(f"component '{component}': {path.name} is not a safetensors file (truncated or corrupt)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"component '{component}': {path.name} has a corrupt safetensors header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise UserError(f"component '{component}': {path.name} is truncated ({size} of {8 + n + end} bytes)")
    return header


def weight_shapes(model_dir: str | Path, component: str) -> dict[str, list[int]]:
    """{parameter name: shape} of a component, from its safetensors headers alone (nothing is loaded)."""
    shapes = {}
    for path in sorted((Path(model_dir) / component).glob("*.safetensors")):
        for name, info in check_safetensors(component, path).items():
            if name != "__metadata__":
                shapes[name] = list(info["shape"])
    return shapes


def weight_count(model_dir: str | Path, component: str) -> int:
    """Number of weights (elements) in a component's safetensors files, from their headers alone; what an
    export of it writes is this times the bytes of its precision."""
    return sum(math.prod(shape) for shape in weight_shapes(model_dir, component).values())


def largest_shard_bytes(model_dir: str | Path, component: str) -> int:
    """Bytes of a component's largest safetensors file: what loading holds besides the network it builds (each
    shard is read whole and cast, one at a time)."""
    return max((f.stat().st_size for f in (Path(model_dir) / component).glob("*.safetensors")), default=0)


def _check_file(component: str, path: Path) -> None:
    if path.name.endswith(".safetensors"):
        check_safetensors(component, path)
    elif path.name.endswith(".index.json"):
        index = _read_json(component, path)
        for shard in sorted(set(index.get("weight_map", {}).values())):
            if not (path.parent / shard).is_file():
                raise UserError(f"component '{component}' is incomplete: shard {shard} is missing")
            check_safetensors(component, path.parent / shard)
    elif path.name.endswith(".json"):
        _read_json(component, path)


def _quiet_loading() -> None:
    """No "Loading checkpoint shards" bars from the libraries over our own progress bar."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _load(component: str, fn):
    _quiet_loading()
    try:
        return fn()
    except UserError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"component '{component}' could not be loaded: {first}") from None


def _on(device) -> dict:
    """The device map that has the libraries load each shard straight onto `device`, cast to the asked dtype as
    it is read: the checkpoint's precision (fp32 for the real transformer: 24.6 GB) is never held whole."""
    return {"": torch.device(device)}


def load_transformer(model_dir, dtype=None, device="cpu"):
    from diffusers import ZImageTransformer2DModel

    root = check_layout(model_dir)
    model = _load(
        "transformer",
        lambda: ZImageTransformer2DModel.from_pretrained(root / "transformer", torch_dtype=dtype, device_map=_on(device)),
    )
    return model.eval()


def load_text_encoder(model_dir, dtype=None, device="cpu"):
    from transformers import Qwen3Model

    root = check_layout(model_dir)
    model = _load(
        "text_encoder",
        lambda: Qwen3Model.from_pretrained(root / "text_encoder", dtype=dtype, device_map=_on(device)),
    )
    return model.eval()


def load_vae(model_dir, dtype=None, device="cpu"):
    from diffusers import AutoencoderKL

    root = check_layout(model_dir)
    model = _load("vae", lambda: AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype, device_map=_on(device)))
    return model.eval()


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    root = check_layout(model_dir)
    return _load("tokenizer", lambda: AutoTokenizer.from_pretrained(root / "tokenizer"))


def load_scheduler_config(model_dir) -> dict:
    root = check_layout(model_dir)
    path = root / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"component 'scheduler': {path} is not valid JSON ({exc})") from None


def load_pipeline(model_dir, dtype=None, device="cpu"):
    """The diffusers reference pipeline, assembled from the checked components."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    root = check_layout(model_dir)
    scheduler = _load(
        "scheduler", lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler")
    )
    return ZImagePipeline(
        scheduler=scheduler,
        vae=load_vae(root, dtype, device),
        text_encoder=load_text_encoder(root, dtype, device),
        tokenizer=load_tokenizer(root),
        transformer=load_transformer(root, dtype, device),
    )
