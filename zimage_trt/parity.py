"""`zimage-trt parity`: every stage of a backend against eager PyTorch, and the image against diffusers.

Per network, the backend's session and the float32 reference module get the same real inputs (the prompt's
ids, its caption features, the first step's latents, the last step's latents) and the table shows
max|err| and max|err| / max|ref|. End to end, the runtime's image on that backend is compared with the image
of diffusers' `ZImagePipeline(..., num_inference_steps=9, guidance_scale=0.0)` for the same prompt and seed,
as PSNR in dB over 8-bit pixels.

`parity --against OTHER` (run_against) compares two bundles of one model the same way, OTHER's run giving the
inputs and the reference: what a lower precision costs on the user's own weights, without the model or diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zimage_trt.common.peaks import release_memory

# max|err| / max|ref| per network precision (reference: float32 eager modules).
# nvfp4 (TensorRT on Blackwell only: no backend here runs it): the tiny model's fake-quantized twin measured 7.2e-2
# with the test recipe's skips and 1.39e-1 with every block quantized, the full-size one (random weights) 2.86e-1
# (BENCHMARKS.md)
NETWORK_BOUND = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 6e-2, "fp8": 1e-1, "nvfp4": 4e-1}
# PSNR of the 8-bit image against diffusers' fp32 image: fp32 graphs must be near-identical; reduced precision
# runs through 9 steps of a random model (the tiny model's dynamics amplify rounding more than real weights).
# nvfp4: diffusers' pipeline with the fake-quantized transformer measured 45.3 dB (41.1 dB, every block quantized).
IMAGE_BOUND_DB = {"fp32": 40.0, "fp16": 30.0, "bf16": 25.0, "fp8": 25.0, "nvfp4": 25.0}


@dataclass
class Row:
    stage: str
    backend: str
    precision: str
    max_abs: float
    rel: float
    bound: float
    psnr: float | None = None

    @property
    def ok(self) -> bool:
        if self.psnr is not None:
            return self.psnr >= self.bound
        return bool(np.isfinite(self.rel)) and self.rel <= self.bound

    def cells(self) -> list[str]:
        if self.psnr is not None:
            metric = f"PSNR {self.psnr:6.2f} dB"
            bound = f">= {self.bound:.0f} dB"
        else:
            metric = f"rel {self.rel:.2e}"
            bound = f"<= {self.bound:.0e}"
        return [self.stage, self.backend, self.precision, f"{self.max_abs:.3e}", metric, bound, "ok" if self.ok else "FAIL"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def format_table(rows: list[Row]) -> str:
    head = ["stage", "backend", "precision", "max|err|", "error", "bound", "verdict"]
    cells = [head] + [r.cells() for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(head))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _compare(stage, backend, precision, got: torch.Tensor, want: torch.Tensor, bound: float) -> Row:
    from zimage_trt.export.onnx_export import error_of

    return Row(stage, backend, precision, *error_of(got, want), bound)


def reference_images(
    model_dir, prompt: str, seed: int, sizes, steps: int = 9, device="cpu", guidance=None, loras=()
) -> dict:
    """{(width, height): diffusers' ZImagePipeline image in float32, as 8-bit HxWx3} (noise drawn on the CPU, as
    the runtime's default), one pipeline load for all sizes; `guidance` (a runtime Guidance) as diffusers'
    guidance_scale, negative_prompt, cfg_normalization and cfg_truncation; `loras` [(original LoRA file, strength)]
    through diffusers' load_lora_weights and set_adapters."""
    from zimage_trt.export.checkpoint import load_pipeline

    pipe = load_pipeline(model_dir, torch.float32, device)
    pipe.set_progress_bar_config(disable=True)
    if loras:
        names = [f"lora{i}" for i in range(len(loras))]
        for name, (path, _) in zip(names, loras):
            pipe.load_lora_weights(str(path), adapter_name=name)
        pipe.set_adapters(names, [strength for _, strength in loras])
    images = {}
    for width, height in sizes:
        image = pipe(
            prompt,
            height=height,
            width=width,
            num_inference_steps=steps,
            **guidance_kwargs(guidance),
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        ).images[0]
        images[(width, height)] = (image * 255).round().astype(np.uint8)
    del pipe
    return images


def guidance_kwargs(guidance) -> dict:
    """diffusers' arguments for a runtime Guidance (None: no guidance, the Turbo default)."""
    if guidance is None:
        return {"guidance_scale": 0.0}
    return {
        "guidance_scale": guidance.scale,
        # diffusers' default negative prompt is "" too; passing it keeps the two runs' inputs visibly equal
        "negative_prompt": guidance.negative_prompt,
        "cfg_normalization": guidance.normalization,
        "cfg_truncation": guidance.truncation,
    }


def run_parity(
    model_dir, bundle, sessions: dict, backend: str, prompt: str, seed: int, device="cpu", sizes=None, guidance=None,
    loras=(),
) -> list[Row]:
    """Rows for each network of `sessions` and for the end-to-end image, at each (width, height) of `sizes`
    (default: the bundle's opt size).

    The float32 references run on the same device as the sessions (a GPU makes full size practical); they are
    freed before diffusers' pipeline is loaded for the image, so at most one float32 copy is resident.
    """
    from zimage_trt.export.onnx_export import strict_fp32

    device = torch.device(device)
    sizes = list(sizes or [bundle.sizes.opt])
    with strict_fp32():
        return _run_parity(model_dir, bundle, sessions, backend, prompt, seed, device, sizes, guidance, list(loras))


def lora_sources(loras) -> list[tuple[str, float]]:
    """The original files of converted LoRAs (diffusers' reference loads those), checked by their hash."""
    from zimage_trt.common.errors import UserError
    from zimage_trt.common.files import sha256_of

    out = []
    for lora, strength in loras:
        source = lora.meta.get("source", "")
        if not source or not Path(source).is_file() or sha256_of([Path(source)]) != lora.meta.get("source_sha256"):
            raise UserError(f"parity with LoRA {lora.path} compares with diffusers on its original file {source or '?'},"
                            " which is gone or has changed; convert the LoRA again from its original")
        out.append((source, strength))
    return out


def _run_parity(model_dir, bundle, sessions, backend, prompt, seed, device, sizes, guidance, loras) -> list[Row]:
    from zimage_trt.export.reference import reference_modules
    from zimage_trt.runtime.pipeline import ZImageRuntime
    from zimage_trt.runtime.torch_session import TorchSession

    refs = reference_modules(model_dir, torch.float32, device)
    ref_rt = ZImageRuntime(bundle, {n: TorchSession(n, m, device) for n, m in refs.items()}, device)
    ours_rt = ZImageRuntime(bundle, sessions, device)
    for size in sizes:  # every size is checked before any work: one line for a size nobody covers
        ours_rt.check_size(*size)
    sources = lora_sources(loras)
    if loras:  # the same weights on both sides, for the per-network rows and the image
        ref_rt.set_loras(loras)
        ours_rt.set_loras(loras)
    prec = {n: s.precision for n, s in sessions.items()}
    bounds = {n: NETWORK_BOUND[p] for n, p in prec.items()}
    label = _labeller(bundle, sizes)
    rows, _ = _network_rows(ref_rt, sessions, backend, prec, bounds, prompt, seed, sizes, label)
    ref_rt.close()  # the float32 reference modules, before diffusers' pipeline is loaded
    del refs, ref_rt
    release_memory(device)

    ours = {size: ours_rt.generate(prompt, seed, size=size, guidance=guidance) for size in sizes}
    if loras:
        ours_rt.set_loras([])  # the caller's sessions get their base weights back
    ours_rt.close(sessions=False)  # the caller's sessions stay open
    steps = bundle.scheduler["default_steps"]
    theirs = reference_images(model_dir, prompt, seed, sizes, steps, device, guidance, sources)
    release_memory(device)
    worst = min(prec.values(), key=IMAGE_BOUND_DB.get)  # the image is held to its least precise network
    cfg = f", cfg {guidance.scale:g}" if guidance is not None and guidance.active else ""
    cfg += "".join(f", {lora.name}:{strength:g}" for lora, strength in loras)
    return rows + _image_rows(ours, theirs, backend, worst, IMAGE_BOUND_DB[worst], steps, cfg, label)


def _labeller(bundle, sizes):
    """The size suffix of a row's stage: none for a one-size bundle checked at its size."""
    from zimage_trt.runtime.sizes import format_size

    if len(sizes) > 1 or not bundle.sizes.is_single:
        return lambda size: f" {format_size(*size)}"
    return lambda size: ""


def _network_rows(ref_rt, sessions, backend, prec, bounds, prompt, seed, sizes, label) -> tuple[list[Row], dict]:
    """Each network of `sessions` against the reference runtime's own session for it, on inputs captured from the
    reference run (real ids, caption features and latents rather than noise): the text encoder on the prompt, the
    transformer on the first step's inputs, the VAE on the last step's latents, at each size. `prec` and
    `bounds`: per network, the precision shown and the bound held. Also returns the reference run's images
    ({size: HxWx3 uint8}, what its `generate` gives for the prompt and seed)."""
    device = ref_rt.device
    rows, images = [], {}
    ids = ref_rt.tokenize(prompt)
    lpad = ref_rt.encode_prompt(ids)
    caption = ref_rt.caption[:, :lpad].clone()
    n = len(ids)
    feats = torch.empty(1, n, ref_rt.bundle.caption_dim, device=device)
    sessions["text_encoder"].run({"input_ids": ref_rt.ids[:, :n].contiguous()}, {"features": feats})
    rows.append(_compare("text_encoder", backend, prec["text_encoder"], feats, caption[:, :n], bounds["text_encoder"]))

    for size in sizes:
        ref_rt.use_size(*size)
        ref_rt.init_latents(seed)
        first_latents = ref_rt.latents.clone()
        ref_rt.denoise(lpad)
        last_latents = ref_rt.latents.clone()
        dit_in = {
            "latents": first_latents,
            "timestep": ref_rt.plan().t_rows[0].clone(),
            "cap_feats": caption,
            "cap_len": torch.tensor([n], device=device),
        }
        got, want = torch.empty_like(first_latents), torch.empty_like(first_latents)
        sessions["transformer"].run(dit_in, {"velocity": got})
        ref_rt.transformer.run(dit_in, {"velocity": want})
        rows.append(_compare("transformer" + label(size), backend, prec["transformer"], got, want,
                             bounds["transformer"]))

        width, height = size
        image = torch.empty(1, 3, height, width, device=device)
        sessions["vae_decoder"].run({"latents": last_latents}, {"image": image})
        images[size] = ref_rt.decode()  # the VAE on its last latents, into ref_rt.image
        rows.append(_compare("vae_decoder" + label(size), backend, prec["vae_decoder"], image, ref_rt.image,
                             bounds["vae_decoder"]))
    return rows, images


def _image_rows(ours: dict, theirs: dict, backend, precision, bound, steps, extra, label) -> list[Row]:
    """{size: 8-bit image} against {size: 8-bit image}: max pixel difference and PSNR."""
    rows = []
    for size in ours:
        a, b = ours[size], theirs[size]
        diff = float(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())
        rows.append(Row(f"image{label(size)} ({steps} steps{extra})", backend, precision, diff, diff / 255, bound,
                        psnr(a, b)))
    return rows


def run_against(bundle, sessions, other, other_sessions, backend, prompt, seed, device="cpu", sizes=None) -> list[Row]:
    """This bundle's networks and image against another bundle's of the same model, stage by stage: e.g. an fp8
    bundle against the user's fp16 one, on their own weights, without the original model or diffusers.

    Each network of `sessions` runs on inputs captured from `other`'s run and is compared with `other_sessions`'
    output; the images of both runtimes for the prompt and seed are compared as PSNR. A row's precision reads
    "ours vs theirs"; its bound is the looser of the two precisions' bounds against float32.
    """
    from zimage_trt.common.errors import UserError
    from zimage_trt.runtime.pipeline import ZImageRuntime

    if bundle.manifest.get("config") != other.manifest.get("config"):
        raise UserError(f"--against {other.root}: a different model from {bundle.root} (their network "
                        "configurations differ); compare two bundles exported from one model")
    device = torch.device(device)
    sizes = list(sizes or [bundle.sizes.opt])
    theirs_rt, ours_rt = ZImageRuntime(other, other_sessions, device), ZImageRuntime(bundle, sessions, device)
    for size in sizes:
        ours_rt.check_size(*size)
        theirs_rt.check_size(*size)
    pairs = {n: (s.precision, other_sessions[n].precision) for n, s in sessions.items()}
    prec = {n: f"{a} vs {b}" for n, (a, b) in pairs.items()}
    bounds = {n: max(NETWORK_BOUND[a], NETWORK_BOUND[b]) for n, (a, b) in pairs.items()}
    label = _labeller(bundle, sizes)
    rows, theirs = _network_rows(theirs_rt, sessions, backend, prec, bounds, prompt, seed, sizes, label)
    ours = {size: ours_rt.generate(prompt, seed, size=size) for size in sizes}
    for rt in (ours_rt, theirs_rt):
        rt.close(sessions=False)  # the caller's sessions stay open
    worst = min((p for pair in pairs.values() for p in pair), key=IMAGE_BOUND_DB.get)
    steps = bundle.scheduler["default_steps"]
    return rows + _image_rows(ours, theirs, backend, f"{worst} (worst)", IMAGE_BOUND_DB[worst], steps, "", label)


def fp16_peaks(bundle, sessions, prompt, seed, device="cpu", sizes=None, guidance=None) -> tuple[str, list[str]]:
    """`parity --fp16-peaks`: the bundle's transformer.onnx with every FP16 intermediate's largest |value| as an
    output, run by onnxruntime on `device` through the whole loop at each size (the text encoder and VAE of
    `sessions`; the base weights; with `guidance`, its passes too), reported per block against 65504. Returns the
    tables and the blocks that overflowed."""
    from zimage_trt.runtime.ort_peaks import CPU_NOTE, PeakSession, format_peaks, overflowed
    from zimage_trt.runtime.pipeline import ZImageRuntime
    from zimage_trt.runtime.sizes import format_size

    device = torch.device(device)
    sizes = list(sizes or [bundle.sizes.opt])
    peak = PeakSession(bundle.onnx_path("transformer"), sessions["transformer"].precision, device,
                       stream=getattr(sessions["transformer"], "stream", None))
    rt = ZImageRuntime(bundle, {**sessions, "transformer": peak}, device)
    tables, hot = [], []
    where = "onnxruntime CUDA" if device.type == "cuda" else "onnxruntime CPU"
    try:
        for size in sizes:
            peak.reset()
            rt.generate(prompt, seed, size=size, guidance=guidance)
            rows = peak.by_block()
            title = (f"FP16 peaks, transformer ({peak.precision}, {where}) at {format_size(*size)}, "
                     f"{peak.runs} passes: largest |activation| per block against FP16's 65504")
            tables.append(format_peaks(rows, title))
            hot += [f"{block} at {format_size(*size)}" for block, v, _ in rows if overflowed(v)]
    finally:
        rt.close(sessions=False)  # the caller's text encoder and VAE stay open
        peak.close()
    if device.type != "cuda":
        tables.append(f"note: {CPU_NOTE}")
    return "\n\n".join(tables), hot
