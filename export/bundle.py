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
killed one left (zimage_trt/files.py). Before anything is written, the bundle's size is estimated from the
checkpoint's headers and compared with the free space.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zimage_trt.common.errors import UserError
from zimage_trt.common.files import TargetLock, check_space, os_error_line, remove_debris, sha256_of, temp_path
from zimage_trt.common.peaks import StagePeaks, release_memory
from zimage_trt.runtime.sizes import LATENT_FACTOR, SIDE_MULTIPLE, SizeRange, check_side, format_size

from . import checkpoint
from .modules import (
    MAX_CAPTION_TOKENS,
    SEQ_MULTIPLE,
    DiffusersDiT,
    DiTForExport,
    TextEncoderForExport,
    VaeDecoderForExport,
)
from .onnx_export import (
    DEFAULT_OPSET,
    CheckResult,
    check_eager,
    check_onnx,
    check_runner,
    export_onnx,
    graph_io,
    release_weights,
    rename_dims,
    require_ok,
)

BUNDLE_FORMAT = "zimage-trt-bundle"
BUNDLE_VERSION = 2  # 2: image_sizes (a size range); runtime/bundle.py still reads 1 as one size
NETWORKS = ("text_encoder", "transformer", "vae_decoder")
# fp8, nvfp4: the transformer in fp16 with FP8 or NVFP4 Q/DQ on its quantized layers (quantize.py)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float16,
          "nvfp4": torch.float16}
QUANTIZED = ("fp8", "nvfp4")  # quantize.FORMATS
DEFAULT_PRECISION = {"text_encoder": "fp16", "transformer": "fp16", "vae_decoder": "bf16"}
# onnxruntime on a CPU takes minutes per TFLOP; graphs with more parameters than this are checked on a GPU
# (`zimage-trt parity`) rather than at export.
CPU_CHECK_MAX_PARAMS = 1_500_000_000


@dataclass
class ExportOptions:
    height: int = 1024  # the one size of a static bundle
    width: int = 1024
    size_range: SizeRange | None = None  # a dynamic bundle instead: every size in this range
    precision: dict = field(default_factory=lambda: dict(DEFAULT_PRECISION))
    opset: int = DEFAULT_OPSET
    device: str = "cpu"
    check: str = "auto"  # auto | always | never
    fp16_scales: dict | None = None  # block -> {"attn": s, "ffn": s}; None: calibrate when the DiT is fp16
    calibration_prompts: list[str] | None = None
    calibration_steps: int = 9
    quant_skip: str | None = None  # --quant-skip: blocks a quantized transformer keeps in fp16 (quantize.parse_skip)
    loras: list = field(default_factory=list)  # [(original LoRA file, scale)] baked into the transformer
    max_gpu_memory: int | None = None  # bytes this process may take on the GPU (--max-gpu-memory)
    force: bool = False

    @property
    def sizes(self) -> SizeRange:
        return self.size_range or SizeRange.single(self.width, self.height)


