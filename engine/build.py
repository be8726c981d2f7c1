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
from zimage_trt.runtime.sizes import SizeRange, format_size

from . import sidecar
from .trt_api import RTX_UNSUPPORTED_CC, Flavour, gpu_info, load_flavour, rtx_targets

# Peak host memory of one engine's build = FACTOR x its ONNX weight bytes + BASE. Measured with TensorRT-RTX 1.7.1
# (H200 host, BENCHMARKS.md): fp16 transformer 34.7 GB for 12.4 GB of weights, fp8 (fp16 weights under Q/DQ) 26.4
# GB for 12.4, nvfp4 13.2 GB for 3.7 GB of FP4 weights, 6.7 GB for 2.2 GB fp16 earlier: the base covers the
# builder itself, which the small nvfp4 weights make visible.
BUILD_MEMORY_FACTOR = 3.0
BUILD_MEMORY_BASE = 3 << 30
ENGINE_OVERHEAD_BYTES = 16 << 20  # kernels and tactics an engine holds beyond its weights
TYPICAL_PROMPT_TOKENS = 128  # opt point of the caption profile: a one- or two-sentence prompt in its chat turn


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


def resolve_targets(flavour: Flavour, requested: list[str], gpu: dict | None) -> tuple[dict, list]:
    """The sidecar's `targets` and, for TensorRT-RTX, the ComputeCapability values to set."""
    auto = requested in ([], ["auto"])
    if not flavour.is_rtx:
        if not auto:
            raise UserError("--target is for tensorrt-rtx; TensorRT builds for the GPU it runs on (omit --target)")
        if gpu is None:
            raise UserError("TensorRT builds on the GPU it targets and PyTorch sees no CUDA GPU here")
        return {"gpu": {"name": gpu["name"], "compute_capability": gpu["compute_capability"]}}, []
    if auto:
        if gpu is None:
            raise UserError("no GPU here to target; name the RTX GPUs to build for, e.g. --target sm89,sm120")
        if gpu["cc"] in RTX_UNSUPPORTED_CC:
            raise UserError(
                f"TensorRT-RTX does not support {gpu['name']} (compute capability {gpu['cc'][0]}.{gpu['cc'][1]}); "
                "use --backend tensorrt on this GPU, or --target sm89,... to build for RTX GPUs elsewhere"
            )
        requested = [gpu["compute_capability"]]
    values = rtx_targets(flavour, requested)
    names = [r.strip().lower() for r in requested]
    return {"compute_capabilities": names}, values


def available_host_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_memory_need(weight_bytes: int) -> int:
    """Peak host memory of one engine's build (the engines are built one at a time, each freed before the next)."""
    return int(BUILD_MEMORY_FACTOR * weight_bytes + BUILD_MEMORY_BASE)


def check_host_memory(name: str, weight_bytes: int, available: int | None) -> None:
    need = host_memory_need(weight_bytes)
    if available is not None and need > available:
        raise UserError(
            f"building {name} needs about {need / 1e9:.1f} GB of host memory ({BUILD_MEMORY_FACTOR:.0f}x its "
            f"{weight_bytes / 1e9:.1f} GB of weights + {BUILD_MEMORY_BASE / 1e9:.1f} GB) and {available / 1e9:.1f} "
            "GB is available; build on a machine with more memory (TensorRT-RTX builds for RTX GPUs on any Linux "
            "host), or pass --skip-memory-check"
        )


def check_rtx_refit_host(targets: dict, gpu: dict | None) -> None:
    """A refittable TensorRT-RTX engine is built on a GPU of its one target architecture. Measured with
    TensorRT-RTX 1.7.1: without CUDA the build fails at "Determining refit engines" (CUDA driver error 35), and on an
    H200 a build for sm89 and sm120 fails there too (CUDA error 222: the builder loads the kernels it compiled for
    the target on the GPU it runs on)."""
    wanted = targets.get("compute_capabilities", [])
    if gpu is None or wanted != [gpu["compute_capability"]]:
        here = f"this host's {gpu['name']} ({gpu['compute_capability']})" if gpu else "this host (no CUDA GPU)"
        raise UserError(
            f"a refittable TensorRT-RTX engine is built on a GPU of its one target architecture, and {here} is not "
            f"{' or '.join(wanted) or 'one'}; run `build --refittable --target auto` on the RTX GPU itself, or build "
            "here without --refittable (LoRAs then need --lora at export)"
        )


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


