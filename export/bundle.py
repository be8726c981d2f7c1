"""`zimage-trt export`: a diffusers-format model -> a self-contained bundle the runtime and the builder read.

    BUNDLE/
      manifest.json          what is in the bundle: image sizes, per-network precision, I/O, hashes, checks
      text_encoder.onnx      input_ids [1, L] -> features [1, L, C]                (L dynamic, 1..512)
      transformer.onnx       latents [1,16,h,w], timestep, cap_feats [1, Lpad, C], cap_len -> velocity
                             (Lpad 32..512; h, w dynamic for a size range, fixed for one size)
      vae_decoder.onnx       latents [1,16,h,w] -> image [1,3,8h,8w] in [0, 1]  (h, w as the transformer's)
      tokenizer/             tokenizer.json and chat_template.jinja
      scheduler.json         FlowMatch Euler parameters

The bundle is built in a hidden sibling folder (.BUNDLE.partial-PID) and renamed into place at the end, so an
interrupted export leaves nothing that looks like a bundle; the next export to the same folder removes what a
killed one left (common/files.py). Before anything is written, the bundle's size is estimated from the
checkpoint's headers and compared with the free space.

By job: options.py (what is asked, validated), needs.py (disk and memory, stated before the start), networks.py
(each network loaded, written and checked), this module (the folder: write, manifest, rename into place).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path

import torch

from zimage_trt.common.errors import UserError
from zimage_trt.common.files import TargetLock, check_space, os_error_line, remove_debris, temp_path

from . import checkpoint
from .modules import MAX_CAPTION_TOKENS, SEQ_MULTIPLE
from .needs import cap_gpu_memory, estimate_bundle_bytes, export_needs
from .networks import NetworkExporter
from .onnx_export import release_weights
from .options import BUNDLE_FORMAT, BUNDLE_VERSION, DEFAULT_PRECISION, QUANTIZED, ExportOptions, validate_options

__all__ = ["DEFAULT_PRECISION", "ExportOptions", "export_bundle"]  # the options live in options.py


def _scheduler_params(model_dir: Path) -> dict:
    cfg = checkpoint.load_scheduler_config(model_dir)
    unsupported = {
        "use_dynamic_shifting": False,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "stochastic_sampling": False,
    }
    for key, plain in unsupported.items():
        if cfg.get(key) not in (None, plain):
            raise UserError(f"scheduler option {key}={cfg[key]!r} is not supported by the runtime (only plain shift)")
    if cfg.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
        raise UserError(f"scheduler {cfg['_class_name']} is not supported; Z-Image-Turbo uses FlowMatchEulerDiscrete")
    return {
        "type": "flow_match_euler",
        "num_train_timesteps": int(cfg.get("num_train_timesteps", 1000)),
        "shift": float(cfg.get("shift", 1.0)),
        "default_steps": 9,
    }


def _copy_tokenizer(model_dir: Path, out: Path) -> None:
    src = model_dir / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    template = None
    if (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    else:
        try:
            template = json.loads((src / "tokenizer_config.json").read_text()).get("chat_template")
        except json.JSONDecodeError as exc:
            raise UserError(f"component 'tokenizer': tokenizer_config.json is not valid JSON ({exc})") from None
    if not isinstance(template, str) or not template.strip():
        raise UserError("component 'tokenizer' has no chat template (tokenizer_config.json or chat_template.jinja)")
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")


def export_bundle(model_dir, out, opts: ExportOptions | None = None, progress=None) -> dict:
    """Export the three networks of `model_dir` into the bundle folder `out`; returns the manifest."""
    opts = opts or ExportOptions()
    validate_options(opts)
    model_dir = checkpoint.check_layout(model_dir).resolve()
    out = Path(out)
    if out.exists() and not opts.force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    if opts.precision.get("transformer") in QUANTIZED:  # ModelOpt installed, and --quant-skip names real blocks
        from .fp16 import block_names
        from .quantize import modelopt_version, nvfp4_exporter, parse_skip

        modelopt_version()
        if opts.precision["transformer"] == "nvfp4":
            nvfp4_exporter()
        config = json.loads((model_dir / "transformer" / "config.json").read_text())
        parse_skip(opts.quant_skip, block_names(config))
    loras = []
    if opts.loras:  # read once, and a LoRA that does not fit is one line before anything is loaded or written
        from .lora import read_sources

        shapes = {k: v for k, v in checkpoint.weight_shapes(model_dir, "transformer").items() if len(v) == 2}
        loras = read_sources(opts.loras, shapes)
    needs = export_needs(model_dir, opts)
    print(needs.line(opts.device), flush=True)
    if opts.max_gpu_memory is not None and needs.gpu > opts.max_gpu_memory:
        raise UserError(f"--max-gpu-memory {opts.max_gpu_memory / 2**30:.1f} GiB is below what the export needs "
                        f"on the GPU (about {needs.gpu / 2**30:.1f} GiB for the {needs.largest}); raise it, or export "
                        "with --device cpu")
    with TargetLock(out, "export"):
        remove_debris(out.parent, {out.name})
        need = estimate_bundle_bytes(model_dir, opts.precision)
        check_space(out.parent, need, f"writing the bundle {out}", "free space there or pass another --out")
        return _export_to(model_dir, out, opts, progress, loras)


def _export_to(model_dir: Path, out: Path, opts: ExportOptions, progress, loras: list) -> dict:
    from tqdm import tqdm

    work = temp_path(out, "partial")
    shutil.rmtree(work, ignore_errors=True)
    own_bar = progress is None
    progress = progress or tqdm(total=7, unit="step", dynamic_ncols=True)
    exporter = None
    if opts.max_gpu_memory is not None:
        cap_gpu_memory(torch.device(opts.device), opts.max_gpu_memory)
    try:
        work.mkdir(parents=True)
        scheduler = _scheduler_params(model_dir)
        _copy_tokenizer(model_dir, work / "tokenizer")
        (work / "scheduler.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        progress.update(1)
        exporter = NetworkExporter(model_dir, work, opts, progress, loras)
        for network in (exporter.text_encoder, exporter.transformer, exporter.vae_decoder):
            release_weights(network())  # written and checked: its memory goes back before the next network
            exporter.free()
        exporter.step("export done")
        exporter.peaks.close()
        manifest = _manifest(model_dir, opts, exporter, scheduler)
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            old = temp_path(out, "old")
            os.replace(out, old)
            os.replace(work, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, out)
        return manifest
    except torch.OutOfMemoryError:
        shutil.rmtree(work, ignore_errors=True)
        stage = exporter.progress.desc if exporter is not None else "loading"
        cap = f"the --max-gpu-memory cap of {opts.max_gpu_memory / 2**30:.1f} GiB" if opts.max_gpu_memory else "the GPU"
        raise UserError(f"the export ran out of GPU memory under {cap} at '{stage}'; use a larger GPU or cap, or "
                        "export with --device cpu (host memory instead)") from None
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        # named as the user will know it: the file in --out (it is written in the partial folder beside it)
        where = out / exporter.writing.relative_to(work) if exporter and exporter.writing else out
        raise UserError(os_error_line(exc, where, "free space there or pass another --out")) from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if exporter is not None:
            exporter.peaks.close()
        if own_bar:
            progress.close()


def _manifest(model_dir: Path, opts: ExportOptions, exporter: NetworkExporter, scheduler: dict) -> dict:
    x = exporter.extra
    return {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": str(model_dir),
        # height/width/latent_shape: the default (opt) size, as version 1 recorded its one size
        "height": opts.sizes.opt_height,
        "width": opts.sizes.opt_width,
        "latent_shape": [1, x["vae_config"]["latent_channels"], opts.sizes.opt_height // 8, opts.sizes.opt_width // 8],
        "image_sizes": {"dynamic": not opts.sizes.is_single, **opts.sizes.to_dict()},
        "caption_dim": x["caption_dim"],
        "max_caption_tokens": MAX_CAPTION_TOKENS,
        "caption_multiple": SEQ_MULTIPLE,
        "opset": opts.opset,
        "networks": exporter.networks,
        "scheduler": scheduler,
        "tokenizer": {"dir": "tokenizer", "max_length": MAX_CAPTION_TOKENS},
        "config": {
            "transformer": x["transformer_config"],
            "text_encoder": x["text_encoder_config"],
            "vae": x["vae_config"],
        },
        "fp16_calibration": {"peaks": x.get("fp16_peaks"), "rescaled_blocks": x.get("fp16_rescaled_blocks")},
        "loras": x.get("loras", []),  # baked into the transformer: name, sha256, scale of each
        "checks": [c.__dict__ for c in exporter.checks],
        "export_memory": exporter.peaks.stages,  # each stage's own peaks (common/peaks.py)
    }
