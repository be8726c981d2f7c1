"""TensorRT / TensorRT-RTX backend: engines from `zimage-trt build`, run on the caller's torch buffers.

Execution contexts use user-managed device memory: the three engines run one after another on one stream, so
every context shares one device-memory block sized for the largest. Each session has one context that sets shapes
as they change; the transformer adds a context per input-shape set (image size, caption length) that the runtime
records in a CUDA graph, fixed at its shapes and released with the last graph that uses it, so without graphs
(weight streaming, --no-cuda-graph, --vram sequential, a refused capture) there is one context however many shapes
come. Inputs and outputs are bound by address (`set_tensor_address`, dtype and location checked at a tensor's
first bind); `execute_async_v3` enqueues on the current torch stream and returns. Engines are loaded, and contexts
made, under the session's CUDA device (--device cuda:N). TensorRT-RTX compiles kernels for the GPU at first use;
its runtime cache is kept beside the engine (NAME.engine.runtime_cache) so the next process starts warm.

Flavours differ (engine/trt_api.py): only TensorRT-RTX can say whether a stream is capturable, keeps a runtime
cache, and defers weight loading (--vram sequential then unloads and reloads weights only; TensorRT destroys and
re-deserializes the engine). An engine that streams weights is never captured (NvInferRuntime.h: its enqueueV3 is
synchronous). UNVERIFIED: no TensorRT engine runs in the workplace where this was written (README).

Before anything is deserialized each engine's sidecar is checked against the bundle, the installed library
and the GPU (engine/sidecar.py); a stale or foreign engine is refused with the reason and the fix.
"""

from __future__ import annotations

import logging
import mmap
from pathlib import Path

import torch

from zimage_trt.engine import sidecar
from zimage_trt.engine.trt_api import RTX_UNSUPPORTED_CC, gpu_info, load_flavour
from zimage_trt.common.errors import UserError

from .bundle import NETWORKS, Bundle
from .lora import graph_weight_key, read_initializers
from .runtime_cache import RuntimeCacheFile, forget, save_at_exit
from .trt_refit import REFIT_CHUNK_BYTES, refit_weights

log = logging.getLogger("zimage_trt")
# TensorRT DataType names -> the torch dtype of a buffer bound to such a tensor
_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                 "INT32": torch.int32, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


