"""The one interface every backend implements: a network you run on buffers you own.

A Session runs one network. `run(inputs, outputs)` reads the caller's input tensors and writes the caller's
output tensors in place; it allocates nothing the caller must keep and, on a GPU, only enqueues work on the
current CUDA stream (no host sync), so a loop of runs can be recorded in a CUDA graph when `capturable` is
true. Tensors are torch tensors on the session's device; I/O dtypes are float32 and int64 (ids, lengths)
whatever the network's internal precision.

Engines add what only they have (TrtSession): `stream_capturable(inputs, stream)`, asked before a capture; `image_sizes`, the SizeRange their optimization profile covers,
with `check_size(width, height)` and `rebuild_hint()` for the one-line refusal of a size outside it; and
`release_shapes(shapes)`, called by the runtime when no recorded CUDA graph uses those input shapes any more.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Session(Protocol):
    name: str
    device: torch.device
    precision: str  # fp32 | fp16 | bf16: what the network computes in
    capturable: bool

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None: ...

    def close(self) -> None:
        """Free what the session holds (engine, contexts, weights); it cannot run after this."""


def check_io(name: str, tensors: dict[str, torch.Tensor], expected: list[str]) -> None:
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ValueError(f"{name}: missing tensors {missing}; expected {expected}")
    for n in expected:
        if not tensors[n].is_contiguous():
            raise ValueError(f"{name}: tensor '{n}' must be contiguous")