def _parse(flavour: Flavour, builder, logger, path: Path):
    trt = flavour.trt
    network = builder.create_network(flavour.network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        err = parser.get_error(0)
        node = err.node_name() or f"#{err.node()}"
        raise UserError(
            f"{path.name} does not parse with {flavour.name} {flavour.version}: node '{node}' "
            f"({err.node_operator()}): {err.desc()}"
        )
    return network, parser


_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32", "BOOL": "bool"}


def _dtype_name(dtype) -> str:
    key = str(dtype).split(".")[-1].upper()
    return _DTYPE_NAMES.get(key, key.lower())


def _io_and_profile(flavour: Flavour, builder, network, io_spec: dict, ranges: dict):
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


MAX_FUSED_HEAD_DIM = 256  # the largest head size TensorRT's fused attention kernels take


def _allow_unfused_attention(flavour: Flavour, network, fp32: bool) -> int:
    """Let attention that has no fused kernel fall back to unfused ones; returns how many were marked.

    The fused attention kernels are FP16/BF16 (and FP8) with head sizes up to 256. An FP32 graph's attention and
    the Flux VAE's single-head attention (head size 512) have no dedicated kernel, and the builder refuses them
    unless they are marked decomposable (a one-size VAE engine can still find one; a size range cannot). FP32
    engines are for parity checks, not speed, and the VAE's one attention is a small part of its time; the
    transformer's FP16/BF16 attention (head size 128) is never decomposed, so a missing fused kernel there fails
    the build instead of running slowly.
    """
    trt = flavour.trt
    kind = getattr(trt.LayerType, "ATTENTION_INPUT", None)
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if kind is not None and layer.type == kind:
            layer.__class__ = trt.IAttentionInputLayer  # the Python API's documented downcast
            head_dim = layer.attention.get_input(0).shape[-1]
            if fp32 or head_dim > MAX_FUSED_HEAD_DIM:
                layer.attention.decomposable = True
                count += 1
    return count


def _mark_refittable(flavour: Flavour, network, config, net_info: dict) -> int:
    """REFIT_INDIVIDUAL with the transformer's mapped weights (the ones a LoRA can change) marked refittable: the
    rest stay constants the builder may fold and fuse. Returns how many were marked."""
    weights = net_info.get("weights")
    if not weights:
        raise UserError("--refittable needs the bundle's weight map, which this bundle predates; re-export it")
    config.set_flag(flavour.trt.BuilderFlag.REFIT_INDIVIDUAL)
    marked = 0
    for entry in weights.values():
        if not network.mark_weights_refittable(entry["initializer"]):
            raise UserError(f"the transformer graph has no weights named {entry['initializer']!r} to mark refittable; "
                            "the bundle's weight map is stale, re-export it")
        marked += 1
    return marked


def _progress_monitor(flavour: Flavour, bar):
    """An IProgressMonitor that drives a tqdm bar with the builder's top-level phase and names the inner one."""
    trt = flavour.trt

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.top = None

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None and self.top is None:
                self.top = phase_name
                bar.reset(total=max(int(num_steps), 1))
            bar.set_postfix_str(phase_name[:40])

        def step_complete(self, phase_name, step):
            if phase_name == self.top:
                bar.n = int(step) + 1
                bar.refresh()
            return True  # keep building

        def phase_finish(self, phase_name):
            if phase_name == self.top:
                self.top = None

    return Monitor()


def _stream_writer(flavour: Flavour, f):
    trt = flavour.trt

    class Writer(trt.IStreamWriter):
        def __init__(self):
            trt.IStreamWriter.__init__(self)
            self.sha = hashlib.sha256()
            self.n = 0
            self.error: OSError | None = None  # the builder only sees "0 bytes written"; the cause is kept here

        def write(self, data):
            view = memoryview(data)
            try:
                f.write(view)
            except OSError as exc:
                self.error = self.error or exc
                return 0
            self.sha.update(view)
            self.n += view.nbytes
            return view.nbytes

    return Writer()


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
        config.progress_monitor = _progress_monitor(self.flavour, bar)
        if self.opts.opt_level is not None:
            config.builder_optimization_level = self.opts.opt_level
        flags = {"strongly_typed": True, "opt_level": self.opts.opt_level}
        if self.flavour.is_rtx:
            config.num_compute_capabilities = len(self.cc_values)
            for i, cc in enumerate(self.cc_values):
                config.set_compute_capability(cc, i)
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
        network, _parser = _parse(self.flavour, self.builder, self.logger, self.bundle.onnx_path(name))
        config, flags = self._config(bar, name)
        flags["attention_unfused"] = _allow_unfused_attention(self.flavour, network, net_info["precision"] == "fp32")
        if self.opts.refittable and name == "transformer":
            flags["refittable_weights"] = _mark_refittable(self.flavour, network, config, net_info)
        if self.opts.weight_streaming and name == "transformer":
            # Strongly typed networks only (they all are here): the runtime then chooses how many bytes of
            # weights live on the GPU (`--weight-budget`) and streams the rest from host memory per pass.
            config.set_flag(self.flavour.trt.BuilderFlag.WEIGHT_STREAMING)
            flags["weight_streaming"] = True
        io, profile = _io_and_profile(
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
                    writer = _stream_writer(self.flavour, f)
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
