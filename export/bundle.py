"""`zimage-trt export`: a diffusers-format model -> a self-contained bundle the runtime and the builder read.

    BUNDLE/
      manifest.json          what is in the bundle: resolution, per-network precision, I/O, hashes, checks
      text_encoder.onnx      input_ids [1, L] -> features [1, L, C]                (L dynamic, 1..512)
      transformer.onnx       latents, timestep, cap_feats [1, Lpad, C], cap_len -> velocity   (Lpad 32..512)
      vae_decoder.onnx       latents -> image in [0, 1]
      tokenizer/             tokenizer.json and chat_template.jinja
      scheduler.json         FlowMatch Euler parameters

The bundle is built in a hidden sibling folder and renamed into place at the end, so an interrupted export
leaves nothing that looks like a bundle.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zimage_trt.errors import UserError

from . import checkpoint
from .modules import (
    MAX_CAPTION_TOKENS,
    SEQ_MULTIPLE,
    DiffusersDiT,
    DiTForExport,
    TextEncoderForExport,
    VaeDecoderForExport,
)
from .onnx_export import DEFAULT_OPSET, CheckResult, check_eager, check_onnx, export_onnx, graph_io, require_ok

BUNDLE_FORMAT = "zimage-trt-bundle"
BUNDLE_VERSION = 1
NETWORKS = ("text_encoder", "transformer", "vae_decoder")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_PRECISION = {"text_encoder": "fp16", "transformer": "fp16", "vae_decoder": "bf16"}
PIXELS_PER_TOKEN = 16  # VAE factor 8 x patch 2: image sides must be multiples of this
# onnxruntime on a CPU takes minutes per TFLOP; graphs with more parameters than this are checked on a GPU
# (`zimage-trt parity`) rather than at export.
CPU_CHECK_MAX_PARAMS = 1_500_000_000


@dataclass
class ExportOptions:
    height: int = 1024
    width: int = 1024
    precision: dict = field(default_factory=lambda: dict(DEFAULT_PRECISION))
    opset: int = DEFAULT_OPSET
    device: str = "cpu"
    check: str = "auto"  # auto | always | never
    fp16_scales: dict | None = None  # block -> {"attn": s, "ffn": s}; None: calibrate when the DiT is fp16
    calibration_prompts: list[str] | None = None
    calibration_steps: int = 9
    force: bool = False


def validate_options(opts: ExportOptions) -> None:
    for side, value in (("height", opts.height), ("width", opts.width)):
        if value <= 0 or value % PIXELS_PER_TOKEN:
            raise UserError(f"--{side} {value} must be a positive multiple of {PIXELS_PER_TOKEN}")
    for name, prec in opts.precision.items():
        if name not in NETWORKS:
            raise UserError(f"unknown network '{name}' in the precision options (networks: {', '.join(NETWORKS)})")
        if prec not in DTYPES:
            raise UserError(f"precision '{prec}' for {name} is not one of {', '.join(DTYPES)}")
    if opts.precision.get("vae_decoder") == "fp16":
        raise UserError("the Flux VAE overflows in fp16; use --vae-precision bf16 (default) or fp32")
    if opts.check not in ("auto", "always", "never"):
        raise UserError(f"--check must be auto, always or never, not {opts.check!r}")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {opts.device} was asked for but PyTorch sees no CUDA GPU")


def sha256_of(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def onnx_files(path: Path) -> list[Path]:
    """The graph and its external-data file, if it has one."""
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


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


def _check_mode(opts: ExportOptions, module, precision: str, device: torch.device) -> tuple[str, str]:
    """How this graph is checked: ("onnxruntime" | "eager" | "", why it is not)."""
    if opts.check == "never":
        return "", "skipped (--check never)"
    n_params = sum(p.numel() for p in module.parameters())
    small = n_params <= CPU_CHECK_MAX_PARAMS or opts.check == "always"
    if precision != "bf16" and small:
        return "onnxruntime", ""
    if device.type == "cuda":
        return "eager", ""
    if precision == "bf16":
        return "", "onnxruntime's CPU provider has no BF16 kernels; export with --device cuda to check it"
    return "", f"{n_params / 1e9:.1f} B parameters is too large for onnxruntime on a CPU; export with --device cuda"


class _Exporter:
    """One export run: loads each component, exports it, checks it, and frees it before the next."""

    def __init__(self, model_dir: Path, work: Path, opts: ExportOptions, progress):
        self.model_dir, self.work, self.opts, self.progress = model_dir, work, opts, progress
        self.device = torch.device(opts.device)
        self.gen = torch.Generator("cpu").manual_seed(0)
        self.checks: list[CheckResult] = []
        self.networks: dict[str, dict] = {}
        self.extra: dict = {}

    def step(self, text: str) -> None:
        self.progress.set_description(text)

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(self.device)

    def _finish(self, name, module, make_reference, export_inputs, check_inputs, dynamic, prec):
        """Export `module`, then check it against `make_reference()` (built only when a check runs)."""
        path = self.work / f"{name}.onnx"
        self.step(f"{name}: exporting ({prec})")
        export_onnx(module, export_inputs, path, dynamic, self.opts.opset)
        self.progress.update(1)
        mode, why = _check_mode(self.opts, module, prec, self.device)
        if mode == "onnxruntime":
            self.step(f"{name}: checking with onnxruntime")
            result = check_onnx(name, path, make_reference(), check_inputs, prec)
        elif mode == "eager":
            self.step(f"{name}: checking the eager twin on {self.device}")
            result = check_eager(name, module, make_reference(), check_inputs, prec)
        else:
            result = CheckResult(name, prec, 0.0, 0.0, 0.0, "", why)
        require_ok(result)
        self.checks.append(result)
        self.progress.update(1)
        files = onnx_files(path)
        self.networks[name] = {
            "onnx": path.name,
            "external_data": len(files) > 1,
            "precision": prec,
            "sha256": sha256_of(files),
            "bytes": sum(f.stat().st_size for f in files),
            **graph_io(path),
        }

    def text_encoder(self) -> None:
        prec = self.opts.precision["text_encoder"]
        self.step("text_encoder: loading")
        qwen = checkpoint.load_text_encoder(self.model_dir, torch.float32, self.device)
        vocab = qwen.config.vocab_size
        self.extra["text_encoder_config"] = {
            k: getattr(qwen.config, k)
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
        }
        module = TextEncoderForExport(qwen, DTYPES[prec])
        ids = lambda n: torch.randint(0, vocab, (1, n), generator=self.gen).to(self.device)  # noqa: E731
        dynamic = {"input_ids": {1: torch.export.Dim("tokens", min=1, max=MAX_CAPTION_TOKENS)}}
        self._finish(
            "text_encoder", module, lambda: TextEncoderForExport(qwen), (ids(24),), (ids(17),), dynamic, prec
        )
        self.extra["caption_dim"] = qwen.config.hidden_size
        del qwen, module

    def transformer(self) -> None:
        from .fp16 import choose_scales, fold_rescale

        prec = self.opts.precision["transformer"]
        h, w = self.opts.height // 8, self.opts.width // 8
        self.step("transformer: loading")
        dit = checkpoint.load_transformer(self.model_dir, torch.float32, self.device)
        self.extra["transformer_config"] = {k: v for k, v in dit.config.items() if not k.startswith("_")}
        scales = None
        if prec == "fp16":
            scales = self.opts.fp16_scales
            if scales is None:
                scales = choose_scales(self._calibrate())
            folded = copy.deepcopy(dit)
            self.extra["fp16_rescaled_blocks"] = fold_rescale(folded, scales)
            module = DiTForExport(folded, h, w, torch.float16, inplace=True)
            del folded
        else:
            module = DiTForExport(dit, h, w, DTYPES[prec])
        c = dit.config.cap_feat_dim
        cap = lambda lp: self.randn(1, lp, c)  # noqa: E731
        lat = self.randn(1, 16, h, w)
        t = torch.tensor([0.25], device=self.device)
        n = lambda v: torch.tensor([v], dtype=torch.int64, device=self.device)  # noqa: E731
        dynamic = {
            "latents": None,
            "timestep": None,
            "cap_feats": {1: torch.export.Dim("cap_tokens", min=SEQ_MULTIPLE, max=MAX_CAPTION_TOKENS)},
            "cap_len": None,
        }
        self._finish(
            "transformer",
            module,
            lambda: DiffusersDiT(dit),
            (lat, t, cap(64), n(45)),
            (lat, t * 3, cap(32), n(21)),
            dynamic,
            prec,
        )
        self.networks["transformer"]["fp16_scales"] = scales
        del dit, module

    def _calibrate(self) -> dict:
        from zimage_trt.calibration import default_prompts

        from .calibrate import measure_peaks

        prompts = self.opts.calibration_prompts or default_prompts()
        self.step(f"transformer: calibrating fp16 scales on {len(prompts)} prompts")
        # bf16 on a GPU is fast; the scales are powers of two with 16x headroom, so its rounding of a peak cannot
        # move a scale by more than one step. fp32 on a CPU, where bf16 is slow.
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        pipe = checkpoint.load_pipeline(self.model_dir, dtype, self.device)
        peaks = measure_peaks(pipe, prompts, self.opts.height, self.opts.width, self.opts.calibration_steps)
        del pipe
        self.extra["fp16_peaks"] = peaks
        return peaks

    def vae_decoder(self) -> None:
        prec = self.opts.precision["vae_decoder"]
        h, w = self.opts.height // 8, self.opts.width // 8
        self.step("vae_decoder: loading")
        vae = checkpoint.load_vae(self.model_dir, torch.float32, self.device)
        self.extra["vae_config"] = {
            k: vae.config[k] for k in ("scaling_factor", "shift_factor", "latent_channels", "block_out_channels")
        }
        module = VaeDecoderForExport(vae, DTYPES[prec])
        lat = self.randn(1, vae.config.latent_channels, h, w)
        self._finish("vae_decoder", module, lambda: VaeDecoderForExport(vae), (lat,), (lat * 0.8,), None, prec)
        del vae, module


def export_bundle(model_dir, out, opts: ExportOptions | None = None, progress=None) -> dict:
    """Export the three networks of `model_dir` into the bundle folder `out`; returns the manifest."""
    from tqdm import tqdm

    opts = opts or ExportOptions()
    validate_options(opts)
    model_dir = checkpoint.check_layout(model_dir).resolve()
    out = Path(out)
    if out.exists() and not opts.force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    own_bar = progress is None
    progress = progress or tqdm(total=7, unit="step", dynamic_ncols=True)
    try:
        scheduler = _scheduler_params(model_dir)
        _copy_tokenizer(model_dir, work / "tokenizer")
        (work / "scheduler.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        progress.update(1)
        exporter = _Exporter(model_dir, work, opts, progress)
        exporter.text_encoder()
        exporter.transformer()
        exporter.vae_decoder()
        x = exporter.extra
        manifest = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": str(model_dir),
            "height": opts.height,
            "width": opts.width,
            "latent_shape": [1, x["vae_config"]["latent_channels"], opts.height // 8, opts.width // 8],
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
            "checks": [c.__dict__ for c in exporter.checks],
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(work, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, out)
        progress.set_description("export done")
        return manifest
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if own_bar:
            progress.close()