def validate_options(opts: ExportOptions) -> None:
    if opts.size_range is None:
        for side, value in (("height", opts.height), ("width", opts.width)):
            check_side(value, f"--{side}")
    for name, prec in opts.precision.items():
        if name not in NETWORKS:
            raise UserError(f"unknown network '{name}' in the precision options (networks: {', '.join(NETWORKS)})")
        if prec not in DTYPES:
            raise UserError(f"precision '{prec}' for {name} is not one of {', '.join(DTYPES)}")
        if prec in QUANTIZED and name != "transformer":
            raise UserError(f"{prec} is for the transformer (--dit-precision {prec}), not the {name}")
    if opts.quant_skip and opts.precision.get("transformer") not in QUANTIZED:
        raise UserError("--quant-skip keeps blocks of a quantized transformer unquantized; add --dit-precision fp8 "
                        "or nvfp4")
    if opts.precision.get("vae_decoder") == "fp16":
        raise UserError("the Flux VAE overflows in fp16; use --vae-precision bf16 (default) or fp32")
    if opts.check not in ("auto", "always", "never"):
        raise UserError(f"--check must be auto, always or never, not {opts.check!r}")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {opts.device} was asked for but PyTorch sees no CUDA GPU")
    if opts.max_gpu_memory is not None and not opts.device.startswith("cuda"):
        raise UserError("--max-gpu-memory caps an export on the GPU; add --device cuda (a CPU export uses no GPU)")


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
    """One export run: loads each component, exports it and checks it; each network's method returns the module
    it exported, whose weights the run releases before the next."""

    def __init__(self, model_dir: Path, work: Path, opts: ExportOptions, progress, loras: list):
        """loras: the LoRAs of opts.loras, read (export/lora.py SourceLora), baked into the transformer."""
        self.model_dir, self.work, self.opts, self.progress = model_dir, work, opts, progress
        self.loras = loras
        self.device = torch.device(opts.device)
        self.gen = torch.Generator("cpu").manual_seed(0)
        self.checks: list[CheckResult] = []
        self.networks: dict[str, dict] = {}
        self.extra: dict = {}
        self.writing: Path | None = None  # the graph being written, for the message if the disk fills up
        self.peaks = StagePeaks(self.device)  # each stage's own peaks: the manifest's export_memory

    def step(self, text: str) -> None:
        """Name the stage on the progress bar; its memory peaks are recorded until the next step."""
        self.progress.set_description(text)
        self.peaks.enter(text)

    def free(self) -> None:
        """Between networks: the libraries' modules hold reference cycles (offload hooks, traced graphs), so
        collect them now, and give the GPU's cached blocks back, so the next network starts from zero."""
        release_memory(self.device)

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(self.device)

    def _finish(self, name, module, make_reference, export_inputs, checks, dynamic, prec, dim_names=None):
        """Export `module`, then check it on each (label, inputs) of `checks` against `make_reference()` (built
        only when a check runs). `dim_names` renames the exporter's dynamic dims (e.g. '2*h_tokens')."""
        path = self.work / f"{name}.onnx"
        self.step(f"{name}: exporting ({prec})")
        self.writing = path
        export_onnx(module, export_inputs, path, dynamic, self.opts.opset)
        if dim_names:
            rename_dims(path, dim_names)
        self.progress.update(1)
        mode, why = _check_mode(self.opts, module, prec, self.device)
        reference = make_reference() if mode else None
        for label, inputs in checks:
            what = f"{name}@{label}" if label else name
            if mode == "onnxruntime":  # nvfp4: onnx's reference evaluator (onnxruntime has no FP4 kernels)
                self.step(f"{what}: checking with {check_runner(prec)}")
                result = check_onnx(what, path, reference, inputs, prec)
            elif mode == "eager":
                self.step(f"{what}: checking the eager twin on {self.device}")
                result = check_eager(what, module, reference, inputs, prec)
            else:
                result = CheckResult(what, prec, 0.0, 0.0, 0.0, "", why)
            require_ok(result)
            self.checks.append(result)
        del reference
        self.free()
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

    def _latent_dims(self):
        """Example latent (h, w) for tracing, and the sizes each graph is checked at: (label, (h, w))."""
        return example_latent_hw(self.opts.sizes), [
            (format_size(w, h) if not self.opts.sizes.is_single else "", (h // LATENT_FACTOR, w // LATENT_FACTOR))
            for w, h in check_sizes(self.opts.sizes)
        ]

    def _reference(self, load, wrap):
        """A make_reference for `_finish`: the float32 network, built only when a check runs (reference.py)."""
        from .reference import float32_reference

        return lambda: float32_reference(load, wrap, self.device)

    def text_encoder(self) -> torch.nn.Module:
        prec = self.opts.precision["text_encoder"]
        self.step("text_encoder: loading")
        load = lambda dtype, device: checkpoint.load_text_encoder(self.model_dir, dtype, device)  # noqa: E731
        qwen = load(DTYPES[prec], self.device)  # straight into the export precision, shard by shard
        vocab = qwen.config.vocab_size
        self.extra["text_encoder_config"] = {
            k: getattr(qwen.config, k)
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
        }
        module = TextEncoderForExport(qwen, DTYPES[prec])
        ids = lambda n: torch.randint(0, vocab, (1, n), generator=self.gen).to(self.device)  # noqa: E731
        dynamic = {"input_ids": {1: torch.export.Dim("tokens", min=1, max=MAX_CAPTION_TOKENS)}}
        reference = self._reference(load, TextEncoderForExport)
        self._finish("text_encoder", module, reference, (ids(24),), [("", (ids(17),))], dynamic, prec)
        self.extra["caption_dim"] = qwen.config.hidden_size
        return module

    def transformer(self) -> torch.nn.Module:
        from .fp16 import choose_scales, fold_rescale, fp16_divisors
        from .weight_map import map_weights

        prec = self.opts.precision["transformer"]
        scales = features = None  # features: the calibration prompts' caption features, kept for quantizing
        if prec in ("fp16", *QUANTIZED):  # calibrated first, so its model is freed before the exported one is loaded
            scales = self.opts.fp16_scales
            if scales is None:
                features = self._caption_features()
                scales = choose_scales(self._calibrate(features))
                self.free()
        self.step("transformer: loading")

        def load(dtype, device):
            dit = checkpoint.load_transformer(self.model_dir, dtype, device)
            if self.loras:
                from .lora import bake_loras

                bake_loras(dit, self.loras)
            return dit

        # straight into the export precision, shard by shard; fp8/nvfp4 calibrate in the calibration's precision
        # and are cast to fp16 in place after
        dit = load(self._calibration_dtype() if prec in QUANTIZED else DTYPES[prec], self.device)
        self.extra["transformer_config"] = {k: v for k, v in dit.config.items() if not k.startswith("_")}
        if self.loras:
            self.extra["loras"] = [source.record() for source in self.loras]
        if scales is not None:
            # After the cast: dividing by a power of two is exact in fp16 too (the runtime's torch backend folds
            # the same way, so its weights equal the graph's bit for bit).
            self.extra["fp16_rescaled_blocks"] = fold_rescale(dit, scales)
        if prec in QUANTIZED:
            self._quantize(dit, prec, features)
        del features
        module = DiTForExport(dit, DTYPES[prec], inplace=True)
        c = dit.config.cap_feat_dim
        cap = lambda lp: self.randn(1, lp, c)  # noqa: E731
        lat = lambda hw: self.randn(1, 16, *hw)  # noqa: E731
        t = torch.tensor([0.25], device=self.device)
        n = lambda v: torch.tensor([v], dtype=torch.int64, device=self.device)  # noqa: E731
        example, at = self._latent_dims()
        dynamic = {
            "latents": self._image_dims(patch=2),
            "timestep": None,
            "cap_feats": {1: torch.export.Dim("cap_tokens", min=SEQ_MULTIPLE, max=MAX_CAPTION_TOKENS)},
            "cap_len": None,
        }
        self._finish(
            "transformer",
            module,
            self._reference(load, DiffusersDiT),
            (lat(example), t, cap(64), n(45)),
            [(label, (lat(hw), t * 3, cap(32), n(21))) for label, hw in at],
            dynamic,
            prec,
            dim_names={"2*h_tokens": "latent_height", "2*w_tokens": "latent_width"},
        )
        self.networks["transformer"]["fp16_scales"] = scales
        if prec in QUANTIZED:  # a run-time LoRA would move weights past their calibrated scales: baked only
            self.networks["transformer"]["quantization"] = self.extra.pop("quantization")
        else:
            self.step("transformer: mapping weights to the graph (for LoRA)")
            self.networks["transformer"]["weights"] = map_weights(
                self.work / "transformer.onnx", module, divisors=fp16_divisors(scales)
            )
        return module

    def _quantize(self, dit, fmt: str, features: list | None) -> None:
        """FP8 or NVFP4: ModelOpt's quantizers into `dit` (rescaled, LoRAs baked: what is exported), calibrated on the
        calibration prompts through the whole schedule (quantize.py); `features`: their caption features, if the
        FP16 calibration computed them."""
        from .calibrate import run_schedule, schedule_pipeline
        from .fp16 import blocks
        from .quantize import QuantRecipe, parse_skip, prompts_sha256, quantize

        prompts = self._prompts()
        recipe = QuantRecipe(fmt, parse_skip(self.opts.quant_skip, list(blocks(dit))), prompts_sha256(prompts),
                             self.opts.calibration_steps)
        if features is None:  # scales were given: the features were not computed for the FP16 calibration
            self.step(f"transformer: caption features for the {fmt} calibration")
            features = self._caption_features()
        self.step(f"transformer: calibrating {fmt} on {len(prompts)} prompts")
        width, height = self.opts.sizes.opt
        pipe = schedule_pipeline(self.model_dir, dit)
        n = quantize(dit, recipe, lambda _: run_schedule(pipe, features, height, width, recipe.steps))
        self.extra["quantization"] = {**recipe.record(), "quantized_layers": n}
        del pipe, features

    def _image_dims(self, patch: int) -> dict | None:
        """Dynamic latent height/width for a size range (None: a one-size graph). With a patch, the latent
        sides are `patch x` a token count, which the exporter must know to patchify without a guard."""
        sizes = self.opts.sizes
        if sizes.is_single:
            return None
        if patch > 1:
            step = LATENT_FACTOR * patch
            h = torch.export.Dim("h_tokens", min=sizes.min_height // step, max=sizes.max_height // step)
            w = torch.export.Dim("w_tokens", min=sizes.min_width // step, max=sizes.max_width // step)
            return {2: patch * h, 3: patch * w}
        lo_h, hi_h = sizes.min_height // LATENT_FACTOR, sizes.max_height // LATENT_FACTOR
        lo_w, hi_w = sizes.min_width // LATENT_FACTOR, sizes.max_width // LATENT_FACTOR
        return {2: torch.export.Dim("latent_height", min=lo_h, max=hi_h),
                3: torch.export.Dim("latent_width", min=lo_w, max=hi_w)}

    def _prompts(self) -> list[str]:
        from zimage_trt.calibration import default_prompts

        return self.opts.calibration_prompts or default_prompts()

    def _calibration_dtype(self) -> torch.dtype:
        # bf16 on a GPU is fast; the FP16 scales are powers of two with 16x headroom, so its rounding of a peak
        # cannot move a scale by more than one step. fp32 on a CPU, where bf16 is slow.
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def _caption_features(self) -> list:
        """The calibration prompts' caption features, the text encoder loaded alone and freed (calibrate.py)."""
        from .calibrate import caption_features

        features = caption_features(self.model_dir, self._prompts(), self._calibration_dtype(), self.device)
        self.free()
        return features

    def _calibrate(self, features: list) -> dict:
        from .calibrate import calibrate

        prompts = self._prompts()
        self.step(f"transformer: calibrating fp16 scales on {len(prompts)} prompts")
        # At the opt size: the peaks are per-channel activations, which grow little with the token count, and
        # the scales keep 16x headroom. One network on the GPU at a time (calibrate.py), with the LoRAs baked
        # in: what is exported.
        width, height = self.opts.sizes.opt
        peaks = calibrate(self.model_dir, prompts, height, width, self.opts.calibration_steps,
                          self._calibration_dtype(), self.device, self.loras, features=features)
        self.extra["fp16_peaks"] = peaks
        return peaks

    def vae_decoder(self) -> torch.nn.Module:
        prec = self.opts.precision["vae_decoder"]
        self.step("vae_decoder: loading")
        load = lambda dtype, device: checkpoint.load_vae(self.model_dir, dtype, device)  # noqa: E731
        vae = load(DTYPES[prec], self.device)
        self.extra["vae_config"] = {
            k: vae.config[k] for k in ("scaling_factor", "shift_factor", "latent_channels", "block_out_channels")
        }
        module = VaeDecoderForExport(vae, DTYPES[prec])
        lat = lambda hw: self.randn(1, vae.config.latent_channels, *hw)  # noqa: E731
        example, at = self._latent_dims()
        self._finish(
            "vae_decoder",
            module,
            self._reference(load, VaeDecoderForExport),
            (lat(example),),
            [(label, (lat(hw) * 0.8,)) for label, hw in at],
            {"latents": self._image_dims(patch=1)} if not self.opts.sizes.is_single else None,
            prec,
        )
        return module


def check_sizes(sizes: SizeRange) -> list[tuple[int, int]]:
    """(width, height) the export checks each graph at: the one size, or the range's smallest, opt and largest
    corners (a graph wrong for some sizes is most likely wrong at an end of its range)."""
    corners = [(sizes.min_width, sizes.min_height), sizes.opt, sizes.largest]
    return list(dict.fromkeys(corners))


def example_latent_hw(sizes: SizeRange) -> tuple[int, int]:
    """Latent (h, w) to trace with. For a range they must differ from each other and from every other traced
    size (16 channels, 64 caption rows, 1): the exporter would take equal example sizes for one symbol."""
    if sizes.is_single:
        return sizes.opt_height // LATENT_FACTOR, sizes.opt_width // LATENT_FACTOR
    step = SIDE_MULTIPLE // LATENT_FACTOR  # latent sides move in steps of 2 (one token)
    taken = {1, 16, 64}
    picks = []
    for lo, opt, hi in ((sizes.min_height, sizes.opt_height, sizes.max_height),
                        (sizes.min_width, sizes.opt_width, sizes.max_width)):
        lo, opt, hi = lo // LATENT_FACTOR, opt // LATENT_FACTOR, hi // LATENT_FACTOR
        candidates = [opt] + [v for d in range(step, hi - lo + step, step) for v in (opt + d, opt - d)]
        pick = next((v for v in candidates if lo <= v <= hi and v not in taken), None)
        if pick is None:
            raise UserError(f"the size range {sizes.describe()} is too narrow to export with dynamic sizes; "
                            "export one size with --width/--height")
        taken.add(pick)
        picks.append(pick)
    return picks[0], picks[1]


# component folder of the checkpoint that each network is exported from
SOURCE_COMPONENT = {"text_encoder": "text_encoder", "transformer": "transformer", "vae_decoder": "vae"}


def estimate_bundle_bytes(model_dir: Path, precision: dict) -> int:
    """Bytes the bundle will take: each network's weights in its export precision, and the tokenizer (the VAE's
    encoder is counted though only the decoder is exported: a few tens of MB of margin)."""
    weights = sum(
        checkpoint.weight_count(model_dir, SOURCE_COMPONENT[net]) * DTYPES[precision[net]].itemsize
        for net in NETWORKS
    )
    return weights + sum(f.stat().st_size for f in (Path(model_dir) / "tokenizer").iterdir() if f.is_file())


# What the export holds besides the weights it states: the libraries, the exporter's graph, activations at the opt
# size (measured at full size on the H200: BENCHMARKS.md, "memory-lean export").
GPU_MARGIN = 2 * 10**9
HOST_MARGIN = 4 * 10**9
# Host bytes per transformer weight while an NVFP4 graph's weights are rewritten to FP4 (quantize.finish_nvfp4):
# the fp16 graph read whole, ModelOpt's FP4 values and FP8 and float32 block scales held as node attributes, and
# the copy onnx.save makes. Measured at full size on the H200: 31.4 GB host peak, 3.3 GB of it the libraries.
NVFP4_REWRITE_BYTES = 4.6


@dataclass
class ExportNeeds:
    gpu: int  # bytes of GPU memory (0 for a CPU export)
    host: int  # bytes of host memory
    largest: str  # the network that decides them

    def line(self, device: str) -> str:
        gpu = f"{self.gpu / 1e9:.1f} GB of GPU memory and " if self.gpu else ""
        return f"export on {device} needs about {gpu}{self.host / 1e9:.1f} GB of host memory (largest: {self.largest})"


def export_needs(model_dir: Path, opts: ExportOptions) -> ExportNeeds:
    """The export's peaks, from the checkpoint's headers: one network at a time, each loaded in its export
    precision where it runs (fp16 calibration: bf16 on a GPU, fp32 on a CPU).

    On a CPU the host peak is the loading: the network, and the checkpoint shard being read and cast (measured,
    stage by stage: the ONNX writing holds the weights once). On a GPU the host holds the exporter's copy of the
    graph's weights and the float32 reference a GPU check streams from (reference.py); the GPU, the network and
    its activations. Measured at full size on the H200 (BENCHMARKS.md, "memory-lean export") while the exporter
    still kept every written network alive (fixed since: onnx_export.release_weights): CPU 29.0 GB (now predicted
    26.3), GPU export 46.5 GB host and 21.6 GB GPU (predicted 40.9 and 14.3); the text encoder's 7.8 GB, still
    held, account for each gap. With full-width networks of fewer blocks, every stage now peaks within these terms.
    Since the fix, on the H200 (fp8 and nvfp4 GPU exports): GPU 13.9 GB (predicted 14.3), host 27.9 GB with
    checks (predicted 40.9: the exporter's copy is gone before the float32 reference is built) and 31.4 GB for
    nvfp4 unchecked (the FP4 rewrite; predicted 32.3)."""
    on_gpu = opts.device.startswith("cuda")
    checked = opts.check != "never" and on_gpu
    needs = {}  # network -> (GPU bytes, host bytes)
    for net in NETWORKS:
        count = checkpoint.weight_count(model_dir, SOURCE_COMPONENT[net])
        held = count * DTYPES[opts.precision[net]].itemsize  # the network where it runs
        calibrated = opts.precision[net] in QUANTIZED or (opts.precision[net] == "fp16" and opts.fp16_scales is None)
        if net == "transformer" and calibrated:  # in the calibration's precision (also while quantizing)
            held = max(held, count * (2 if on_gpu else 4))
        if on_gpu:
            copy = count * DTYPES[opts.precision[net]].itemsize  # the exporter's, while it writes the graph
            needs[net] = (held, copy + (count * 4 if checked else 0))
        else:
            needs[net] = (0, held + checkpoint.largest_shard_bytes(model_dir, SOURCE_COMPONENT[net]))
        if opts.precision[net] == "nvfp4":
            needs[net] = (needs[net][0], max(needs[net][1], int(count * NVFP4_REWRITE_BYTES)))
    largest = max(needs, key=lambda net: needs[net][0 if on_gpu else 1])
    return ExportNeeds(max(g for g, _ in needs.values()) + GPU_MARGIN if on_gpu else 0,
                       max(h for _, h in needs.values()) + HOST_MARGIN, largest)


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


def cap_gpu_memory(device: torch.device, limit: int) -> None:
    """Let this process take at most `limit` bytes of the GPU (PyTorch's allocator refuses beyond it), so an
    export that fits here fits a card of that size."""
    device = torch.device("cuda", torch.cuda.current_device()) if device.index is None else device
    total = torch.cuda.get_device_properties(device).total_memory
    if limit > total:
        raise UserError(f"--max-gpu-memory {limit / 2**30:.1f} GiB is more than this GPU's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(limit / total, device)


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
        exporter = _Exporter(model_dir, work, opts, progress, loras)
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


def _manifest(model_dir: Path, opts: ExportOptions, exporter: _Exporter, scheduler: dict) -> dict:
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
        "export_memory": exporter.peaks.stages,  # each stage's own peaks (zimage_trt/peaks.py)
    }
