"""onnxruntime on a CUDA GPU: what its CUDA provider is given, its CUDA-graph slots, and the one-line refusals.

Stream. The CUDA provider enqueues on a stream it is given (`user_compute_stream`): a torch stream, so its kernels
are ordered with the runtime's torch work by the GPU (stream order, events), and each run passes
`disable_synchronize_execution_providers`, so onnxruntime does not wait for the GPU at the end of a run either.

CUDA graphs. onnxruntime records a session's run itself (`enable_cuda_graph`, one graph per `gpu_graph_id`) where
its rules allow: no control-flow node, every compute node on the CUDA provider (shape arithmetic on the CPU is
allowed) and no copy between host and GPU inside the graph; this project adds that no graph input may be read on
the host (a replay would not see its next value). A replay re-reads the addresses and reuses the shapes it
recorded, so the session keeps one id per I/O layout (GraphSlots). onnxruntime runs a new id eagerly (its
warm-up) before it records it, and in the sources read for this project its replay may wait for the GPU before
returning (CUDAGraphManager::Replay's sync flag is on by default): tests/test_ort_gpu.py measures that on a GPU.
"""

from __future__ import annotations

import re
from collections import OrderedDict

from zimage_trt.common.errors import UserError

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
SKIP_GRAPH = -1  # gpu_graph_id that makes onnxruntime run eagerly, neither recording nor replaying
MAX_GRAPHS = 16  # recorded layouts per session, as many as the runtime's own graph cache holds
INSTALL_GPU = ("pip uninstall -y onnxruntime && pip install onnxruntime-gpu (a CUDA 13 build; for a machine without "
               "network, python scripts/carry_ort_gpu.py prepares it)")
# the export flag that sets each network's precision, for the refusals that say how to re-export it
REEXPORT = {"text_encoder": "--text-encoder-precision", "transformer": "--dit-precision",
            "vae_decoder": "--vae-precision"}
_MISSING_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'")


def gpu_build_missing(ort) -> str | None:
    """The one-line refusal of --device cuda with a CPU-only onnxruntime, or None where it has the CUDA provider."""
    providers = ort.get_available_providers()
    if CUDA_EP in providers:
        return None
    return (f"onnxruntime {ort.__version__} here is a CPU-only build (providers: {', '.join(providers)}); for "
            f"--device cuda install the GPU build: {INSTALL_GPU}; or run with --device cpu")


def cuda_provider_options(device_index: int, stream_ptr: int, cuda_graph: bool) -> dict[str, str]:
    """The CUDA provider's options, as onnxruntime takes them (strings)."""
    return {
        "device_id": str(device_index),
        "has_user_compute_stream": "1",
        "user_compute_stream": str(int(stream_ptr)),
        "enable_cuda_graph": "1" if cuda_graph else "0",
        # TF32 would put an fp32 graph ~1e-3 away from its fp32 reference; the fp32 parity bound is 1e-4
        "use_tf32": "0",
        # the arena grows by what a run asks for, not to the next power of two: the peak GPU memory is measured
        "arena_extend_strategy": "kSameAsRequested",
    }


def providers_for(device, stream_ptr: int | None = None, cuda_graph: bool = False) -> list:
    """onnxruntime's provider list for a torch device: CUDA on the given stream (CPU for what it cannot take)."""
    if device.type != "cuda":
        return [CPU_EP]
    return [(CUDA_EP, cuda_provider_options(device.index or 0, stream_ptr, cuda_graph)), CPU_EP]


def session_options(ort, cuda: bool, threads: int = 0, overrides=None, external_folder=None):
    """SessionOptions: node placement recorded (for the report), weights outside the arena on a GPU, the
    LoRA-replaced initializers, and where external weights live for a graph loaded from bytes."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if cuda:
        options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    if threads:
        options.intra_op_num_threads = threads
    if external_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_folder))
    for name, value in (overrides or {}).items():
        options.add_initializer(name, value)
    return options


def run_options(ort, graph_id: int | None):
    """RunOptions of a GPU run: no host wait at its end; with a graph id, the CUDA graph to record or replay."""
    options = ort.RunOptions()
    options.add_run_config_entry("disable_synchronize_execution_providers", "1")
    if graph_id is not None:
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


def require_cuda_provider(session, name: str) -> None:
    """onnxruntime falls back to the CPU, with a warning, when its CUDA provider cannot start: refuse that."""
    if CUDA_EP not in session.get_providers():
        raise UserError(f"{name}: onnxruntime could not start its CUDA provider (its CUDA 13 and cuDNN 9 libraries did "
                        "not load; its warning above says which): import torch's CUDA build first, as zimage-trt "
                        "does, or pip install 'onnxruntime-gpu[cuda,cudnn]'")


def missing_kernel(exc: Exception, name: str, precision: str, version: str) -> UserError | None:
    """A session creation that failed for want of a kernel, as one line; None for any other failure."""
    m = _MISSING_KERNEL.search(str(exc))
    if m is None:
        return None
    op, opset, node = m.groups()
    flag = REEXPORT.get(name, "--precision")
    if precision == "bf16":
        return UserError(f"{name} is a BF16 graph and onnxruntime {version} has no BF16 {op}({opset}) kernel here "
                         f"(node '{node}'): export it in fp32 (zimage-trt export ... {flag} fp32) or use another "
                         "backend")
    return UserError(f"{name} ({precision}): onnxruntime {version} has no {op}({opset}) kernel for this graph's types "
                     f"(node '{node}'): export it in another precision ({flag}) or use another backend")


def graph_refusal(exc: Exception) -> str | None:
    """onnxruntime's reason for refusing enable_cuda_graph at session creation, or None for another failure."""
    text = str(exc)
    if "CUDA Graph feature" not in text and "graph capture feature" not in text:
        return None
    reason = text.split("as requested by the user", 1)[-1].strip(" .")
    return f"onnxruntime refused to record it ({reason})"


def io_key(inputs: dict, outputs: dict) -> tuple:
    """What a recorded run depends on: each tensor's address, shape and dtype."""
    return tuple((n, t.data_ptr(), tuple(t.shape), t.dtype) for n, t in (*inputs.items(), *outputs.items()))


class GraphSlots:
    """onnxruntime CUDA-graph ids of one session, one per I/O layout (io_key). At most `limit` are kept: for a new
    layout the least recently used id is released (`release`, InferenceSession.release_captured_graph where the
    installed onnxruntime has it); without `release` a layout past the limit runs eagerly. Ids are never reused
    (onnxruntime refuses to record an id twice) and start at 1 (0 is onnxruntime's own default)."""

    def __init__(self, limit: int = MAX_GRAPHS, release=None):
        self.limit, self.release = limit, release
        self.ids: OrderedDict[tuple, int] = OrderedDict()
        self.next_id, self.released, self.eager_runs = 1, 0, 0

    def id_for(self, key: tuple) -> int:
        gid = self.ids.get(key)
        if gid is not None:
            self.ids.move_to_end(key)
            return gid
        if len(self.ids) >= self.limit:
            if self.release is None:
                self.eager_runs += 1
                return SKIP_GRAPH
            _, oldest = self.ids.popitem(last=False)
            self.release(oldest)
            self.released += 1
        gid, self.next_id = self.next_id, self.next_id + 1
        self.ids[key] = gid
        return gid
