"""The lean loop: prompt -> tokens -> text encoder -> transformer passes -> VAE -> image.

It owns every buffer, allocated once at the bundle's sizes; each generation only fills them. On a GPU with
capturable sessions (TensorRT, eager PyTorch) the whole denoising loop, all passes and Euler updates, is
recorded once per (step count, caption length) in a CUDA graph and replayed, so the host does constant work
per image whatever the step count or the image size. The only host sync is reading the finished image back.

Verbs, in the order `generate` calls them: tokenize, encode_prompt, init_latents, denoise, decode.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zimage_trt.errors import UserError

from .bundle import Bundle
from .scheduler import Schedule, flow_match_schedule
from .tokenizer import PromptTokenizer

MAX_CUDA_GRAPHS = 16  # one per padded caption length (512 / 32) for the default step count


@dataclass
class Plan:
    """A schedule and its rows on the device: each step reads its row, so a recorded loop replays it exactly."""

    schedule: Schedule
    t_rows: list  # [1]-shaped views: the transformer's timestep of each pass
    neg_dt_rows: list  # 0-d views: -(sigma_next - sigma) of each pass


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
    ):
        self.bundle = bundle
        self.device = torch.device(device)
        self.text_encoder = sessions["text_encoder"]
        self.transformer = sessions["transformer"]
        self.vae = sessions["vae_decoder"]
        self.tokenizer = PromptTokenizer(bundle.root / "tokenizer", bundle.max_caption_tokens)
        self.generator_device = generator_device
        self.default_steps = steps or bundle.scheduler["default_steps"]
        self.use_cuda_graph = (
            cuda_graph and self.device.type == "cuda" and getattr(self.transformer, "capturable", False)
        )
        self._graphs: OrderedDict[tuple[int, int], torch.cuda.CUDAGraph] = OrderedDict()
        self._plans: dict[int, Plan] = {}
        self._allocate()
        self._plans[self.default_steps] = self._make_plan(self.default_steps, sigmas)

    # ---------------------------------------------------------------- buffers
    def _allocate(self) -> None:
        b, dev = self.bundle, self.device
        self.ids = torch.zeros(1, b.max_caption_tokens, dtype=torch.int64, device=dev)
        self.caption = torch.zeros(1, b.max_caption_tokens, b.caption_dim, dtype=torch.float32, device=dev)
        self.cap_len = torch.zeros(1, dtype=torch.int64, device=dev)
        self.latents = torch.zeros(b.latent_shape, dtype=torch.float32, device=dev)
        self.velocity = torch.zeros_like(self.latents)
        self.timestep = torch.zeros(1, dtype=torch.float32, device=dev)
        self.image = torch.zeros(1, 3, b.height, b.width, dtype=torch.float32, device=dev)

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

    # ---------------------------------------------------------------- verbs
    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def encode_prompt(self, ids: list[int]) -> int:
        """Run the text encoder into the caption buffer; returns the padded caption length."""
        n = len(ids)
        if not 0 < n <= self.bundle.max_caption_tokens:
            raise UserError(f"a prompt must give 1..{self.bundle.max_caption_tokens} tokens, got {n}")
        self.ids[0, :n].copy_(torch.tensor(ids, dtype=torch.int64), non_blocking=True)
        self.text_encoder.run({"input_ids": self.ids[:, :n]}, {"features": self.caption[:, :n]})
        self.cap_len.fill_(n)
        return self.bundle.padded_caption_length(n)

    def init_latents(self, seed: int) -> None:
        """The reference's initial noise: randn in float32 from a generator seeded on `generator_device`."""
        gen = torch.Generator(self.generator_device).manual_seed(int(seed))
        noise = torch.randn(self.bundle.latent_shape, generator=gen, device=self.generator_device)
        self.latents.copy_(noise)

    def _feeds(self, lpad: int) -> dict:
        return {
            "latents": self.latents,
            "timestep": self.timestep,
            "cap_feats": self.caption[:, :lpad],
            "cap_len": self.cap_len,
        }

    def _denoise_eager(self, lpad: int, plan: Plan) -> None:
        feeds, out = self._feeds(lpad), {"velocity": self.velocity}
        for t_row, neg_dt in zip(plan.t_rows, plan.neg_dt_rows):
            self.timestep.copy_(t_row)
            self.transformer.run(feeds, out)
            # Euler: x + dt * (-v); sign flips are exact, so this equals the reference bit for bit.
            self.velocity.mul_(neg_dt)
            self.latents.add_(self.velocity)

    def _graph_for(self, lpad: int, plan: Plan) -> "torch.cuda.CUDAGraph":
        key = (plan.schedule.passes, lpad)
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            return graph
        # One eager pass first: engines and kernels initialise lazily, and that must not land in the graph.
        self.transformer.run(self._feeds(lpad), {"velocity": self.velocity})
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._denoise_eager(lpad, plan)
        self._graphs[key] = graph
        if len(self._graphs) > MAX_CUDA_GRAPHS:
            self._graphs.popitem(last=False)
        return graph

    def denoise(self, lpad: int, steps: int | None = None) -> None:
        """All transformer passes and Euler steps over self.latents, in place."""
        plan = self.plan(steps)
        if self.use_cuda_graph:
            self._graph_for(lpad, plan).replay()
        else:
            self._denoise_eager(lpad, plan)

    def decode(self) -> np.ndarray:
        """VAE decode of self.latents -> HxWx3 uint8, rounded as diffusers' numpy_to_pil rounds."""
        self.vae.run({"latents": self.latents}, {"image": self.image})
        pixels = (self.image[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
        return pixels.cpu().numpy()  # the one host sync of a generation

    def generate(self, prompt: str, seed: int = 0, steps: int | None = None) -> np.ndarray:
        ids = self.tokenize(prompt)
        lpad = self.encode_prompt(ids)
        self.init_latents(seed)
        self.denoise(lpad, steps)
        return self.decode()


def save_png(pixels: np.ndarray, path) -> None:
    """Write an HxWx3 uint8 array as PNG, atomically (a temp file renamed into place)."""
    from PIL import Image

    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(pixels).save(tmp, format="PNG")
    os.replace(tmp, path)
