"""TensorRT / TensorRT-RTX backend: engines from `zimage-trt build`, run on the caller's torch buffers.

Execution contexts use user-managed device memory: the three engines run one after another on one stream, so
every context shares one device-memory block sized for the largest. The transformer, whose loop the runtime
records in CUDA graphs, has one context per input-shape set (image size, caption length), each fixed at its
shapes; the text encoder and VAE have one context each and set shapes as they change. Inputs and outputs are
bound by address (`set_tensor_address`); `execute_async_v3` enqueues on the current torch stream and returns.
TensorRT-RTX compiles kernels for the GPU at first use; its runtime cache is kept beside the engine
(NAME.engine.runtime_cache) so the next process starts warm.

Before anything is deserialized each engine's sidecar is checked against the bundle, the installed library
and the GPU (engine/sidecar.py); a stale or foreign engine is refused with the reason and the fix.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch

from zimage_trt.engine import sidecar
from zimage_trt.engine.trt_api import RTX_UNSUPPORTED_CC, gpu_info, load_flavour
from zimage_trt.common.errors import UserError

from .bundle import NETWORKS, Bundle
from .lora import graph_weight_key, read_initializers
from .runtime_cache import RuntimeCacheFile, forget, save_at_exit


class TrtSession:
    capturable = True

    def __init__(
        self, name: str, flavour, runtime, engine_file: Path, device: torch.device, meta: dict, recorded: bool,
        fix: str, weight_budget: int | None = None, onnx_path: Path | None = None,
    ):
        """recorded: the runtime records this session's runs in CUDA graphs (the transformer). Then TensorRT-RTX
        compiles shape-specialised kernels eagerly at the first run of a new shape, before the runtime records
        it; otherwise they are compiled in the background and swapped in later.
        meta: the engine's sidecar; fix: the build command for this bundle and engine folder.
        weight_budget: bytes of weights kept on the GPU for an engine built with --weight-streaming (the rest
        streams from host memory each run); None: all of them.
        onnx_path: the bundle's graph of this network, whose initializers are the base a LoRA is added to."""
        self.name, self.device, self.flavour, self.precision = name, device, flavour, meta["precision"]
        self.meta, self.fix = meta, fix
        self.image_sizes = sidecar.image_sizes(meta)  # what the profile covers (None: no image input)
        self.runtime, self.engine_file, self.recorded = runtime, Path(engine_file), recorded
        self.weight_budget = weight_budget
        # A weight-streamed engine allocates its own memory at run time (TensorRT-RTX refuses streaming together
        # with user-managed memory), so it keeps out of the shared block; on RTX it cannot then be captured.
        self.streaming = bool(meta["build"]["flags"].get("weight_streaming"))
        if self.streaming and flavour.is_rtx:
            self.capturable = False
        self.engine = self.runtime_cache = self.runtime_config = None
        self._load()
        trt = flavour.trt
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        # A CUDA graph that recorded execute_async_v3 must not be replayed after its context changed input
        # shapes (NVIDIA/TensorRT#3798). A session whose runs are recorded (the transformer) therefore keeps one
        # context per input-shape set, each fixed at its shapes for life, all on the one shared memory block;
        # the runtime releases a shape's context when it evicts the last graph that uses it. The others (text
        # encoder, VAE: never recorded) keep one context and set shapes as they change.
        self.per_shape = recorded
        self.contexts: dict[tuple, object] = {}
        self.shapes: dict[tuple | None, tuple] = {}  # context key -> the shapes set on it
        self.block = None
        self.eager = recorded and self.runtime_cache is not None
        self.onnx_path = onnx_path
        self._base: dict[str, torch.Tensor] = {}  # refitted weights' base values, in host memory
        self._changed: set[str] = set()  # the weights a refit changed from their base
        self.weights_in_place = False  # a refit may move weights: the runtime records its loops again

    # LoRA (runtime/lora.py): weights are refitted (`build --refittable`). Written to TensorRT's documented
    # Refitter API (set_named_weights with device memory, refit_cuda_engine_async); UNVERIFIED: no TensorRT
    # engine runs in the workplace where this was written (see README, "What was verified where").
    weight_key = staticmethod(graph_weight_key)

    def base_weights(self, keys) -> dict:
        """The bundle's values of these weights, kept in host memory (the engine holds the device copy)."""
        missing = [k for k in keys if k not in self._base]
        if missing:
            self._base.update(read_initializers(self.onnx_path, missing))
        return {k: self._base[k] for k in keys}

    def set_weights(self, values) -> None:
        """Refit these weights to these values ((key, value) pairs) and every weight refitted before back to its
        base. The new values stay on the device until the one refit has run (peak: the changed weights, twice)."""
        trt = self.flavour.trt
        if not self.engine.refittable:
            raise UserError(f"the {self.name} engine was not built refittable, so LoRAs cannot be applied at run time; "
                            f"rebuild it: {self.fix} --refittable")
        values = dict(values)
        restore = {k: v for k, v in self._base.items() if k in self._changed and k not in values}
        refitter = trt.Refitter(self.engine, self.flavour.logger())
        kinds = {torch.float16: trt.DataType.HALF, torch.bfloat16: trt.DataType.BF16, torch.float32: trt.DataType.FLOAT}
        keep = []  # the device tensors must live until the refit has run
        for key, value in {**restore, **values}.items():
            value = value.to(self.device).contiguous()
            keep.append(value)
            weights = trt.Weights(kinds[value.dtype], value.data_ptr(), value.numel())
            if not refitter.set_named_weights(key, weights, trt.TensorLocation.DEVICE):
                raise UserError(f"{self.name}: the engine has no refittable weights named {key!r}; rebuild it: "
                                f"{self.fix} --refittable")
        stream = torch.cuda.current_stream(self.device)
        if not refitter.refit_cuda_engine_async(stream.cuda_stream):
            raise RuntimeError(f"{self.name}: refit failed (missing: {refitter.get_missing_weights()})")
        stream.synchronize()
        self._changed = set(values)

    def _load(self) -> None:
        """Deserialize the engine (and, for TensorRT-RTX, its runtime configuration and kernel cache)."""
        trt, flavour, engine_file = self.flavour.trt, self.flavour, self.engine_file
        # From a read-only mmap of the file, not a bytes copy: the builder's plan is 12 GB for the transformer,
        # and deserialization copies what it keeps, so the mapping can go once it returns.
        with open(engine_file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as plan:
            self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise UserError(f"{engine_file} could not be deserialized by {flavour.name} {flavour.version}; rebuild it")
        if self.weight_budget is not None:
            self._set_weight_budget(self.weight_budget)
        if flavour.is_rtx:
            config = self.engine.create_runtime_config()
            if not self.streaming:
                config.set_execution_context_allocation_strategy(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            strategy = trt.DynamicShapesKernelSpecializationStrategy
            config.dynamic_shapes_kernel_specialization_strategy = strategy.EAGER if self.recorded else strategy.LAZY
            config.cuda_graph_strategy = trt.CudaGraphStrategy.DISABLED  # the runtime records the whole loop
            cache = config.create_runtime_cache()
            self.runtime_cache = RuntimeCacheFile(engine_file.with_name(engine_file.name + ".runtime_cache"), cache)
            self.runtime_cache.load()
            config.set_runtime_cache(cache)
            self.runtime_config = config
            save_at_exit(self.runtime_cache)

    def _set_weight_budget(self, budget: int) -> None:
        """Weight streaming (TensorRT 10 / RTX): keep `budget` bytes of weights on the GPU, stream the rest.
        UNVERIFIED here (no engine runs in this workplace); written to the documented `weight_streaming_budget_v2`."""
        streamable = int(self.engine.streamable_weights_size)
        if streamable <= 0:
            raise UserError(f"--weight-budget: the {self.name} engine was not built with weight streaming; rebuild "
                            f"it: {self.fix} --weight-streaming")
        self.engine.weight_streaming_budget_v2 = min(int(budget), streamable)

    # --vram sequential: the engine leaves the GPU between uses; its plan stays on disk (read through mmap)
    def release(self) -> None:
        """Free the engine's device memory (contexts, engine, runtime configuration; the RTX runtime cache is saved
        first); `acquire` brings it back. The shared memory block stays: it serves whichever engine runs."""
        if self.engine is None:
            return
        if self.runtime_cache is not None:
            forget(self.runtime_cache)
            self.runtime_cache.save()
        self.contexts.clear()  # contexts first: they use the engine and the runtime config
        self.shapes.clear()
        self.runtime_config = self.runtime_cache = None
        self.engine = None

    def acquire(self) -> None:
        if self.engine is None:
            self._load()

    def _new_context(self):
        trt = self.flavour.trt
        if self.runtime_config is not None:
            ctx = self.engine.create_execution_context(self.runtime_config)
        elif self.streaming:
            ctx = self.engine.create_execution_context()  # TensorRT allocates what the streamed weights need
        else:
            ctx = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.block is not None and not self.streaming:
            ctx.set_device_memory(self.block.data_ptr(), self.block.numel())
        return ctx

    def _context_for(self, inputs) -> tuple[object, bool]:
        """(the context for these input shapes, whether its shapes were just set)."""
        shapes = tuple(tuple(inputs[n].shape) for n in self.input_names)
        key = shapes if self.per_shape else None
        ctx = self.contexts.get(key)
        if ctx is None:
            ctx = self.contexts[key] = self._new_context()
        if self.shapes.get(key) == shapes:
            return ctx, False
        for n, shape in zip(self.input_names, shapes):
            if not ctx.set_input_shape(n, shape):
                raise UserError(f"{self.name}: input {n} of shape {list(shape)} is outside the engine's profile")
        self.shapes[key] = shapes
        return ctx, True

    def release_shapes(self, inputs_shapes: dict[str, tuple]) -> None:
        """Drop the context of these input shapes (the runtime evicted the last graph recorded with it)."""
        key = tuple(tuple(inputs_shapes[n]) for n in self.input_names)
        self.contexts.pop(key, None)
        self.shapes.pop(key, None)

    def check_size(self, width: int, height: int) -> None:
        sidecar.check_size(self.meta, self.name, width, height, self.fix)

    def rebuild_hint(self) -> str:
        return sidecar.size_rebuild_command(self.meta, self.fix)

    @property
    def device_memory_size(self) -> int:
        return 0 if self.streaming else int(self.engine.device_memory_size_v2)

    def bind_device_memory(self, block: torch.Tensor) -> None:
        """Every context, now and later, runs on `block` (256-byte aligned, >= device_memory_size)."""
        self.block = block
        for ctx in self.contexts.values():
            if not self.streaming:
                ctx.set_device_memory(block.data_ptr(), block.numel())

    def run(self, inputs, outputs) -> None:
        ctx, new_shape = self._context_for(inputs)
        for n in self.input_names:
            ctx.set_tensor_address(n, inputs[n].data_ptr())
        for n in self.output_names:
            ctx.set_tensor_address(n, outputs[n].data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"{self.name}: execute_async_v3 failed (see the TensorRT log)")
        if new_shape and self.eager:
            self.save_runtime_cache()  # eager specialisation has just compiled this shape's kernels

    def stream_capturable(self, inputs, stream: torch.cuda.Stream) -> bool:
        """Whether the context for these input shapes may be recorded on `stream` (TensorRT 10 and RTX ask that
        this be checked before capture; an engine without user-managed memory, for one, is not)."""
        ctx, _ = self._context_for(inputs)
        return bool(ctx.is_stream_capturable(stream.cuda_stream))

    def save_runtime_cache(self) -> None:
        """Write TensorRT-RTX's compiled kernels beside the engine, so the next process starts warm."""
        if self.runtime_cache is not None:
            self.runtime_cache.save()

    def close(self) -> None:
        """Free the contexts, the engine and the runtime configuration (saving the RTX runtime cache first);
        the shared device-memory block goes with the last session that holds it."""
        self.release()
        self.block = self.shared_memory = None


def open_engine_sessions(
    bundle: Bundle, engines_dir, device: torch.device, weight_budget: int | None = None, sequential: bool = False
) -> dict:
    engines_dir = Path(engines_dir)
    if not engines_dir.is_dir():
        raise UserError(
            f"engine folder {engines_dir} does not exist; build it: zimage-trt build --bundle {bundle.root} --out {engines_dir}"
        )
    files = {n: sidecar.engine_path(engines_dir, n) for n in NETWORKS}
    metas = {n: sidecar.read_sidecar(f) for n, f in files.items()}
    backends = {m["backend"] for m in metas.values() if m}
    if len(backends) > 1:
        raise UserError(f"{engines_dir} mixes engines of {' and '.join(sorted(backends))}; rebuild them with one backend")
    backend = backends.pop() if backends else "tensorrt"
    fix = sidecar.rebuild_command(bundle.root, engines_dir, backend)
    try:
        flavour = load_flavour(backend)
        installed = {"backend": backend, "version": flavour.version}
    except UserError as exc:  # reported after the checks that need no library (a stale engine is news too)
        flavour, installed = None, {"backend": backend, "version": None, "error": str(exc)}
    if device.type != "cuda":
        raise UserError("TensorRT engines run on a CUDA GPU; use --device cuda (or another backend on the CPU)")
    gpu = gpu_info(device.index or 0)
    # Every engine's match with the bundle and library first, then the GPU: a stale engine is news on any machine.
    for n in NETWORKS:
        sidecar.check_matches(metas[n], files[n], n, bundle.network(n), installed, fix)
    for n in NETWORKS:
        sidecar.check_gpu(metas[n], n, gpu, fix)
    if flavour.is_rtx and gpu["cc"] in RTX_UNSUPPORTED_CC:
        raise UserError(f"TensorRT-RTX does not run on {gpu['name']}; build with --backend tensorrt on this GPU")
    runtime = flavour.trt.Runtime(flavour.logger())
    # The transformer's loop is recorded per caption length (at most 16): its kernels are specialised up front.
    # The text encoder sees a new length with nearly every prompt: it runs generic kernels meanwhile.
    sessions, sizes = {}, {}
    with torch.cuda.device(device):  # TensorRT places engines on the current CUDA device
        for n in NETWORKS:  # the text encoder first: in sequential mode it leaves before the others come
            sessions[n] = TrtSession(n, flavour, runtime, files[n], device, metas[n], recorded=(n == "transformer"),
                                     fix=fix, weight_budget=weight_budget if n == "transformer" else None,
                                     onnx_path=bundle.onnx_path(n))
            sizes[n] = sessions[n].device_memory_size
            if sequential and n == "text_encoder":
                sessions[n].release()
    # The engines run one after another on one stream: one block, sized for the largest, serves them all.
    block = torch.empty(max(max(sizes.values()), 1), dtype=torch.uint8, device=device)
    for s in sessions.values():
        s.bind_device_memory(block)
        s.shared_memory = block  # keeps the block alive with the sessions
    return sessions
