"""Each network of one export, in turn: load it in its export precision, write its ONNX graph, check the graph
against a float32 reference (onnxruntime on a CPU, the eager twin on a GPU) and record what the manifest says of it.
The transformer is calibrated (FP16 rescale), quantized (FP8/NVFP4) and has its LoRAs baked first."""

from __future__ import annotations

from pathlib import Path

import torch

from zimage_trt.common.files import sha256_of
from zimage_trt.common.peaks import StagePeaks, release_memory
from zimage_trt.runtime.sizes import LATENT_FACTOR, format_size

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
    CheckResult,
    check_eager,
    check_onnx,
    check_runner,
    export_onnx,
    graph_io,
    rename_dims,
    require_ok,
)
from .options import CPU_CHECK_MAX_PARAMS, DTYPES, QUANTIZED, ExportOptions, check_sizes, example_latent_hw


def onnx_files(path: Path) -> list[Path]:
    """The graph and its external-data file, if it has one."""
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


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


class NetworkExporter:
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
