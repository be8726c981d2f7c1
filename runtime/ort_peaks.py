"""FP16 overflow seen on real kernels: the transformer graph with the largest |value| of every FP16 intermediate
as an extra output, run by onnxruntime through whole generations, reported per block against FP16's 65504.

Each FP16 value the graph produces gets Abs -> ReduceMax -> Cast(float) beside its own consumers, so the graph
still computes the same velocity and every peak costs one scalar; a session accumulates the running maximum of
each on the device over all its runs (all passes of a loop), so nothing is read back until the report. An extra
reader may keep onnxruntime from fusing a node with the next one: the peak is then that of the value as the graph
writes it, which is what an unfused FP16 kernel stores.

On a CPU, onnxruntime's provider computes chains of FP16 nodes in FP32 and casts only at the chains' ends, which
hides an overflow from its outputs: the peaks there are the values the FP16 intermediates take on the CPU (a peak
over 65504 still marks an overflow), not what real FP16 kernels compute. On a GPU they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ort_placement import block_of, value_types
from .ort_session import OrtSession

FP16_MAX = 65504.0
OUTSIDE = "(outside the blocks)"
CPU_NOTE = ("on the CPU onnxruntime computes chains of FP16 nodes in FP32, which hides an FP16 overflow from its "
            "outputs: these peaks are the values the FP16 intermediates take there (over 65504 still marks an "
            "overflow), not what real FP16 kernels compute; run with --device cuda for those")


@dataclass(frozen=True)
class Probe:
    output: str  # the scalar output added for it
    value: str  # the FP16 value it watches
    op: str  # the op that writes that value
    block: str


def peak_graph(path) -> tuple:
    """(ModelProto with a peak output per FP16 value, [Probe]) for the ONNX graph at `path` (its weights are not
    read: the session finds them beside the file)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    types = value_types(model)
    probes, extra = [], []
    for node in model.graph.node:
        for value in node.output:
            if not value or types.get(value) != TensorProto.FLOAT16:
                continue
            out = f"fp16_peak_{len(probes)}"
            extra += [helper.make_node("Abs", [value], [out + "_abs"]),
                      helper.make_node("ReduceMax", [out + "_abs"], [out + "_h"], keepdims=0),
                      helper.make_node("Cast", [out + "_h"], [out], to=TensorProto.FLOAT)]
            model.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, []))
            probes.append(Probe(out, value, node.op_type, block_of(node) or OUTSIDE))
    model.graph.node.extend(extra)
    return model, probes


class PeakSession(OrtSession):
    """The transformer's session with the peaks graph: runs as the transformer does (the runtime binds only the
    velocity) and keeps each probe's running maximum in `peaks` (NaN sticks: torch.maximum propagates it)."""

    def __init__(self, path, precision: str, device: torch.device, stream=None):
        model, self.probes = peak_graph(path)
        super().__init__("transformer", path, precision, device, stream=stream, cuda_graph=False,
                         model_bytes=model.SerializeToString())
        self.peaks = torch.zeros(len(self.probes), dtype=torch.float32, device=device)
        self._scratch = torch.zeros_like(self.peaks)
        self.runs = 0

    def reset(self) -> None:
        self.peaks.zero_()
        self.runs = 0

    def run(self, inputs, outputs) -> None:
        extra = {p.output: self._scratch[i] for i, p in enumerate(self.probes)}
        super().run(inputs, {**outputs, **extra})
        torch.maximum(self.peaks, self._scratch, out=self.peaks)
        self.runs += 1

    def by_block(self) -> list[tuple[str, float, Probe | None]]:
        """[(block, its largest peak, the probe where it is)], blocks in graph order (one read-back)."""
        values = self.peaks.cpu().tolist()
        best: dict[str, tuple[float, Probe]] = {}
        for probe, v in zip(self.probes, values):
            held = best.get(probe.block)
            if held is None or not v <= held[0]:  # a NaN replaces anything and stays
                best[probe.block] = (v, probe)
        return [(block, v, probe) for block, (v, probe) in best.items()]


def overflowed(peak: float) -> bool:
    return not peak <= FP16_MAX  # inf and NaN too


def format_peaks(rows: list, title: str) -> str:
    """The per-block table: largest |activation|, where, its share of 65504 and the verdict."""
    head = ["block", "largest |x|", "where (op value)", "of 65504", "verdict"]
    cells = [head]
    for block, peak, probe in rows:
        share = f"{100 * peak / FP16_MAX:.3g}%" if peak == peak and peak != float("inf") else "-"
        cells.append([block, f"{peak:.4g}", f"{probe.op} {probe.value}", share,
                      "OVERFLOW" if overflowed(peak) else "ok"])
    if len(cells) == 1:
        return f"{title}\nno FP16 intermediate in this graph (it computes in another precision)"
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(head))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([title] + lines)
