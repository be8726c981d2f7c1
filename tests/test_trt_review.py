"""The TensorRT path against the real libraries' APIs (issue 20, second review). No TensorRT engine runs here, so
each test drives the real TrtSession (and runtime) through stand-ins whose public attributes are exactly those of
the real classes: TensorRT-RTX's are read from the installed `tensorrt_rtx` with dir(); datacenter TensorRT's are
written below from its bindings. A stand-in cannot offer what the real class lacks (an attribute it does not model
fails loudly when touched), so code that asks datacenter TensorRT for an RTX-only method fails here as it would on
an H100. Only torch.cuda entry points with no CPU meaning (device, current_stream, synchronize) are replaced."""

from __future__ import annotations

import ctypes
import re
import types
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from zimage_trt.common.errors import UserError
from zimage_trt.engine.trt_api import Flavour
from zimage_trt.runtime.lora import Lora, patched_weights
from zimage_trt.runtime.trt_session import TrtSession

rtx = pytest.importorskip("tensorrt_rtx")


def public(cls) -> frozenset:
    return frozenset(a for a in dir(cls) if not a.startswith("_"))


CLASSES = ("Runtime", "ICudaEngine", "IExecutionContext", "Refitter", "IRuntimeConfig", "IRuntimeCache", "Weights")
RTX_API = {name: public(getattr(rtx, name)) for name in CLASSES}
# Datacenter TensorRT: the names bound in python/src/infer/pyCore.cpp (Weights: pyFoundationalTypes.cpp) of
# NVIDIA/TensorRT's release/10.15, 10.16, 11.0 and 11.1 branches, the ones all four have (the code must run on each).
# None has is_stream_capturable, a runtime cache, defer_weights_loading or load_weights/unload_weights.
TRT_API = {
    "Runtime": frozenset("""DLA_core deserialize_cuda_engine engine_host_code_allowed error_recorder
        get_plugin_registry gpu_allocator load_runtime logger max_threads num_DLA_cores tempfile_control_flags
        temporary_directory""".split()),
    "ICudaEngine": frozenset("""create_engine_inspector create_execution_context create_runtime_config
        create_serialization_config device_memory_size_v2 engine_capability error_recorder get_aliased_input_tensor
        get_device_memory_size_for_profile_v2 get_engine_stat get_tensor_bytes_per_component
        get_tensor_components_per_element get_tensor_dtype get_tensor_format get_tensor_format_desc
        get_tensor_location get_tensor_mode get_tensor_name get_tensor_profile_shape get_tensor_profile_values
        get_tensor_shape get_tensor_vectorized_dim get_weight_streaming_automatic_budget hardware_compatibility_level
        is_debug_tensor is_shape_inference_io name num_aux_streams num_io_tensors num_layers num_optimization_profiles
        profiling_verbosity refittable serialize serialize_with_config streamable_weights_size tactic_sources
        weight_streaming_budget_v2 weight_streaming_scratch_memory_size""".split()),
    "IExecutionContext": frozenset("""active_optimization_profile all_binding_shapes_specified debug_sync
        device_memory engine enqueue_emits_profile error_recorder execute_async_v3 execute_v2 get_debug_listener
        get_debug_state get_input_consumed_event get_max_output_size get_output_allocator get_runtime_config
        get_tensor_address get_tensor_shape get_tensor_strides infer_shapes name nvtx_verbosity
        persistent_cache_limit profiler report_to_profiler set_all_tensors_debug_state set_aux_streams
        set_debug_listener set_device_memory set_input_consumed_event set_input_shape set_optimization_profile_async
        set_output_allocator set_tensor_address set_tensor_debug_state temporary_allocator
        unfused_tensors_debug_state update_device_memory_size_for_shapes""".split()),
    "Refitter": frozenset("""error_recorder get_all get_all_weights get_missing get_missing_weights get_named_weights
        get_weights_location get_weights_prototype logger max_threads refit_cuda_engine refit_cuda_engine_async
        set_named_weights set_weights unset_named_weights weights_validation""".split()),
    "IRuntimeConfig": frozenset(["get_execution_context_allocation_strategy",
                                 "set_execution_context_allocation_strategy"]),
    "Weights": frozenset(["dtype", "nbytes", "numpy", "size"]),
}


