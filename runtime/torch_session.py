"""PyTorch backend: the reference modules behind the same interface as the engines.

The runtime does not build these modules (that needs diffusers); the caller passes them in, typically
`zimage_trt.export.reference.reference_modules(model_dir, bundle)`, which wraps the diffusers modules exactly
as they are exported (or, for an fp8 bundle, with the graph's FP8 layers: runtime/torch_fp8.py).

On a GPU the session makes its network fast without changing what it computes:
  attention   the fastest fused kernel for the network's shapes, measured at its first run (torch_attention.py)
  compile     with compile=True, torch.compile of the module's regions, static shapes (torch_compile.py)
  graphs      the text encoder and the VAE replay CUDA graphs of their own, one per caption-length bucket or
              image size (torch_graphs.py), in the runtime's memory pool once it hands it over (use_graph_pool);
              the transformer is recorded by the runtime, inside its denoising loop (`capturable`)
The text encoder runs on its caption padded to a multiple of 32 whenever it is compiled or recorded, so that a
bucket serves every length in it: attention is causal, so the rows of the real tokens do not see the padding.
"""

from __future__ import annotations

import sys

import torch

from .session import check_io
from .torch_attention import Attention, AttentionCalls
from .torch_compile import CompileLog, compile_regions, prepare
from .torch_graphs import ShapeGraphs

BUCKET = 32  # caption lengths are padded to this multiple (the transformer's own caption padding)
RECORDED = ("text_encoder", "vae_decoder")  # the transformer is recorded by the runtime's loop


class TorchSession:
    capturable = True  # pure tensor code with no host syncs

    def __init__(
        self, name: str, module: torch.nn.Module, device: torch.device, precision: str = "fp32", resident: bool = True,
        compile: bool = False, graphs: bool | None = None,
    ):
        """resident=False (--vram sequential): the module stays in host memory until the runtime acquires it.
        graphs (None: on a GPU when resident): record the text encoder and VAE in CUDA graphs of their own; a
        network that leaves the GPU comes back at other addresses, which a graph cannot follow."""
        self.name, self.device, self.precision = name, device, precision
        self.module = (module.to(device) if resident else module).eval()
        self.input_names = list(module.input_names)
        self.output_names = list(module.output_names)

        self._base: dict[str, torch.Tensor] = {}  # parameters a LoRA changed, as they were (to restore exactly)
        self.weights_in_place = True  # set_weights copies into the same storage: recorded CUDA graphs stay valid

        self.compiled = compile
        self.compile_log = CompileLog(name, device)
        if compile:
            prepare()
        self.attention = Attention(device)
        self._first_run_done = False
        if graphs is None:
            graphs = device.type == "cuda" and resident
        self.graphs = ShapeGraphs(name, device) if graphs and name in RECORDED else None
        self.bucketed = name == "text_encoder" and (compile or self.graphs is not None)

    def close(self) -> None:
        """Drop the module and its graphs (its weights go once nothing else holds them)."""
        if self.graphs is not None:
            self.graphs.close()
        self.module = None
        self._base = {}

    def use_graph_pool(self, pool) -> None:
        """Capture this session's graphs into `pool` (the runtime's loop pool) from now on."""
        if self.graphs is not None:
            self.graphs.use_pool(pool)

    # --vram sequential: the module's weights leave the GPU between uses (to host memory, then back)
    def release(self) -> None:
        if self.device.type == "cuda" and self.module is not None:
            self.module.to("cpu")
            self._base = {k: v.to("cpu") for k, v in self._base.items()}

    def acquire(self) -> None:
        if self.device.type == "cuda" and self.module is not None:
            self.module.to(self.device)
            self._base = {k: v.to(self.device) for k, v in self._base.items()}

    # LoRA (runtime/lora.py): weights are the module's parameters, changed in place
    def weight_key(self, name: str, entry: dict) -> tuple[str, bool, float]:
        # The module is rescaled for FP16 exactly as the graph only when it was built folded (fp16 with scales).
        folded = getattr(self.module, "fp16_folded", False)
        return f"transformer.{name}", False, entry["divisor"] if folded else 1.0

    def base_weights(self, keys) -> dict:
        params = dict(self.module.named_parameters())
        return {k: self._base.get(k, params[k].detach()) for k in keys}

    @torch.no_grad()
    def set_weights(self, values) -> None:
        """These parameters take these values ((key, value) pairs, taken one at a time); every other one changed
        before goes back to its base, bit for bit. The bases stay on the device: a switch is copies, no transfer."""
        params = dict(self.module.named_parameters())
        changed = set()
        for key, value in values:
            if key not in self._base:
                self._base[key] = params[key].detach().clone()
            params[key].copy_(value)
            changed.add(key)
        for key in [k for k in self._base if k not in changed]:
            params[key].copy_(self._base.pop(key))

    @torch.no_grad()
    def run(self, inputs, outputs) -> None:
        check_io(self.name, inputs, self.input_names)
        args = [inputs[n] for n in self.input_names]
        n_tokens = args[0].shape[1]
        if self.bucketed:
            args[0] = torch.nn.functional.pad(args[0], (0, -n_tokens % BUCKET))  # token 0 after the prompt
        result = self._run(args) if self._first_run_done else self._first_run(args)
        outputs[self.output_names[0]].copy_(result[:, :n_tokens] if self.bucketed else result)

    def _run(self, args) -> torch.Tensor:
        if self.graphs is not None and self.graphs.enabled:
            return self.graphs.run(self._forward, args)
        return self._forward(*args)

    def _forward(self, *args) -> torch.Tensor:
        with self.attention.context():
            if not self.compiled:
                return self.module(*args)
            return self.compile_log.call(tuple(tuple(a.shape) for a in args), self.module, *args)

    def _first_run(self, args) -> torch.Tensor:
        """The first run records the network's attention calls and chooses their kernels (torch_attention.py),
        then compiles. On a GPU, or to compile, that recording run is an eager run of its own whose output is
        dropped: it must happen outside any capture and before tracing (compiled code keeps the kernel order it
        was traced with), and the real run then uses the chosen kernels, so the first image equals the later
        ones. Eager on a CPU, PyTorch's order stands and the recorded run is the real one."""
        calls = AttentionCalls()
        separate = self.device.type == "cuda" or self.compiled
        with calls:
            result = self.module(*args) if separate else self._run(args)
        self.attention.choose(calls.calls)
        if self.attention.timed:
            timed = ", ".join(f"{k} {v:.2f} ms" for k, v in self.attention.timed.items())
            print(f"{self.name}: attention {self.attention.ran} (timed: {timed})", file=sys.stderr, flush=True)
        if self.compiled:
            compile_regions(self.module)
        self._first_run_done = True
        return self._run(args) if separate else result

    def describe(self) -> str:
        """What runs, in a few words: attention kernel, compiled or not, recorded or not."""
        parts = [f"attention {self.attention.ran}"]
        if self.compiled:
            parts.append(f"compiled ({self.compile_log.total:.1f} s)")
        if self.graphs is not None:
            parts.append("CUDA graphs" if self.graphs.enabled else "CUDA graphs failed: eager")
        if self.name == "transformer" and self.precision == "fp8":
            parts.append("FP8 scaled_mm")
        return ", ".join(parts)
