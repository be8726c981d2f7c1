"""Load Z-Image-Turbo from a diffusers-format directory (the layout of `Tongyi-MAI/Z-Image-Turbo`).

Each component is checked before it is loaded, so a missing or broken part fails with one line that names it
instead of a traceback from deep inside diffusers or transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

from zimage_trt.errors import UserError

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
            if not any((folder / f).is_file() for f in alternatives):
                raise UserError(f"component '{name}' is incomplete: {folder} has no {' or '.join(alternatives)}")
    return root


def _load(component: str, fn):
    try:
        return fn()
    except UserError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"component '{component}' could not be loaded: {first}") from None


def load_transformer(model_dir, dtype=None, device="cpu"):
    from diffusers import ZImageTransformer2DModel

    root = check_layout(model_dir)
    model = _load(
        "transformer",
        lambda: ZImageTransformer2DModel.from_pretrained(root / "transformer", torch_dtype=dtype),
    )
    return model.to(device).eval()


def load_text_encoder(model_dir, dtype=None, device="cpu"):
    from transformers import Qwen3Model

    root = check_layout(model_dir)
    model = _load("text_encoder", lambda: Qwen3Model.from_pretrained(root / "text_encoder", dtype=dtype))
    return model.to(device).eval()


def load_vae(model_dir, dtype=None, device="cpu"):
    from diffusers import AutoencoderKL

    root = check_layout(model_dir)
    model = _load("vae", lambda: AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype))
    return model.to(device).eval()


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