def stand_in(impl: type, real: frozenset) -> type:
    """`impl` completed to exactly the real class's public attributes: any it does not model fails when touched."""
    extra = public(impl) - real
    assert not extra, f"{impl.__name__} models attributes the real class lacks: {sorted(extra)}"

    def unmodelled(name):
        def fail(self):
            raise AssertionError(f"the session used {impl.__name__}.{name}, which this stand-in does not model")
        return property(fail)

    cls = type(impl.__name__, (impl,), {n: unmodelled(n) for n in real - public(impl)})
    assert public(cls) == real
    return cls


# ---------------------------------------------------------------- the stand-ins' behaviour
DEVICES: list = []  # the CUDA device TensorRT would see as current (torch.cuda.device stand-in)


class _Weights:
    def __init__(self, dtype, ptr: int = 0, count: int = -1):
        self._dtype, self._ptr, self._count = dtype, ptr, count

    dtype = property(lambda self: self._dtype)
    size = property(lambda self: self._count)
    nbytes = property(lambda self: self._count * self._dtype.itemsize)

    def _read(self) -> torch.Tensor:
        """The values at the pointer (host memory in these tests), as the refit would copy them."""
        torch_dtype = {"HALF": torch.float16, "FLOAT": torch.float32, "BF16": torch.bfloat16}[self._dtype.name]
        raw = (ctypes.c_char * self.nbytes).from_address(self._ptr)
        return torch.frombuffer(bytearray(raw), dtype=torch_dtype).clone()


class _Context:
    def __init__(self, engine, how):
        self._engine, self._how, self._shapes = engine, how, {}
        engine._spec.live.add(self)
        engine._spec.events.append(("context", DEVICES[-1] if DEVICES else None, how))

    def set_input_shape(self, name, shape):
        self._shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        return name not in self._engine._spec.refused_addresses

    def set_device_memory(self, ptr, size):
        self._memory = (ptr, size)

    def execute_async_v3(self, stream):
        self._engine._spec.runs.append(dict(self._shapes))
        return True


class _RtxContext(_Context):
    def is_stream_capturable(self, stream):
        return self._engine._spec.capturable


class _Engine:
    def __init__(self, spec, deferred: bool):
        self._spec, self._deferred, self._loaded = spec, deferred, not deferred
        self._budget = None

    refittable = property(lambda self: self._spec.refittable)
    num_io_tensors = property(lambda self: len(self._spec.io))
    streamable_weights_size = property(lambda self: self._spec.streamable)
    device_memory_size_v2 = property(lambda self: self._spec.device_memory)

    def _get_budget(self):
        return self._spec.streamable if self._budget is None else self._budget

    def _set_budget(self, value):  # the real setter drops setWeightStreamingBudgetV2's bool
        if not self._spec.refuse_budget:
            self._budget = value

    weight_streaming_budget_v2 = property(_get_budget, _set_budget)

    def get_tensor_name(self, i):
        return list(self._spec.io)[i]

    def get_tensor_mode(self, name):
        return rtx.TensorIOMode.INPUT if name != "velocity" else rtx.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return getattr(rtx.DataType, self._spec.io[name])

    def get_tensor_location(self, name):
        return self._spec.location

    def create_execution_context(self, how=None):
        return self._spec.api["IExecutionContext"](self, how)


class _RtxEngine(_Engine):
    def create_runtime_config(self):
        return self._spec.api["IRuntimeConfig"](self._spec)

    weights_loaded = property(lambda self: self._loaded)

    def load_weights(self, blob):
        assert self._deferred and not self._loaded and bytes(blob) == self._spec.plan
        self._spec.events.append(("load_weights", DEVICES[-1] if DEVICES else None))
        self._loaded = True
        return True

    def unload_weights(self):
        assert self._deferred and self._loaded
        self._spec.events.append(("unload_weights", DEVICES[-1] if DEVICES else None))
        self._loaded = False
        return True


class _Runtime:
    def __init__(self, spec):
        self._spec = spec

    def deserialize_cuda_engine(self, plan):
        deferred = bool(getattr(self, "defer_weights_loading", False))
        self._spec.events.append(("deserialize", DEVICES[-1] if DEVICES else None, deferred))
        engine_cls = self._spec.api["ICudaEngine"]
        self._spec.engine = engine_cls(self._spec, deferred)
        return self._spec.engine


