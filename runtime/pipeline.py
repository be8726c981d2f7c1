"""The lean runtime: prompt -> tokens -> text encoder -> transformer passes -> VAE -> image.

It owns every buffer, allocated once at the largest image size it serves; a generation at a smaller size works
on views of the first elements of the same storage, so nothing is allocated per request. The only host sync is
reading the finished image back. Verbs, in the order `generate` calls them:

    use_size         point the buffers at this size's views
    tokenize         the chat-templated prompt -> token ids (tokenizer.py)
    encode_prompt    the text encoder, straight into the transformer's caption buffer
    encode_guidance  the negative prompt and guidance scalars, when guidance is on (guidance.py)
    init_latents     the input step: the loop's starting latents (inputs.py)
    denoise          every pass and Euler step, recorded in a CUDA graph where the sessions allow (loop.py)
    decode           the VAE, and the 8-bit image read back

Where the next pipelines plug in: img2img, inpainting and ControlNet each bring an input step of their own (the
image, mask or control image encoded before the loop, inputs.py) and change what the loop reads per pass (loop.py);
the verbs around them stay. The sessions (session.py) never see which pipeline runs.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from zimage_trt.common.errors import UserError

from .bundle import Bundle
from .guidance import Guidance, GuidedRun
from .inputs import initial_noise
from .loop import MAX_CUDA_GRAPHS, LoopRecorder, Plan, run_loop
from .scheduler import Schedule, flow_match_schedule
from .sizes import SizeRange
from .tokenizer import PromptTokenizer

__all__ = ["Guidance", "GuidedRun", "VRAM_MODES", "ZImageRuntime"]  # Guidance: where callers have always found it

# all: every network stays on the GPU. sequential: the text encoder and the image networks (transformer, VAE) take
# turns, so the peak is max(text encoder, transformer + VAE) plus the shared buffers, at the cost of moving weights
# (torch: to host memory and back; TensorRT: the engine is freed and deserialized again from its mmap'd plan).
VRAM_MODES = ("all", "sequential")


class ZImageRuntime:
    def __init__(
        self,
        bundle: Bundle,
        sessions: dict,
        device="cpu",
        steps: int | None = None,
        generator_device: str = "cpu",
        cuda_graph: bool = True,
        sigmas: list[float] | None = None,
        max_cuda_graphs: int = MAX_CUDA_GRAPHS,
        vram: str = "all",
    ):
        self.bundle = bundle
        self.device = torch.device(device)
        self.text_encoder = sessions["text_encoder"]
        self.transformer = sessions["transformer"]
        self.vae = sessions["vae_decoder"]
        self.tokenizer = PromptTokenizer(bundle.root / "tokenizer", bundle.max_caption_tokens)
        self.generator_device = generator_device
        self.default_steps = steps or bundle.scheduler["default_steps"]
        if vram not in VRAM_MODES:
            raise UserError(f"--vram must be one of {', '.join(VRAM_MODES)}, not {vram!r}")
        self.vram = vram
        self._resident_group: str | None = None  # sequential: "text" or "image", whichever is on the GPU
        # A network that leaves the GPU comes back at new addresses, which a recorded loop cannot follow: in
        # sequential mode the loop runs eagerly (the weight moves cost far more than the graph saves).
        recordable = (
            cuda_graph and vram == "all" and self.device.type == "cuda" and getattr(self.transformer, "capturable", False)
        )
        self.sessions = sessions
        # One CUDA stream of the runtime's own for all its work: TensorRT adds device-wide synchronisations on
        # the legacy default stream. Sessions enqueue on the current stream, which each verb sets to this one.
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.sizes = self._served_sizes()
        self.recorder = LoopRecorder(self, recordable, max_cuda_graphs)
        self._plans: dict[int, Plan] = {}
        self.loras: list = []  # the (Lora, strength) stack in the transformer's weights now
        self._allocate()
        self.size: tuple[int, int] | None = None  # (width, height) the buffers' views are set for
        self.use_size(*self.sizes.opt)
        self._plans[self.default_steps] = self._make_plan(self.default_steps, sigmas)

    # The recorder's state, as the server's metrics, bench and callers read it.
    @property
    def use_cuda_graph(self) -> bool:
        return self.recorder.enabled

    @use_cuda_graph.setter
    def use_cuda_graph(self, on: bool) -> None:
        self.recorder.enabled = on

    @property
    def cuda_graph_failures(self) -> int:
        return self.recorder.failures

    @property
    def graphs_evicted(self) -> int:
        return self.recorder.evicted

    # ---------------------------------------------------------------- sizes and buffers
    def _served_sizes(self) -> SizeRange:
        """The bundle's sizes, narrowed to what every engine's optimization profile covers."""
        sizes = self.bundle.sizes
        for s in self.sessions.values():
            profile = getattr(s, "image_sizes", None)
            if profile is None:
                continue
            narrowed = sizes.intersect(profile)
            if narrowed is None:
                raise UserError(
                    f"the {s.name} engine's profile ({profile.describe()}) covers no size of bundle "
                    f"{self.bundle.root} ({sizes.describe()}); rebuild it: {s.rebuild_hint()}"
                )
            sizes = narrowed
        return sizes

    def check_size(self, width: int, height: int) -> None:
        """Refuse a size the bundle or an engine does not cover, in one line with what would cover it."""
        self.bundle.sizes.check(
            width, height, f"bundle {self.bundle.root}",
            "export a bundle that covers it: zimage-trt export --model MODEL --out BUNDLE --size-range MIN:MAX",
        )
        for s in self.sessions.values():
            if getattr(s, "image_sizes", None) is not None:
                s.check_size(width, height)  # an engine refuses what its profile does not cover

    def _allocate(self) -> None:
        """Every buffer once, at the largest size served; `use_size` points the size-dependent ones at views."""
        b, dev = self.bundle, self.device
        width, height = self.sizes.largest
        self.ids = torch.zeros(1, b.max_caption_tokens, dtype=torch.int64, device=dev)
        self.caption = torch.zeros(1, b.max_caption_tokens, b.caption_dim, dtype=torch.float32, device=dev)
        self.cap_len = torch.zeros(1, dtype=torch.int64, device=dev)
        self.timestep = torch.zeros(1, dtype=torch.float32, device=dev)
        n_latent = int(np.prod(b.latent_shape_for(width, height)))
        self._latents_store = torch.zeros(n_latent, dtype=torch.float32, device=dev)
        self._velocity_store = torch.zeros(n_latent, dtype=torch.float32, device=dev)
        self._image_store = torch.zeros(3 * height * width, dtype=torch.float32, device=dev)
        self._neg_velocity_store = None  # guidance's buffers, allocated at its first use (see _guidance_buffers)
        self.cfg_scale = torch.zeros((), dtype=torch.float32, device=dev)
        self.cfg_limit = torch.zeros((), dtype=torch.float32, device=dev)

    def _guidance_buffers(self) -> None:
        """The unconditional caption and velocity, allocated once at the first guided generation."""
        if self._neg_velocity_store is not None:
            return
        b, dev = self.bundle, self.device
        self.neg_caption = torch.zeros(1, b.max_caption_tokens, b.caption_dim, dtype=torch.float32, device=dev)
        self.neg_cap_len = torch.zeros(1, dtype=torch.int64, device=dev)
        self._neg_velocity_store = torch.zeros_like(self._velocity_store)
        current, self.size = self.size or self.sizes.opt, None
        self.use_size(*current)  # sets the new buffer's view too

    def use_size(self, width: int, height: int) -> None:
        """Point latents, velocity and image at contiguous views of their storage for this size."""
        if self.size == (width, height):
            return
        self.check_size(width, height)
        shape = self.bundle.latent_shape_for(width, height)
        n = int(np.prod(shape))
        self.latents = self._latents_store[:n].view(shape)
        self.velocity = self._velocity_store[:n].view(shape)
        if self._neg_velocity_store is not None:
            self.neg_velocity = self._neg_velocity_store[:n].view(shape)
        self.image = self._image_store[: 3 * height * width].view(1, 3, height, width)
        self.size = (width, height)

    def _make_plan(self, steps: int, sigmas=None) -> Plan:
        sched = self.bundle.scheduler
        schedule = flow_match_schedule(steps, sched["shift"], sched["num_train_timesteps"], sigmas)
        model_t = torch.from_numpy(schedule.model_t).to(self.device)
        neg_dt = torch.from_numpy(-schedule.dt).to(self.device)
        return Plan(schedule, [model_t[i : i + 1] for i in range(schedule.passes)], [neg_dt[i] for i in range(schedule.passes)])

    def plan(self, steps: int | None = None) -> Plan:
        steps = steps or self.default_steps
        if steps < 1:
            raise UserError(f"the number of steps must be at least 1, got {steps}")
        if steps not in self._plans:
            self._plans[steps] = self._make_plan(steps)
        return self._plans[steps]

    @property
    def schedule(self) -> Schedule:
        return self._plans[self.default_steps].schedule

    def _make_resident(self, group: str) -> None:
        """--vram sequential: put the networks of `group` ("text": the text encoder; "image": transformer and
        VAE) on the GPU and the others off it. Nothing in mode "all"."""
        if self.vram != "sequential" or self._resident_group == group:
            return
        on = [self.text_encoder] if group == "text" else [self.transformer, self.vae]
        off = [self.transformer, self.vae] if group == "text" else [self.text_encoder]
        for s in off:
            getattr(s, "release", lambda: None)()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the freed weights go back to the device for the other group
        for s in on:
            getattr(s, "acquire", lambda: None)()
        self._resident_group = group
        if group == "image" and self.loras and not getattr(self.transformer, "weights_in_place", False):
            self.set_loras(self.loras)  # a re-deserialized engine has its base weights again

    def on_stream(self):
        """Context in which device work goes to the runtime's stream (nothing on a CPU)."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    # ---------------------------------------------------------------- verbs
    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def encode_prompt(self, ids: list[int], negative: bool = False) -> int:
        """Run the text encoder into the caption buffer (the unconditional one for `negative`); returns the
        padded caption length."""
        n = len(ids)
        if not 0 < n <= self.bundle.max_caption_tokens:
            raise UserError(f"a prompt must give 1..{self.bundle.max_caption_tokens} tokens, got {n}")
        caption, cap_len = self._caption(negative)
        self._make_resident("text")
        with self.on_stream():
            self.ids[0, :n].copy_(torch.tensor(ids, dtype=torch.int64), non_blocking=True)
            self.text_encoder.run({"input_ids": self.ids[:, :n]}, {"features": caption[:, :n]})
            cap_len.fill_(n)
        return self.bundle.padded_caption_length(n)

    def encode_guidance(self, guidance: "Guidance | None", steps: int | None = None) -> "GuidedRun | None":
        """Encode the negative prompt and set the guidance scalars; None when guidance is off (or off at every
        step), and the loop is the plain one."""
        if guidance is None or not guidance.active:
            return None
        guided = guidance.guided_steps(self.plan(steps).schedule)
        if not any(guided):
            return None
        self._guidance_buffers()
        ids = self.tokenizer.encode(guidance.negative_prompt, allow_empty=True)
        neg_lpad = self.encode_prompt(ids, negative=True)
        with self.on_stream():
            self.cfg_scale.fill_(float(guidance.scale))
            self.cfg_limit.fill_(float(guidance.normalization))
        return GuidedRun(neg_lpad, guided, guidance.normalization > 0)

    def init_latents(self, seed: int) -> None:
        """The reference's initial noise at the current size: randn in float32, of the latent shape diffusers
        uses for that size, from a generator seeded on `generator_device`."""
        noise = initial_noise(self.latents.shape, seed, self.generator_device)
        with self.on_stream():
            self.latents.copy_(noise)

    def _caption(self, negative: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, length) buffers of the prompt, or of the negative prompt of guidance."""
        return (self.neg_caption, self.neg_cap_len) if negative else (self.caption, self.cap_len)

    def feeds(self, lpad: int, negative: bool = False) -> dict:
        """The transformer's inputs for a caption padded to `lpad` (the unconditional one for `negative`)."""
        caption, cap_len = self._caption(negative)
        return {"latents": self.latents, "timestep": self.timestep, "cap_feats": caption[:, :lpad], "cap_len": cap_len}

    def denoise(self, lpad: int, steps: int | None = None, cfg: "GuidedRun | None" = None) -> None:
        """All transformer passes and Euler steps over self.latents, in place (guided where `cfg` says)."""
        plan = self.plan(steps)
        self._make_resident("image")
        with self.on_stream():
            graph = self.recorder.graph_for(lpad, plan, cfg) if self.recorder.enabled else None
            if graph is not None:
                graph.replay()
            else:
                run_loop(self, lpad, plan, cfg)

    def decode(self) -> np.ndarray:
        """VAE decode of self.latents -> HxWx3 uint8, rounded as diffusers' numpy_to_pil rounds."""
        self._make_resident("image")
        with self.on_stream():
            self.vae.run({"latents": self.latents}, {"image": self.image})
            pixels = (self.image[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
            return pixels.cpu().numpy()  # the one host sync of a generation

    def set_loras(self, stack: list) -> float:
        """Put these LoRAs [(Lora, strength), ...] into the transformer's weights, replacing the previous stack
        ([] gives the base weights back, bit for bit). One weight update, no reload; returns its seconds."""
        import time

        from .lora import bundle_weights, patched_weights

        start = time.perf_counter()
        if not hasattr(self.transformer, "set_weights"):
            raise UserError(f"the {type(self.transformer).__name__} backend cannot change weights at run time")
        weights = bundle_weights(self.bundle) if stack else {}
        self._make_resident("image")
        try:
            with self.on_stream():
                self.transformer.set_weights(patched_weights(self.transformer, weights, stack, self.device))
        except Exception:
            # A switch that failed part way must not leave a mix of two stacks: back to the base, then the error.
            # (A TensorRT refit has restored its base already; this then changes nothing.)
            self.loras = []
            with self.on_stream():
                self.transformer.set_weights(patched_weights(self.transformer, {}, [], self.device))
            raise
        finally:
            if not getattr(self.transformer, "weights_in_place", False):
                self.recorder.drop()  # a refit or a rebuilt session may move weights: the recorded loops must go
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.loras = list(stack)
        return time.perf_counter() - start

    def generate(
        self, prompt: str, seed: int = 0, steps: int | None = None, size: tuple[int, int] | None = None,
        guidance: Guidance | None = None,
    ) -> np.ndarray:
        """One image of `size` (width, height; default: the bundle's opt size) as HxWx3 uint8."""
        self.use_size(*(size or self.sizes.opt))
        ids = self.tokenize(prompt)
        lpad = self.encode_prompt(ids)
        cfg = self.encode_guidance(guidance, steps)
        self.init_latents(seed)
        self.denoise(lpad, steps, cfg)
        return self.decode()

    def close(self, sessions: bool = True) -> None:
        """Free the recorded graphs and the buffers, and (unless sessions=False, for sessions the caller still
        uses) close the sessions: engines, contexts and the shared device-memory block go with them."""
        self.recorder.close()
        if sessions:
            for s in self.sessions.values():
                close = getattr(s, "close", None)
                if close is not None:
                    close()
        for name in ("ids", "caption", "cap_len", "timestep", "latents", "velocity", "image",
                     "_latents_store", "_velocity_store", "_image_store", "neg_caption", "neg_cap_len",
                     "neg_velocity", "_neg_velocity_store", "cfg_scale", "cfg_limit"):
            setattr(self, name, None)
        self.size = None

