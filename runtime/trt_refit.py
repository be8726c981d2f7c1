"""LoRA on a TensorRT engine (`build --refittable`): refit in bounded chunks, complete, never a mix of two stacks.

- Bounded: a full-size stack changes 238 attention and feed-forward weights, ~6 B parameters, ~12 GB in fp16; held
  on the GPU at once beside the 12.4 GB engine they do not fit a 24 GB card. The new values are computed one at a
  time and refitted in chunks of about `session.refit_chunk_bytes` (1 GiB), each with a Refitter of its own (a
  Refitter keeps the addresses it was given until it goes, so a chunk's memory is freed only after its refit ran).
- Complete: TensorRT fuses weights that share an input (to_q/to_k/to_v, w1/w3); setting one makes the others
  missing (`get_missing_weights`), and `refit_cuda_engine_async` returns False while any is. Each missing weight gets
  the value it must hold after the switch: the stack's, if the stack changes it (then it joins this chunk), else
  its base. NVIDIA's demo/Diffusion refits LoRAs the same way.
- Never a mix: a refit that fails (False may leave a subset refitted) or a weight the refitter refuses puts every
  weight this switch touched, and every one the previous stack changed, back to its base; the error says so.

UNVERIFIED: no TensorRT engine runs in the workplace where this was written (README, "What was verified where");
it follows TensorRT 10.15-11.1's NvInferRuntime.h and TensorRT-RTX 1.7.1's bindings.
"""

from __future__ import annotations

import torch

from zimage_trt.common.errors import UserError

REFIT_CHUNK_BYTES = 1 << 30  # new values on the GPU at once during a LoRA switch (plus one weight's fused partners)


class RefitFailed(RuntimeError):
    """refit_cuda_engine_async returned False; `keys`: the chunk it was refitting (a subset may have changed)."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys


def refit_weights(session, values) -> None:
    """Refit `session.engine` to `values` (a lora.PatchedWeights, or any (key, value) pairs) and every weight the
    previous stack changed back to its base. On failure every weight is its base again, and the error says so."""
    keys, new_value = _new_values(values)
    wanted = set(keys)
    order = [k for k in sorted(session._changed) if k not in wanted] + keys
    if not order:
        return
    if not session.engine.refittable:
        raise UserError(f"the {session.name} engine was not built refittable, so LoRAs cannot be applied at run "
                        f"time; rebuild it: {session.fix} --refittable")

    def target(key: str) -> torch.Tensor:  # the value `key` holds once this switch is done
        return new_value(key) if key in wanted else _base(session, key)

    touched: list[str] = []
    try:
        _refit_in_chunks(session, order, target, touched)
    except Exception as exc:
        state = _back_to_base(session, set(touched) | session._changed)
        if isinstance(exc, UserError):
            raise UserError(f"{exc}; {state}") from None
        raise RuntimeError(f"{exc}; {state}") from exc
    session._changed = wanted


def _new_values(values):
    """(keys in order, key -> value): PatchedWeights computes a value on demand; other pairs are taken as given."""
    if hasattr(values, "value") and hasattr(values, "keys"):
        return list(values.keys), values.value
    values = dict(values)
    return list(values), values.__getitem__


def _base(session, key: str) -> torch.Tensor:
    return session.base_weights([key])[key]


def _refit_in_chunks(session, order: list[str], target, touched: list[str]) -> None:
    """Refit every key of `order` to target(key), about session.refit_chunk_bytes of new values per refit; each key
    whose refit was attempted is appended to `touched` (a failed refit may have changed any of its chunk)."""
    trt = session.flavour.trt
    pending = dict.fromkeys(order)  # an ordered set
    while pending:
        refitter = trt.Refitter(session.engine, session.flavour.logger())
        chunk: dict[str, torch.Tensor] = {}  # kept alive until this chunk's refit has run
        size = 0
        while pending and size < session.refit_chunk_bytes:
            key = next(iter(pending))
            del pending[key]
            size += _set_weight(session, refitter, chunk, key, target(key))
        # TensorRT refits weights that share an input as one: the partners of those set are missing until set too.
        while missing := [m for m in refitter.get_missing_weights() if m not in chunk]:
            for m in missing:
                if not m:
                    raise RuntimeError(f"{session.name}: the refit needs an unnamed weight fused with "
                                       f"{sorted(chunk)[0]!r}; rebuild the engine: {session.fix} --refittable")
                pending.pop(m, None)
                _set_weight(session, refitter, chunk, m, target(m))
        touched.extend(chunk)
        stream = torch.cuda.current_stream(session.device)
        ok = refitter.refit_cuda_engine_async(stream.cuda_stream)
        stream.synchronize()  # the chunk's memory may go only after the refit has read it
        if not ok:
            raise RefitFailed(f"{session.name}: TensorRT refused the refit of {len(chunk)} weights (first "
                              f"{next(iter(chunk))!r}; missing: {refitter.get_missing_weights() or 'none'}; see "
                              "the TensorRT log)", list(chunk))


def _set_weight(session, refitter, chunk: dict, key: str, value: torch.Tensor) -> int:
    """Give the refitter `key`'s new value (on the session's device); returns its bytes."""
    trt = session.flavour.trt
    value = value.to(session.device).contiguous()
    kind = _trt_dtype(trt, value.dtype)
    weights = trt.Weights(kind, value.data_ptr(), value.numel())
    location = trt.TensorLocation.DEVICE if value.is_cuda else trt.TensorLocation.HOST
    if not refitter.set_named_weights(key, weights, location):
        raise UserError(f"{session.name}: the refit refused weight {key!r}: {_refusal(refitter, key, kind, value)}; "
                        f"rebuild the engine from this bundle: {session.fix} --refittable")
    chunk[key] = value
    return value.numel() * value.element_size()


def _trt_dtype(trt, dtype: torch.dtype):
    kinds = {torch.float16: "HALF", torch.bfloat16: "BF16", torch.float32: "FLOAT"}
    if dtype not in kinds:
        raise RuntimeError(f"a refitted weight is {dtype}; TensorRT refits fp16, bf16 and fp32 weights here")
    return getattr(trt.DataType, kinds[dtype])


def _refusal(refitter, key: str, kind, value: torch.Tensor) -> str:
    """Which of name, dtype or shape the engine refused, from the weight's prototype (its size is -1 for a name the
    engine does not have as a refittable weight)."""
    proto = refitter.get_weights_prototype(key)
    if proto.size < 0:
        return "the engine has no refittable weight of that name"
    if proto.dtype != kind:
        return f"its dtype: the engine holds {proto.dtype.name}, the value is {kind.name}"
    if proto.size != value.numel():
        return f"its shape: the engine holds {proto.size} values, the value has {value.numel()} {list(value.shape)}"
    return "name, dtype and size match its prototype (see the TensorRT log)"


def _back_to_base(session, keys: set[str]) -> str:
    """After a failed switch: every weight it touched, and every one the previous stack changed, back to its base,
    so the engine is the base (no LoRA). Returns what the engine holds now, for the error."""
    try:
        _refit_in_chunks(session, sorted(keys), lambda k: _base(session, k), [])
    except Exception as exc:  # noqa: BLE001 - reported in the switch's error
        session._changed = set(keys)  # a later switch restores them again
        return f"restoring the base weights failed too ({exc}): the engine holds a mix of weights, reload it"
    session._changed = set()
    return "every weight is its base again (no LoRA)"