class _RtxRuntime(_Runtime):
    defer_weights_loading = False


class _RuntimeConfig:
    def __init__(self, spec):
        self._spec = spec

    def set_execution_context_allocation_strategy(self, strategy):
        self._strategy = strategy


class _RtxRuntimeConfig(_RuntimeConfig):
    dynamic_shapes_kernel_specialization_strategy = None
    cuda_graph_strategy = None

    def create_runtime_cache(self):
        return self._spec.api["IRuntimeCache"](self._spec)

    def set_runtime_cache(self, cache):
        return self._spec.cache_accepted


class _RuntimeCache:
    def __init__(self, spec):
        self._spec = spec

    def deserialize(self, data):
        self._spec.events.append(("cache read",))
        return True

    def serialize(self):
        return b"kernels"

    def reset(self):
        pass


class _Refitter:
    """Refits like TensorRT: fused weights must be set together (get_missing_weights), a refit with any missing or
    with a value that fails validation (not finite) returns False after refitting a subset (here: all it was given)."""

    def __init__(self, engine, logger):
        self._engine, self._set = engine, {}
        engine._spec.refitters.append(logger)

    def _groups(self):
        return [g for g in self._engine._spec.fused if g & set(self._set)]

    def get_missing_weights(self):
        return sorted({m for g in self._groups() for m in g} - set(self._set))

    def get_weights_prototype(self, name):
        base = self._engine._spec.base.get(name)
        return _WEIGHTS(rtx.DataType.HALF, 0, -1 if base is None else base.numel())

    def set_named_weights(self, name, weights, location):
        base = self._engine._spec.base.get(name)
        if base is None or weights.dtype != rtx.DataType.HALF or weights.size != base.numel():
            return False
        self._set[name] = weights
        return True

    def refit_cuda_engine_async(self, stream):
        spec = self._engine._spec
        values = {n: w._read() for n, w in self._set.items()}
        spec.refits.append(sum(v.numel() * v.element_size() for v in values.values()))
        for n, v in values.items():
            spec.weights[n] = v.view(spec.base[n].shape)
        return not self.get_missing_weights() and all(bool(v.isfinite().all()) for v in values.values())


class _Logger:
    INFO, ERROR = "INFO", "ERROR"

    def __init__(self, level):
        self.level = level


_WEIGHTS = stand_in(_Weights, RTX_API["Weights"])
assert RTX_API["Weights"] == TRT_API["Weights"]


def _api(rtx_flavour: bool) -> dict:
    real = RTX_API if rtx_flavour else TRT_API
    impl = {"Runtime": _RtxRuntime if rtx_flavour else _Runtime, "ICudaEngine": _RtxEngine if rtx_flavour else _Engine,
            "IExecutionContext": _RtxContext if rtx_flavour else _Context, "Refitter": _Refitter,
            "IRuntimeConfig": _RtxRuntimeConfig if rtx_flavour else _RuntimeConfig, "IRuntimeCache": _RuntimeCache}
    api = {name: stand_in(cls, real[name]) for name, cls in impl.items() if name in real}
    api["Weights"] = _WEIGHTS
    return api


API = {True: _api(True), False: _api(False)}


def test_the_stand_ins_have_exactly_the_real_classes_attributes():
    for name, cls in API[True].items():
        assert public(cls) == RTX_API[name], name
    for name, cls in API[False].items():
        assert public(cls) == TRT_API[name], name
    assert "is_stream_capturable" in RTX_API["IExecutionContext"] - TRT_API["IExecutionContext"]
    assert {"defer_weights_loading"} <= RTX_API["Runtime"] - TRT_API["Runtime"]
    assert {"load_weights", "unload_weights", "weights_loaded"} <= RTX_API["ICudaEngine"] - TRT_API["ICudaEngine"]


# ---------------------------------------------------------------- building a session on the stand-ins
IO = {"latents": "FLOAT", "timestep": "FLOAT", "cap_feats": "FLOAT", "cap_len": "INT64", "velocity": "FLOAT"}


