"""Where onnxruntime put each node of a session: the report `generate`, `bench` and `parity` print on a GPU, the
CUDA-graph rules checked on it, and the precision refusals that follow from it.

onnxruntime records the placement when the session option `session.record_ep_graph_assignment_info` is set
(InferenceSession.get_provider_graph_assignment_info, onnxruntime 1.24 and newer). A node off the GPU is one of:

    shape     all its outputs are integer or bool tensors (sizes, indices, masks of shapes): the CUDA provider
              leaves such arithmetic on the CPU on purpose, and its CUDA graphs allow it
    compute   anything else: real tensors computed on the CPU, each with a copy between host and GPU around it

A node's output types come from the ONNX graph itself (its value_info, or shape inference where that is missing);
a node onnxruntime made by fusing others has no such types and counts as compute.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from zimage_trt.common.errors import UserError

from .ort_cuda import REEXPORT

COPY_OPS = ("MemcpyToHost", "MemcpyFromHost")
CONTROL_FLOW = ("If", "Loop", "Scan")
SHAPE_READERS = ("Shape", "Size")  # read a tensor's shape only, which the recorded layout fixes
QDQ = ("QuantizeLinear", "DequantizeLinear")
_BLOCK = re.compile(r"^transformer\.((?:layers|noise_refiner|context_refiner)\.\d+)$")


@dataclass(frozen=True)
class Node:
    provider: str
    name: str
    op: str


@dataclass
class Placement:
    """The nodes of one session by provider, against the provider it should run on (`target`). `shape_nodes`: the
    graph's nodes whose outputs are all integer or bool; `inputs`: each graph input's readers (node names)."""

    nodes: list[Node]
    target: str
    shape_nodes: set = field(default_factory=set)
    inputs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, session, model, target: str) -> "Placement":
        """From a live session and its ONNX ModelProto (weights need not be loaded)."""
        nodes = [Node(g.ep_name, n.name, n.op_type) for g in session.get_provider_graph_assignment_info()
                 for n in g.get_nodes()]
        readers: dict[str, list[str]] = {i.name: [] for i in model.graph.input}
        for n in model.graph.node:
            for i in n.input:
                if i in readers:
                    readers[i].append(n.name)
        return cls(nodes, target, shape_nodes(model), readers)

    @property
    def copies(self) -> list[Node]:
        return [n for n in self.nodes if n.op in COPY_OPS]

    @property
    def on_target(self) -> list[Node]:
        return [n for n in self.nodes if n.provider == self.target and n.op not in COPY_OPS]

    @property
    def off_target(self) -> list[Node]:
        return [n for n in self.nodes if n.provider != self.target and n.op not in COPY_OPS]

    @property
    def shape_off(self) -> list[Node]:
        return [n for n in self.off_target if n.name in self.shape_nodes]

    @property
    def compute_off(self) -> list[Node]:
        return [n for n in self.off_target if n.name not in self.shape_nodes]

    def inputs_read_off_target(self) -> list[str]:
        """Graph inputs whose values (not only shapes) a node off the target reads: a recorded graph would not
        see their next values."""
        off = {n.name for n in self.off_target if n.op not in SHAPE_READERS}
        return [i for i, names in self.inputs.items() if off.intersection(names)]

    def graph_blockers(self) -> list[str]:
        """Why this session's runs cannot be recorded in a CUDA graph and replayed ([] when they can)."""
        why = []
        flow = sorted({n.op for n in self.nodes if n.op in CONTROL_FLOW})
        if flow:
            why.append(f"control flow ({', '.join(flow)})")
        if self.compute_off:
            why.append(f"{len(self.compute_off)} compute nodes off the GPU ({ops_of(self.compute_off)})")
        if self.copies:
            why.append(f"{len(self.copies)} copies between host and GPU")
        read = self.inputs_read_off_target()
        if read:
            why.append(f"input {', '.join(read)} read on the host")
        return why

    def describe(self) -> str:
        """'N nodes on the GPU, C compute nodes off it (ops), S shape nodes on the CPU, K host copies'."""
        compute = self.compute_off
        ops = f" ({ops_of(compute)})" if compute else ""
        return (f"{len(self.on_target)} nodes on the GPU, {len(compute)} compute nodes off it{ops}, "
                f"{len(self.shape_off)} shape nodes on the CPU, {len(self.copies)} host copies")


def ops_of(nodes: list[Node], most: int = 4) -> str:
    """'MatMul x3, Conv' for a list of nodes: the commonest op types first."""
    counts: dict[str, int] = {}
    for n in nodes:
        counts[n.op] = counts.get(n.op, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:most]
    more = ", ..." if len(counts) > most else ""
    return ", ".join(f"{op} x{k}" if k > 1 else op for op, k in top) + more


def value_types(model) -> dict[str, int]:
    """Element type of every named value the graph declares (inputs, outputs, value_info, initializers); shape
    inference fills in what the exporter left out."""
    import onnx

    graph = model.graph
    declared = list(graph.value_info) + list(graph.input) + list(graph.output)
    produced = [o for n in graph.node for o in n.output if o]
    types = {v.name: v.type.tensor_type.elem_type for v in declared}
    if any(o not in types for o in produced):
        inferred = onnx.shape_inference.infer_shapes(model).graph
        declared = list(inferred.value_info) + list(inferred.input) + list(inferred.output)
        types = {v.name: v.type.tensor_type.elem_type for v in declared}
    types.update({i.name: i.data_type for i in graph.initializer})
    return types


def shape_nodes(model) -> set[str]:
    """Names of the nodes whose every output is an integer or bool tensor."""
    from onnx import TensorProto as T

    ints = {T.INT64, T.INT32, T.INT16, T.INT8, T.UINT64, T.UINT32, T.UINT16, T.UINT8, T.BOOL}
    types = value_types(model)
    return {n.name for n in model.graph.node if n.output and all(types.get(o) in ints for o in n.output if o)}


def block_of(node) -> str | None:
    """The transformer block ('layers.3', 'noise_refiner.0') a node of an exported graph belongs to, from the
    name scopes the dynamo exporter records on it; None outside the blocks."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            for scope in scopes:
                m = _BLOCK.match(scope)
                if m:
                    return m.group(1)
    return None


def precision_refusal(name: str, precision: str, placement: Placement, version: str) -> UserError | None:
    """One line where a precision's nodes would fall to the CPU: the fp8 graph's Q/DQ, a bf16 graph's compute."""
    flag = REEXPORT.get(name, "--precision")
    if precision == "fp8":
        qdq = [n for n in placement.compute_off if n.op in QDQ]
        if qdq:
            return UserError(f"{name} is an FP8 Q/DQ graph and onnxruntime {version}'s CUDA provider does not take "
                             f"its float8e4m3fn QuantizeLinear/DequantizeLinear ({len(qdq)} of them would run on the "
                             "CPU): run this bundle with --backend tensorrt (sm89 and newer), or export an fp16 "
                             "transformer for onnxruntime")
    if precision == "bf16" and placement.compute_off:
        return UserError(f"{name} is a BF16 graph and onnxruntime {version}'s CUDA provider has no BF16 kernels for "
                         f"{ops_of(placement.compute_off)} (they would run on the CPU): export it in fp32 "
                         f"(zimage-trt export ... {flag} fp32)")
    return None
