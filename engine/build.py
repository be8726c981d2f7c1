"""`zimage-trt build`: the bundle's ONNX graphs -> one strongly typed engine per network, for a target GPU.

One code path for TensorRT and TensorRT-RTX (engine/trt_api.py holds the differences):

1. Everything that can fail before a long build is checked first: the library, the target GPU, each
   engine's host memory need (about 3x its weights), and which engines are already current.
2. Each graph is parsed into a strongly typed network (precision comes from the ONNX types), with one
   optimization profile: caption length over its full range, optimized at a typical prompt; the latent height
   and width over the bundle's size range (or the box around `--sizes`), optimized at its opt size. A one-size
   bundle gives engines of one fixed image shape.
3. The plan is streamed to a temporary file and renamed into place, then its sidecar is written.
   TensorRT keeps a timing cache beside the engines; TensorRT-RTX takes compute-capability targets instead.

One build at a time writes an engine folder (a lock beside it); what a killed build left there is removed by the
next one, and the engines' size is checked against the free space before the first build starts.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from zimage_trt.common.errors import UserError
from zimage_trt.common.files import TargetLock, check_space, os_error_line, remove_debris, temp_path, writing
from zimage_trt.runtime.bundle import NETWORKS, Bundle
from zimage_trt.runtime.sizes import SizeRange

from . import sidecar
from .checks import (
    available_host_memory,
    check_host_memory,
    check_rtx_refit_host,
    host_memory_need,
    resolve_targets,
)
from .network import allow_unfused_attention, mark_refittable, parse_network
from .profiles import TYPICAL_PROMPT_TOKENS, add_io_and_profile, image_profile, profile_ranges, takes_image
from .trt_api import Flavour, gpu_info, load_flavour
from .writer import progress_monitor, stream_writer

ENGINE_OVERHEAD_BYTES = 16 << 20  # kernels and tactics an engine holds beyond its weights


@dataclass
class BuildOptions:
    backend: str = "tensorrt"
    targets: list[str] = field(default_factory=lambda: ["auto"])
    sizes: list[tuple[int, int]] | None = None  # (width, height) to cover; None: the bundle's whole range
    opt_tokens: int = TYPICAL_PROMPT_TOKENS
    networks: tuple[str, ...] = NETWORKS
    refittable: bool = False  # the transformer's mapped weights can be refitted (LoRA at run time)
    weight_streaming: bool = False  # the transformer may keep part of its weights in host memory (--weight-budget)
    force: bool = False
    check_memory: bool = True
    opt_level: int | None = None
    verbose: bool = False


@dataclass
class BuildResult:
    network: str
    status: str  # built | current
    reason: str
    seconds: float
    meta: dict


def set_compute_capabilities(config, cc_values: list) -> None:
    """TensorRT-RTX: the targets of this build; a target the library refuses (its setter returns False) is one line
    naming it, never a build for fewer GPUs than asked."""
    config.num_compute_capabilities = len(cc_values)
    for i, cc in enumerate(cc_values):
        if not config.set_compute_capability(cc, i):
            raise UserError(f"TensorRT-RTX refused the build target {cc.name} (see its log above); name the RTX GPUs "
                            "to build for, e.g. --target sm89,sm120")


class _Builder:
    def __init__(
        self, flavour: Flavour, bundle: Bundle, out: Path, opts: BuildOptions, targets: dict, cc_values: list,
        image: SizeRange,
    ):
        self.flavour, self.bundle, self.out, self.opts, self.image = flavour, bundle, out, opts, image
        self.targets, self.cc_values = targets, cc_values
        self.logger = flavour.logger(opts.verbose)
        self.builder = flavour.trt.Builder(self.logger)
        self.timing_cache_path = out / "timing.cache"

    def _config(self, bar, name: str):
        config = self.builder.create_builder_config()
        config.progress_monitor = progress_monitor(self.flavour, bar)
        if self.opts.opt_level is not None:
            config.builder_optimization_level = self.opts.opt_level
        flags = {"strongly_typed": True, "opt_level": self.opts.opt_level}
        if self.flavour.is_rtx:
            set_compute_capabilities(config, self.cc_values)
            # TensorRT-RTX allows CUDA stream capture only of engines built for user-managed memory (RTX 1.2
            # release notes); the runtime records the denoising loop in a CUDA graph, so every engine needs it,
            # except a weight-streamed transformer: RTX 1.7 refuses the two flags together (streaming allocates at
            # run time), so that engine runs its loop eagerly.
            streamed = self.opts.weight_streaming and name == "transformer"
            if not streamed:
                config.set_flag(self.flavour.trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
            flags["require_user_allocation"] = not streamed
        else:
            blob = self.timing_cache_path.read_bytes() if self.timing_cache_path.is_file() else b""
            cache = config.create_timing_cache(blob) if blob else None
            if blob and (cache is None or not config.set_timing_cache(cache, ignore_mismatch=False)):
                # Written on another GPU or by another version (or not a cache at all): its timings would
                # mislead the tactic choice. set_timing_cache says so by returning False.
                bar.write(f"timing cache {self.timing_cache_path} is from another GPU or TensorRT version; "
                          "discarded, a new one is written")
                cache = None
            if cache is None:
                config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
            flags["timing_cache"] = True
        return config, flags

    def build(self, name: str, bar) -> BuildResult:
        net_info = self.bundle.network(name)
        start = time.perf_counter()
        bar.set_description(f"{name}: parsing")
        network, _parser = parse_network(self.flavour, self.builder, self.logger, self.bundle.onnx_path(name))
        config, flags = self._config(bar, name)
        flags["attention_unfused"] = allow_unfused_attention(self.flavour, network, net_info["precision"] == "fp32")
        if self.opts.refittable and name == "transformer":
            flags["refittable_weights"] = mark_refittable(self.flavour, network, config, net_info)
        if self.opts.weight_streaming and name == "transformer":
            # Strongly typed networks only (they all are here): the runtime then chooses how many bytes of
            # weights live on the GPU (`--weight-budget`) and streams the rest from host memory per pass.
            config.set_flag(self.flavour.trt.BuilderFlag.WEIGHT_STREAMING)
            flags["weight_streaming"] = True
        io, profile = add_io_and_profile(
            self.flavour, self.builder, network, net_info, profile_ranges(self.bundle, self.opts.opt_tokens, self.image)
        )
        if profile is not None:
            config.add_optimization_profile(profile)
        bar.set_description(f"{name}: building")
        engine = sidecar.engine_path(self.out, name)
        tmp = temp_path(engine)
        try:
            with open(tmp, "wb") as f:
                if hasattr(self.builder, "build_serialized_network_to_stream"):
                    writer = stream_writer(self.flavour, f)
                    ok = self.builder.build_serialized_network_to_stream(network, config, writer)
                    if writer.error is not None:
                        raise writer.error
                    digest, size = writer.sha.hexdigest(), writer.n
                else:  # TensorRT before 10.13
                    plan = self.builder.build_serialized_network(network, config)
                    ok = plan is not None
                    data = memoryview(plan) if ok else b""
                    f.write(data)
                    digest, size = hashlib.sha256(data).hexdigest(), len(data)
                f.flush()
                os.fsync(f.fileno())
            if not ok or size == 0:
                raise UserError(f"{self.flavour.name} could not build {name}; rerun with --verbose for the builder's log")
            # The old sidecar goes before the new engine comes: a crash in between leaves an engine without a
            # sidecar (rebuilt next time), never a sidecar that describes another engine.
            sidecar.sidecar_path(engine).unlink(missing_ok=True)
            os.replace(tmp, engine)
        except OSError as exc:  # named as the user knows it: the engine, not its temporary file
            raise UserError(os_error_line(exc, engine, "free space there or pass another --out")) from None
        finally:
            if tmp.exists():
                tmp.unlink()
        if not self.flavour.is_rtx:
            sidecar.write_atomic(self.timing_cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
        seconds = time.perf_counter() - start
        meta = {
            "network": name,
            "precision": net_info["precision"],
            "quantization": net_info.get("quantization"),
            "onnx": net_info["onnx"],
            "onnx_sha256": net_info["sha256"],
            "io": io,
            "backend": self.flavour.name,
            "backend_version": self.flavour.version,
            "targets": self.targets,
            "request": _request(self.opts, net_info, self.image),
            # the image sizes this engine's profile covers (pixels: min, opt, max), for the runtime's refusals
            "image_sizes": self.image.to_dict() if takes_image(net_info) else None,
            "build": {
                "flags": flags,
                "seconds": round(seconds, 2),
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(),
                "engine_bytes": size,
                "engine_sha256": digest,
            },
        }
        sidecar.write_sidecar(engine, meta)
        return BuildResult(name, "built", "", seconds, meta)


def _request(opts: BuildOptions, network: dict, image: SizeRange) -> dict:
    """The build options that shape an engine: a change in any of them makes it stale. The image sizes are part
    of it only for the networks that take latents (the text encoder is the same engine for any size)."""
    request = {"opt_tokens": opts.opt_tokens, "opt_level": opts.opt_level}
    if takes_image(network):
        request["image_sizes"] = image.to_dict()
    if opts.refittable and network.get("weights"):  # the transformer; a change of it rebuilds only that engine
        request["refittable"] = True
    if opts.weight_streaming and network.get("weights"):
        request["weight_streaming"] = True
    return request


def build_engines(bundle_dir, out_dir, opts: BuildOptions | None = None) -> list[BuildResult]:
    from tqdm import tqdm

    opts = opts or BuildOptions()
    bundle = Bundle.open(bundle_dir)
    image = image_profile(bundle, opts.sizes)
    flavour = load_flavour(opts.backend, opset=int(bundle.manifest.get("opset", 23)))
    gpu = gpu_info()
    targets, cc_values = resolve_targets(flavour, opts.targets, gpu)
    if opts.refittable and flavour.is_rtx and "transformer" in opts.networks:
        check_rtx_refit_host(targets, gpu)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    for name in opts.networks:
        if name not in NETWORKS:
            raise UserError(f"unknown network {name!r}; networks: {', '.join(NETWORKS)}")
        for cc in targets.get("compute_capabilities") or [targets.get("gpu", {}).get("compute_capability")]:
            sidecar.check_quantized_target(name, bundle.network(name).get("quantization"), cc, "the target")

    # Decide what to build, and check memory for all of it, before the first build starts.
    todo, results = [], []
    for name in opts.networks:
        engine = sidecar.engine_path(out, name)
        meta = sidecar.read_sidecar(engine)
        reason = "--force" if opts.force else sidecar.stale_reason(
            meta, engine, bundle.network(name), flavour.name, flavour.version, targets,
            _request(opts, bundle.network(name), image),
        )
        if reason:
            todo.append((name, reason))
        else:
            results.append(BuildResult(name, "current", "up to date", 0.0, meta))
    available = available_host_memory()
    if todo:
        largest = max((name for name, _ in todo), key=lambda n: bundle.network(n)["bytes"])
        free = f"; {available / 1e9:.1f} GB available" if available is not None else ""
        print(f"build needs about {host_memory_need(bundle.network(largest)['bytes']) / 1e9:.1f} GB of host memory "
              f"(the {largest}; one engine at a time){free}", flush=True)
    if opts.check_memory:
        for name, _ in todo:
            check_host_memory(name, bundle.network(name)["bytes"], available)

    with TargetLock(out, "build"):
        remove_debris(out)
        # An engine holds the network's weights in their precision, as the ONNX file does, plus its kernels
        # (measured: 12.36 GB for 12.3 GB of fp16 ONNX; 3-8 MB more than the ONNX for the tiny model's engines);
        # a rebuilt engine is written beside the old one before replacing it.
        need = sum(bundle.network(name)["bytes"] + ENGINE_OVERHEAD_BYTES for name, _ in todo)
        if todo:
            check_space(out if out.exists() else out.parent, need, f"writing the engines ({', '.join(n for n, _ in todo)})",
                        "free space there or pass another --out")
        with writing(out, "free space there or pass another --out"):  # an OSError: one line naming the file
            out.mkdir(parents=True, exist_ok=True)
            builder = _Builder(flavour, bundle, out, opts, targets, cc_values, image)
            for name, reason in todo:
                with tqdm(total=1, unit="step", dynamic_ncols=True, leave=True) as bar:
                    result = builder.build(name, bar)
                    bar.set_description(f"{name}: built in {result.seconds:.1f} s")
                result.reason = reason
                results.append(result)
    order = {n: i for i, n in enumerate(opts.networks)}
    return sorted(results, key=lambda r: order[r.network])