def make_spec(rtx_flavour: bool, **kw):
    spec = types.SimpleNamespace(
        api=API[rtx_flavour], io=dict(IO), location=rtx.TensorLocation.HOST, plan=b"plan", events=[], runs=[],
        live=weakref.WeakSet(), refittable=True, streamable=0, refuse_budget=False, device_memory=4096,
        capturable=True, refused_addresses=set(), cache_accepted=True, base={}, weights={}, fused=[], refits=[],
        refitters=[], engine=None,
    )
    spec.__dict__.update(kw)
    spec.weights = dict(spec.base)
    return spec


def make_flavour(rtx_flavour: bool, spec) -> Flavour:
    names = ("TensorIOMode", "ExecutionContextAllocationStrategy", "DataType", "TensorLocation")
    module = types.SimpleNamespace(**{n: getattr(rtx, n) for n in names}, Logger=_Logger, Weights=spec.api["Weights"],
                                   Refitter=spec.api["Refitter"])
    if rtx_flavour:
        module.DynamicShapesKernelSpecializationStrategy = rtx.DynamicShapesKernelSpecializationStrategy
        module.CudaGraphStrategy = rtx.CudaGraphStrategy
    return Flavour("tensorrt-rtx" if rtx_flavour else "tensorrt", module, "1.7.1" if rtx_flavour else "10.15.1")


def open_session(tmp_path, rtx_flavour=False, spec=None, device="cpu", streaming=False, budget=None, onnx=None,
                 **kw) -> TrtSession:
    spec = spec or make_spec(rtx_flavour)
    engine_file = tmp_path / "transformer.engine"
    engine_file.write_bytes(spec.plan)
    flavour = make_flavour(rtx_flavour, spec)
    runtime = spec.api["Runtime"](spec)
    meta = {"precision": "fp16", "build": {"flags": {"weight_streaming": streaming}}}
    session = TrtSession("transformer", flavour, runtime, engine_file, torch.device(device), meta, recorded=True,
                         fix="zimage-trt build --bundle B --out E", weight_budget=budget, onnx_path=onnx, **kw)
    session.spec = spec
    return session


class _Stream:
    cuda_stream = 0

    def synchronize(self):
        pass


class _OnDevice:
    """torch.cuda.device: makes `device` current for TensorRT (recorded for the stand-ins)."""

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        DEVICES.append(self.device)

    def __exit__(self, *exc):
        DEVICES.pop()