class TrtSession:
    capturable = True
    refit_chunk_bytes = REFIT_CHUNK_BYTES

    def __init__(
        self, name: str, flavour, runtime, engine_file: Path, device: torch.device, meta: dict, recorded: bool,
        fix: str, weight_budget: int | None = None, onnx_path: Path | None = None, sequential: bool = False,
    ):
        """recorded: the runtime records this session's runs in CUDA graphs (the transformer). Then TensorRT-RTX
        compiles shape-specialised kernels eagerly at the first run of a new shape, before the runtime records
        it; otherwise they are compiled in the background and swapped in later.
        meta: the engine's sidecar; fix: the build command for this bundle and engine folder.
        weight_budget: bytes of weights kept on the GPU for an engine built with --weight-streaming (the rest
        streams from host memory each run); None: all of them.
        onnx_path: the bundle's graph of this network, whose initializers are the base a LoRA is added to.
        sequential: --vram sequential, the engine leaves the GPU between uses (`release`, `acquire`)."""
        self.name, self.device, self.flavour, self.precision = name, device, flavour, meta["precision"]
        self.meta, self.fix = meta, fix
        self.image_sizes = sidecar.image_sizes(meta)  # what the profile covers (None: no image input)
        self.runtime, self.engine_file, self.recorded = runtime, Path(engine_file), recorded
        self.weight_budget = weight_budget
        self.streaming = bool(meta["build"]["flags"].get("weight_streaming"))
        # TensorRT-RTX 1.7 keeps a released engine deserialized, with its contexts, and unloads its weights only.
        self.deferred = sequential and hasattr(runtime, "defer_weights_loading")
        self.engine = self.runtime_cache = self.runtime_config = None
        self._load()
        trt = flavour.trt
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._io = {n: (self.engine.get_tensor_dtype(n), self.engine.get_tensor_location(n)) for n in names}
        self._bound: set[tuple] = set()  # (tensor, dtype, device type) already checked against the engine
        # A CUDA graph that recorded execute_async_v3 must not be replayed after its context changed input
        # shapes (NVIDIA/TensorRT#3798). The shapes the runtime records (`record_shapes`) therefore get a context
        # each, fixed at them, on the one shared memory block, until the runtime evicts the last graph that uses
        # them (`release_shapes`). Every other run uses the one context keyed None, which sets shapes as they change:
        # contexts do not pile up per shape when nothing is recorded.
        self.recording: set[tuple] = set()
        self.contexts: dict[tuple | None, object] = {}
        self.shapes: dict[tuple | None, tuple] = {}  # context key -> the shapes set on it
        self.block = None
        self.eager = recorded and self.runtime_cache is not None
        self.onnx_path = onnx_path
        self._base: dict[str, torch.Tensor] = {}  # refitted weights' base values, in host memory
        self._changed: set[str] = set()  # the weights a refit changed from their base
        self.weights_in_place = False  # a refit may move weights: the runtime records its loops again

    # LoRA (runtime/lora.py): weights are refitted (`build --refittable`) in chunks, runtime/trt_refit.py.
    weight_key = staticmethod(graph_weight_key)

    def base_weights(self, keys) -> dict:
        """The bundle's values of these weights, kept in host memory (the engine holds the device copy)."""
        missing = [k for k in keys if k not in self._base]
        if missing:
            self._base.update(read_initializers(self.onnx_path, missing))
        return {k: self._base[k] for k in keys}

    def set_weights(self, values) -> None:
        """Refit these weights to these values (lora.PatchedWeights, or (key, value) pairs) and every weight
        refitted before back to its base: about refit_chunk_bytes of new values on the GPU at a time, fused
        partners completed, and on failure every weight back to its base (runtime/trt_refit.py)."""
        with self._on_device():
            refit_weights(self, values)

    def _on_device(self):
        """TensorRT places engines, contexts and their memory on the current CUDA device: make it the session's."""
        return torch.cuda.device(self.device)

    def _load(self) -> None:
        """Deserialize the engine (and, for TensorRT-RTX, its runtime configuration and kernel cache)."""
        flavour, engine_file = self.flavour, self.engine_file
        with self._on_device():
            if self.deferred:  # the weights come to the GPU in `acquire`, when the runtime needs the engine
                self.runtime.defer_weights_loading = True
            try:
                # From a read-only mmap of the file, not a bytes copy: the builder's plan is 12 GB for the
                # transformer, and deserialization copies what it keeps, so the mapping can go once it returns.
                with open(engine_file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as plan:
                    self.engine = self.runtime.deserialize_cuda_engine(plan)
            finally:
                if self.deferred:
                    self.runtime.defer_weights_loading = False  # the runtime is shared with the other engines
            if self.engine is None:
                raise UserError(f"{engine_file} could not be deserialized by {flavour.name} {flavour.version}; "
                                "rebuild it")
            self._set_weight_budget(self.weight_budget)
            if flavour.is_rtx:
                self._rtx_runtime_config()

    def _rtx_runtime_config(self) -> None:
        """TensorRT-RTX's runtime configuration (kept alive with the contexts) and its kernel cache, read from and
        saved beside the engine. A cache the configuration refuses is one warning: it only saves compile time."""
        trt = self.flavour.trt
        config = self.engine.create_runtime_config()
        if not self.own_memory:
            config.set_execution_context_allocation_strategy(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        strategy = trt.DynamicShapesKernelSpecializationStrategy
        config.dynamic_shapes_kernel_specialization_strategy = strategy.EAGER if self.recorded else strategy.LAZY
        config.cuda_graph_strategy = trt.CudaGraphStrategy.DISABLED  # the runtime records the whole loop
        self.runtime_config = config
        cache = config.create_runtime_cache()
        cache_file = RuntimeCacheFile(self.engine_file.with_name(self.engine_file.name + ".runtime_cache"), cache)
        cache_file.load()
        if not config.set_runtime_cache(cache):
            log.warning("%s: TensorRT-RTX refused its runtime cache; kernels compile again at every start",
                        self.name)
            return
        self.runtime_cache = cache_file
        save_at_exit(cache_file)

    def _load_weights(self) -> None:
        """Deferred loading (TensorRT-RTX): the weights to the GPU, from the same plan the engine came from."""
        with open(self.engine_file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as plan:
            if not self.engine.load_weights(plan):
                raise UserError(f"{self.engine_file}: TensorRT-RTX could not load the engine's weights; rebuild it")

    def _set_weight_budget(self, budget: int | None) -> None:
        """Weight streaming (TensorRT 10 / RTX): keep `budget` bytes of weights on the GPU, stream the rest. Decides
        who allocates the contexts' memory and whether the runs can be recorded. UNVERIFIED here (no engine runs in
        this workplace); written to `weight_streaming_budget_v2` as NvInferRuntime.h documents it."""
        self.streams_weights = False
        if budget is not None:
            streamable = int(self.engine.streamable_weights_size)
            if streamable <= 0:
                raise UserError(f"--weight-budget: the {self.name} engine was not built with weight streaming; "
                                f"rebuild it: {self.fix} --weight-streaming")
            want = min(int(budget), streamable)
            # The property's setter drops setWeightStreamingBudgetV2's bool: read the budget back instead.
            self.engine.weight_streaming_budget_v2 = want
            if int(self.engine.weight_streaming_budget_v2) != want:
                raise UserError(f"--weight-budget: the {self.name} engine refused a budget of {want / 1e9:.2f} GB "
                                f"(streamable: {streamable / 1e9:.2f} GB; see the TensorRT log)")
            self.streams_weights = want < streamable
        # Contexts allocate their own memory, outside the shared block, when TensorRT-RTX built the engine for
        # streaming (it refuses user-managed memory with it) or weights stream now (TensorRT sizes the scratch).
        self.own_memory = self.streams_weights or (self.streaming and self.flavour.is_rtx)
        # Never recorded then: an engine that streams weights runs enqueueV3 synchronously and "the graph will not
        # be capturable" (NvInferRuntime.h), and TensorRT-RTX captures only engines with user-managed memory.
        self.capturable = not self.own_memory

    # --vram sequential: the engine leaves the GPU between uses; its plan stays on disk (read through mmap)
    def release(self) -> None:
        """Free the engine's device memory; `acquire` brings it back. TensorRT-RTX (deferred loading): the weights
        are unloaded and the engine, its contexts, runtime configuration and kernel cache stay. TensorRT: contexts,
        engine and runtime configuration go. The shared memory block stays: it serves whichever engine runs.
        Either way the engine has its base weights when it comes back: a LoRA is refitted again."""
        if self.engine is None or (self.deferred and not self.engine.weights_loaded):
            return
        with self._on_device():
            torch.cuda.synchronize(self.device)  # no run of this engine may still be in flight
            self._changed = set()
            if self.deferred:
                if not self.engine.unload_weights():
                    raise RuntimeError(f"{self.name}: TensorRT-RTX could not unload the engine's weights")
                return
            self._destroy()

    def _destroy(self) -> None:
        if self.runtime_cache is not None:
            forget(self.runtime_cache)
            self.runtime_cache.save()
        self.contexts.clear()  # contexts first: they use the engine and the runtime config
        self.shapes.clear()
        self.runtime_config = self.runtime_cache = None
        self.engine = None

    def acquire(self) -> None:
        """Bring the engine back to the GPU (a deferred engine's weights come here the first time too)."""
        if self.engine is None:
            self._load()
        if self.deferred and not self.engine.weights_loaded:
            with self._on_device():
                self._load_weights()

    def _new_context(self):
        trt = self.flavour.trt
        with self._on_device():
            if self.runtime_config is not None:
                ctx = self.engine.create_execution_context(self.runtime_config)
            elif self.own_memory:
                ctx = self.engine.create_execution_context()  # TensorRT allocates what the streamed weights need
            else:
                ctx = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise RuntimeError(f"{self.name}: TensorRT could not create an execution context (see its log)")
        if self.block is not None and not self.own_memory:
            ctx.set_device_memory(self.block.data_ptr(), self.block.numel())
        return ctx

    def _shape_key(self, shapes) -> tuple:
        return tuple(tuple(shapes[n]) for n in self.input_names)

    def _context_for(self, inputs) -> tuple[object, bool]:
        """(the context for these input shapes, whether its shapes were just set)."""
        shapes = tuple(tuple(inputs[n].shape) for n in self.input_names)
        key = shapes if shapes in self.recording else None
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

    def record_shapes(self, inputs_shapes: dict[str, tuple]) -> None:
        """The runtime is about to record runs of these input shapes: they get a context of their own, fixed at
        them, until `release_shapes`."""
        self.recording.add(self._shape_key(inputs_shapes))

    def release_shapes(self, inputs_shapes: dict[str, tuple]) -> None:
        """Drop the context of these input shapes (the runtime evicted the last graph recorded with it, or gave
        up recording it)."""
        key = self._shape_key(inputs_shapes)
        self.recording.discard(key)
        self.contexts.pop(key, None)
        self.shapes.pop(key, None)

    def check_size(self, width: int, height: int) -> None:
        sidecar.check_size(self.meta, self.name, width, height, self.fix)

    def rebuild_hint(self) -> str:
        return sidecar.size_rebuild_command(self.meta, self.fix)

    @property
    def device_memory_size(self) -> int:
        """Bytes this engine needs of the shared block (0: its contexts allocate their own)."""
        return 0 if self.own_memory else int(self.engine.device_memory_size_v2)

    @property
    def own_device_memory(self) -> int:
        """Bytes the contexts of an engine outside the shared block allocate themselves: one context (it is never
        recorded), of device_memory_size_v2, which NvInferRuntime.h says follows the weight budget and covers the
        streaming scratch. UNVERIFIED: TensorRT may allocate more for streaming; the prediction says "at least"."""
        return int(self.engine.device_memory_size_v2) if self.own_memory and self.engine is not None else 0

    def bind_device_memory(self, block: torch.Tensor) -> None:
        """Every context, now and later, runs on `block` (256-byte aligned, >= device_memory_size)."""
        self.block = block
        for ctx in self.contexts.values():
            if not self.own_memory:
                ctx.set_device_memory(block.data_ptr(), block.numel())

    def run(self, inputs, outputs) -> None:
        ctx, new_shape = self._context_for(inputs)
        for names, tensors in ((self.input_names, inputs), (self.output_names, outputs)):
            for n in names:
                self._check_buffer(n, tensors[n])
                if not ctx.set_tensor_address(n, tensors[n].data_ptr()):
                    raise RuntimeError(f"{self.name}: TensorRT refused the address of tensor {n!r} (see its log)")
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"{self.name}: execute_async_v3 failed (see the TensorRT log)")
        if new_shape and self.eager:
            self.save_runtime_cache()  # eager specialisation has just compiled this shape's kernels

    def _check_buffer(self, name: str, tensor: torch.Tensor) -> None:
        """The buffer bound to tensor `name` has the engine's dtype and location (checked at its first bind): a
        mismatch would make TensorRT read or write garbage."""
        seen = (name, tensor.dtype, tensor.device.type)
        if seen in self._bound:
            return
        dtype, location = self._io[name]
        on_device = location == self.flavour.trt.TensorLocation.DEVICE
        if _TORCH_DTYPES.get(dtype.name) != tensor.dtype or on_device != tensor.is_cuda:
            where = "GPU" if on_device else "host"
            raise UserError(f"{self.name}: the engine's tensor {name!r} is {dtype.name} on the {where}, the runtime "
                            f"binds {tensor.dtype} on {tensor.device}; rebuild the engine from this bundle: {self.fix}")
        self._bound.add(seen)

    def stream_capturable(self, inputs, stream: torch.cuda.Stream) -> bool:
        """Whether the context for these input shapes may be recorded on `stream`. Only TensorRT-RTX (since 1.2)
        can say (`is_stream_capturable`); datacenter TensorRT 10.15-11.1 has no such query, so there the capture is
        tried and a failure falls back to the eager loop."""
        ctx, _ = self._context_for(inputs)
        ask = getattr(ctx, "is_stream_capturable", None)
        return True if ask is None else bool(ask(stream.cuda_stream))

    def save_runtime_cache(self) -> None:
        """Write TensorRT-RTX's compiled kernels beside the engine, so the next process starts warm."""
        if self.runtime_cache is not None:
            self.runtime_cache.save()

    def close(self) -> None:
        """Free the contexts, the engine and the runtime configuration (saving the RTX runtime cache first);
        the shared device-memory block goes with the last session that holds it."""
        if self.engine is not None:
            with self._on_device():
                torch.cuda.synchronize(self.device)
                self._destroy()
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
                                     onnx_path=bundle.onnx_path(n), sequential=sequential)
            sizes[n] = sessions[n].device_memory_size
            if sequential and n == "text_encoder":
                sessions[n].release()
    # The engines run one after another on one stream: one block, sized for the largest, serves them all.
    block = torch.empty(max(max(sizes.values()), 1), dtype=torch.uint8, device=device)
    for s in sessions.values():
        s.bind_device_memory(block)
        s.shared_memory = block  # keeps the block alive with the sessions
    return sessions