@pytest.fixture(autouse=True)
def cuda_entry_points(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device", _OnDevice)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    DEVICES.clear()


def feeds(h=8, w=8, lpad=32):
    return {"latents": torch.zeros(1, 16, h, w), "timestep": torch.zeros(1), "cap_feats": torch.zeros(1, lpad, 64),
            "cap_len": torch.ones(1, dtype=torch.int64)}, {"velocity": torch.zeros(1, 16, h, w)}


def shapes_of(inputs) -> dict:
    return {n: tuple(t.shape) for n, t in inputs.items()}


# ---------------------------------------------------------------- 1. is_stream_capturable is TensorRT-RTX's only
def test_datacenter_tensorrt_has_no_capturability_query_and_the_capture_is_tried(tmp_path):
    session = open_session(tmp_path, rtx_flavour=False)
    inputs, _ = feeds()
    assert session.stream_capturable(inputs, _Stream()) is True  # today: AttributeError at the first denoise


def test_tensorrt_rtx_is_asked(tmp_path):
    session = open_session(tmp_path, rtx_flavour=True)
    inputs, _ = feeds()
    assert session.stream_capturable(inputs, _Stream()) is True
    session.spec.capturable = False
    assert session.stream_capturable(inputs, _Stream()) is False
    session.close()


class _AskFails:
    """The runtime's transformer, whose capturability question raises (as asking datacenter TensorRT did)."""

    def __init__(self, inner):
        self.inner, self.released = inner, []
        self.name, self.device, self.precision, self.capturable = inner.name, inner.device, inner.precision, True

    def run(self, inputs, outputs):
        self.inner.run(inputs, outputs)

    def stream_capturable(self, inputs, stream):
        raise AttributeError("'tensorrt.IExecutionContext' object has no attribute 'is_stream_capturable'")

    def record_shapes(self, shapes):
        self.released.append(("record", shapes["cap_feats"]))

    def release_shapes(self, shapes):
        self.released.append(("release", shapes["cap_feats"]))


def test_a_failure_to_decide_capturability_is_the_one_warning_and_the_eager_loop(fp32_bundle, caplog):
    from zimage_trt.runtime.bundle import Bundle
    from zimage_trt.runtime.pipeline import ZImageRuntime
    from zimage_trt.sessions import open_sessions

    from .conftest import PROMPT

    bundle = Bundle.open(fp32_bundle)
    cpu = torch.device("cpu")
    plain = ZImageRuntime(bundle, open_sessions("onnxruntime", bundle, cpu), cpu)
    sessions = open_sessions("onnxruntime", bundle, cpu)
    asking = dict(sessions, transformer=_AskFails(sessions["transformer"]))
    rt = ZImageRuntime(bundle, asking, cpu)
    rt.use_cuda_graph = True  # what a GPU run decides; the question is asked before anything is captured
    with caplog.at_level("WARNING", logger="zimage_trt"):
        for seed in (1, 2):
            assert np.array_equal(rt.generate(PROMPT, seed), plain.generate(PROMPT, seed))
    assert rt.cuda_graph_failures == 1 and not rt.use_cuda_graph and not rt.recorder.graphs
    warnings = [r.getMessage() for r in caplog.records if "eagerly" in r.getMessage()]
    assert len(warnings) == 1 and "is_stream_capturable" in warnings[0]
    # the shape recorded for the refused capture gets its context released again
    assert [what for what, _ in asking["transformer"].released] == ["record", "release"]


# ---------------------------------------------------------------- 2. a weight-streamed engine is never captured
@pytest.mark.parametrize("rtx_flavour", [False, True])
def test_an_engine_that_streams_weights_is_not_capturable(tmp_path, rtx_flavour):
    spec = make_spec(rtx_flavour, streamable=10 << 30)
    session = open_session(tmp_path, rtx_flavour, spec, streaming=True, budget=4 << 30)
    assert session.capturable is False and session.device_memory_size == 0
    session.run(*feeds())
    if not rtx_flavour:  # its one context allocates its own memory (no USER_MANAGED strategy)
        assert spec.events[-1] == ("context", torch.device("cpu"), None)
    session.close()


def test_a_budget_that_holds_every_weight_streams_nothing_and_stays_capturable(tmp_path):
    spec = make_spec(False, streamable=10 << 30)
    session = open_session(tmp_path, False, spec, streaming=True, budget=20 << 30)
    assert session.capturable is True and session.device_memory_size == spec.device_memory


# ---------------------------------------------------------------- 3. contexts do not pile up without graphs
@pytest.mark.parametrize("rtx_flavour", [False, True])
def test_twenty_shapes_without_graphs_keep_one_context(tmp_path, rtx_flavour):
    session = open_session(tmp_path, rtx_flavour)
    for i in range(20):
        inputs, outputs = feeds(h=8 + 2 * (i % 5), lpad=32 * (1 + i // 5))
        session.run(inputs, outputs)
    assert len(session.contexts) <= 1 and len(session.spec.live) <= 1
    assert len({tuple(sorted(r.items())) for r in session.spec.runs}) == 20  # each ran at its own shapes
    # recorded shapes get a context each, fixed at them, until the runtime releases them
    recorded = [feeds(h=10)[0], feeds(lpad=64)[0]]
    for inputs in recorded:
        session.record_shapes(shapes_of(inputs))
        session.run(inputs, {"velocity": torch.zeros(inputs["latents"].shape)})
    assert len(session.contexts) == 3
    for inputs in recorded:
        session.release_shapes(shapes_of(inputs))
    assert len(session.contexts) == 1
    session.close()


# ---------------------------------------------------------------- 4. every load under the session's device
def test_engines_and_contexts_are_made_on_the_sessions_device_every_time(tmp_path):
    session = open_session(tmp_path, False, device="cuda:1")
    inputs, outputs = feeds()
    session.run(inputs, outputs)
    session.release()  # --vram sequential
    session.acquire()
    session.run(inputs, outputs)
    made = [e for e in session.spec.events if e[0] in ("deserialize", "context")]
    assert [e[0] for e in made] == ["deserialize", "context", "deserialize", "context"]
    assert all(e[1] == torch.device("cuda:1") for e in made), made


# ---------------------------------------------------------------- 5 and 6. LoRA refit
def _weights_file(tmp_path, base: dict) -> Path:
    import onnx
    from onnx import numpy_helper

    inits = [numpy_helper.from_array(t.numpy(), name) for name, t in base.items()]
    graph = onnx.helper.make_graph([], "weights", [], [], initializer=inits)
    path = tmp_path / "transformer.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    return path


def refit_setup(tmp_path, names, fused=(), out=16, rank=2, rtx_flavour=True):
    gen = torch.Generator().manual_seed(0)
    base = {n: torch.randn(out, 16, generator=gen).half() for n in names}
    spec = make_spec(rtx_flavour, base=base, fused=[set(g) for g in fused])
    session = open_session(tmp_path, rtx_flavour, spec, onnx=_weights_file(tmp_path, base))
    weights = {n: {"initializer": n, "transposed": False, "divisor": 1.0, "shape": [out, 16]} for n in names}

    def lora(targets, scale=0.1, name="l"):
        pairs = {n: (torch.randn(out, rank, generator=gen) * scale, torch.randn(rank, 16, generator=gen))
                 for n in targets}
        return Lora(name, Path(name), pairs, {})

    def expected(stack, n):
        w = base[n].float()
        for l, s in stack:
            if n in l.pairs:
                w = w + (l.pairs[n][0] * s) @ l.pairs[n][1]
        return w.half()

    return session, spec, weights, lora, expected


def test_a_lora_switch_refits_in_bounded_chunks(tmp_path):
    names = [f"layers.{i}.w2" for i in range(16)]
    session, spec, weights, lora, expected = refit_setup(tmp_path, names)
    one = 16 * 16 * 2  # bytes of one weight
    session.refit_chunk_bytes = 4 * one
    stack = [(lora(names), 1.0)]
    session.set_weights(patched_weights(session, weights, stack, torch.device("cpu")))
    assert len(spec.refits) >= 4 and max(spec.refits) <= session.refit_chunk_bytes + one  # today: one of 16
    for n in names:
        assert torch.equal(spec.weights[n], expected(stack, n)), n


def test_weights_fused_with_those_a_lora_changes_get_their_values(tmp_path):
    q, k, v = (f"layers.0.attention.to_{x}" for x in "qkv")
    session, spec, weights, lora, expected = refit_setup(tmp_path, [q, k, v, "layers.0.w1", "layers.0.w3"],
                                                         fused=[(q, k, v), ("layers.0.w1", "layers.0.w3")])
    session.refit_chunk_bytes = 1  # one weight a chunk: the fused partners still go with it
    stack = [(lora([q, k, "layers.0.w1"]), 1.0)]  # to_q and to_k without to_v, w1 without w3
    session.set_weights(patched_weights(session, weights, stack, torch.device("cpu")))  # today: "refit failed"
    for n in spec.base:
        assert torch.equal(spec.weights[n], expected(stack, n)), n  # the partners: the stack's value or the base
    session.set_weights(patched_weights(session, weights, [], torch.device("cpu")))
    for n in spec.base:
        assert torch.equal(spec.weights[n], spec.base[n]), n


def test_a_refused_refit_leaves_the_base_not_a_mix(tmp_path):
    q, k, v = (f"layers.0.attention.to_{x}" for x in "qkv")
    session, spec, weights, lora, expected = refit_setup(tmp_path, [q, k, v, "layers.0.w1", "layers.1.w1"],
                                                         fused=[(q, k, v)])
    cpu = torch.device("cpu")
    session.set_weights(patched_weights(session, weights, [(lora([q, k, v]), 1.0)], cpu))
    overflow = lora(["layers.0.w1", "layers.1.w1"], scale=1e4)  # fp16 overflow: the refit's validation refuses it
    with pytest.raises(RuntimeError, match="every weight is its base again"):
        session.set_weights(patched_weights(session, weights, [(overflow, 4.0)], cpu))
    for n in spec.base:  # today: layers.*.w1 are left at inf, refitted by the refit that returned False
        assert torch.equal(spec.weights[n], spec.base[n]), n
    assert session._changed == set()


@pytest.mark.parametrize("value, why", [
    (torch.zeros(16, 16), "its dtype: the engine holds HALF, the value is FLOAT"),
    (torch.zeros(8, 16).half(), "its shape: the engine holds 256 values, the value has 128"),
])
def test_a_refused_weight_says_whether_name_dtype_or_shape(tmp_path, value, why):
    session, spec, *_ = refit_setup(tmp_path, ["layers.0.w2"])
    with pytest.raises(UserError, match=re.escape(why)) as err:
        session.set_weights([("layers.0.w2", value)])
    assert "'layers.0.w2'" in str(err.value) and "\n" not in str(err.value)


def test_a_weight_the_engine_does_not_have_is_named(tmp_path):
    session, *_ = refit_setup(tmp_path, ["layers.0.w2"])
    with pytest.raises(UserError, match="'onnx::MatMul_7'.*no refittable weight of that name"):
        session.set_weights([("onnx::MatMul_7", torch.zeros(16, 16).half())])


def test_every_refitter_and_the_runtime_share_one_logger(tmp_path):
    names = [f"layers.{i}.w2" for i in range(3)]
    session, spec, weights, lora, _ = refit_setup(tmp_path, names)
    session.refit_chunk_bytes = 1
    session.set_weights(patched_weights(session, weights, [(lora(names), 1.0)], torch.device("cpu")))
    assert all(logger is session.flavour.logger() for logger in spec.refitters)
    assert len(spec.refitters) == 3


# ---------------------------------------------------------------- smaller items of the review
def test_a_buffer_of_another_dtype_or_place_is_one_line_naming_the_tensor(tmp_path):
    session = open_session(tmp_path, spec=make_spec(False, io=dict(IO, timestep="HALF")))
    with pytest.raises(UserError, match="tensor 'timestep' is HALF on the host, the runtime binds torch.float32"):
        session.run(*feeds())
    session = open_session(tmp_path, spec=make_spec(False, location=rtx.TensorLocation.DEVICE))
    with pytest.raises(UserError, match="tensor 'latents' is FLOAT on the GPU, the runtime binds torch.float32 on cpu"):
        session.run(*feeds())


def test_a_refused_tensor_address_is_an_error_naming_it(tmp_path):
    session = open_session(tmp_path, spec=make_spec(False, refused_addresses={"cap_len"}))
    with pytest.raises(RuntimeError, match="address of tensor 'cap_len'"):
        session.run(*feeds())


def test_a_refused_weight_budget_is_one_line(tmp_path):
    spec = make_spec(False, streamable=10 << 30, refuse_budget=True)
    with pytest.raises(UserError, match="refused a budget of 4.29 GB"):
        open_session(tmp_path, False, spec, streaming=True, budget=4 << 30)


def test_a_runtime_cache_the_configuration_refuses_is_one_warning(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="zimage_trt"):
        session = open_session(tmp_path, True, make_spec(True, cache_accepted=False))
    assert session.runtime_cache is None
    assert [r.getMessage() for r in caplog.records] == [
        "transformer: TensorRT-RTX refused its runtime cache; kernels compile again at every start"]


def test_tensorrt_rtx_sequential_unloads_weights_and_keeps_engine_contexts_and_cache(tmp_path):
    (tmp_path / "transformer.engine.runtime_cache").write_bytes(b"kernels")
    session = open_session(tmp_path, True, device="cuda:0", sequential=True)
    spec = session.spec
    inputs, outputs = feeds()
    for _ in range(3):  # three images: weights in for each, out after it
        session.acquire()
        session.run(inputs, outputs)
        session.release()
    kinds = [e[0] for e in spec.events]
    assert kinds.count("deserialize") == 1 and spec.events[0][2] is True  # deferred once, never again
    assert kinds.count("cache read") == 1 and kinds.count("context") == 1
    assert kinds.count("load_weights") == 3 and kinds.count("unload_weights") == 3
    assert all(e[1] == torch.device("cuda:0") for e in spec.events if e[0] in ("load_weights", "unload_weights"))
    session.close()


def test_datacenter_tensorrt_sequential_destroys_and_deserializes_again(tmp_path):
    session = open_session(tmp_path, False, device="cuda:0", sequential=True)
    session.release()
    assert session.engine is None
    session.acquire()
    assert [e[0] for e in session.spec.events].count("deserialize") == 2


def test_the_predicted_vram_counts_a_streamed_engines_own_block_and_says_at_least(tmp_path):
    from zimage_trt.runtime.memory import describe, vram_plan

    spec = make_spec(False, streamable=10 << 30, device_memory=3 << 30)
    streamed = open_session(tmp_path, False, spec, streaming=True, budget=4 << 30)
    streamed.meta["build"]["engine_bytes"] = 12 << 30
    block = torch.empty(1 << 20, dtype=torch.uint8)
    plain = types.SimpleNamespace(meta={"build": {"engine_bytes": 1 << 30}}, weight_budget=None)
    tiny = torch.zeros(1)
    rt = types.SimpleNamespace(
        device=torch.device("cuda"), sessions={"text_encoder": plain, "transformer": streamed, "vae_decoder": plain},
        transformer=types.SimpleNamespace(shared_memory=block), ids=tiny, caption=tiny, cap_len=tiny, timestep=tiny,
        _latents_store=tiny, _velocity_store=tiny, _image_store=tiny)
    plan = vram_plan(rt)
    assert plan["activations"] == (1 << 20) + (3 << 30)  # today: the shared block only
    line = describe(plan, "all")
    assert "engine activations at least 3.2 GB (weight streaming" in line and "all at least" in line


def test_benchmarks_state_the_build_host_need_the_code_uses():
    from zimage_trt.engine.checks import BUILD_MEMORY_BASE, BUILD_MEMORY_FACTOR

    text = (Path(__file__).parent.parent / "BENCHMARKS.md").read_text()
    formula = f"{BUILD_MEMORY_FACTOR:.0f}x + {BUILD_MEMORY_BASE >> 30} GiB"
    assert "3x + 1 GB (38 GB)" not in text
    assert f"`build` estimates\n{formula}" in text or f"`build` estimates {formula}" in text


class _SwitchFails:
    """The runtime's transformer (onnxruntime underneath) whose weight switch fails when told to, part way."""

    def __init__(self, inner):
        self.inner, self.calls, self.fail = inner, [], False
        self.name, self.device, self.precision, self.capturable = inner.name, inner.device, inner.precision, False
        self.weight_key, self.base_weights = inner.weight_key, inner.base_weights

    def run(self, inputs, outputs):
        self.inner.run(inputs, outputs)

    def set_weights(self, values):
        pairs = list(values)
        self.calls.append([k for k, _ in pairs])
        if self.fail and pairs:
            raise RuntimeError("transformer: TensorRT refused the refit")
        self.inner.set_weights(pairs)


def test_a_failed_switch_leaves_the_runtime_on_the_base_weights(fp32_bundle):
    from zimage_trt.runtime.bundle import Bundle
    from zimage_trt.runtime.lora import bundle_weights
    from zimage_trt.runtime.pipeline import ZImageRuntime
    from zimage_trt.sessions import open_sessions

    bundle = Bundle.open(fp32_bundle)
    cpu = torch.device("cpu")
    sessions = open_sessions("onnxruntime", bundle, cpu)
    switching = dict(sessions, transformer=_SwitchFails(sessions["transformer"]))
    rt = ZImageRuntime(bundle, switching, cpu)
    name, entry = next(iter(bundle_weights(bundle).items()))
    out_dim, in_dim = entry["shape"]
    lora = Lora("a", Path("a"), {name: (torch.full((out_dim, 1), 0.01), torch.ones(1, in_dim))}, {})
    rt.set_loras([(lora, 1.0)])
    switching["transformer"].fail = True
    with pytest.raises(RuntimeError, match="refused the refit"):
        rt.set_loras([(lora, 0.5)])
    assert rt.loras == [] and switching["transformer"].calls[-1] == []  # back to the base, not the old stack


def test_a_build_target_the_library_refuses_is_one_line():
    """IBuilderConfig.set_compute_capability returns False for a target it refuses (kNONE here, with the real
    TensorRT-RTX); the build stops naming it instead of building for fewer GPUs than asked."""
    trt = pytest.importorskip("tensorrt_rtx")
    from zimage_trt.engine.build import set_compute_capabilities

    config = trt.Builder(trt.Logger(trt.Logger.ERROR)).create_builder_config()
    set_compute_capabilities(config, [trt.ComputeCapability.SM89, trt.ComputeCapability.SM120])
    assert config.num_compute_capabilities == 2
    with pytest.raises(UserError, match="refused the build target NONE"):
        set_compute_capabilities(config, [trt.ComputeCapability.SM89, trt.ComputeCapability.NONE])
