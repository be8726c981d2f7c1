"""Classifier-free guidance with diffusers' ZImagePipeline arguments.

A guided step runs two batch-1 passes of the same transformer, conditional and unconditional (the negative prompt,
"" by default), combined as diffusers does: pred = pos + g (pos - neg), optionally renormalised
(cfg_normalization) and switched off on the steps past cfg_truncation. The scale and the normalisation limit are
device scalars, so one recorded loop serves every scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zimage_trt.common.errors import UserError

from .scheduler import Schedule


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance with diffusers' ZImagePipeline arguments (guidance_scale, negative_prompt,
    cfg_normalization, cfg_truncation). scale <= 0 is no guidance: one pass per step, as in diffusers."""

    scale: float = 0.0
    negative_prompt: str = ""
    normalization: float = 0.0  # > 0: |pred| is capped at normalization * |pos|
    truncation: float = 1.0  # steps whose t_norm = (1000 - timestep) / 1000 exceeds it run unguided

    def __post_init__(self):
        for name in ("scale", "normalization", "truncation"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
                raise UserError(f"guidance {name} must be a finite number, got {value!r}")

    @property
    def active(self) -> bool:
        return self.scale > 0

    def guided_steps(self, schedule: Schedule) -> tuple[bool, ...]:
        """Which passes run guided (two transformer calls): all, less those past the truncation."""
        if not self.active:
            return (False,) * schedule.passes
        if self.truncation > 1:  # diffusers only truncates for cfg_truncation <= 1
            return (True,) * schedule.passes
        return tuple(float(t) <= self.truncation for t in schedule.model_t)


@dataclass(frozen=True)
class GuidedRun:
    """What a guided loop needs beyond the plan: the negative caption's padded length, the passes that are
    guided, and whether the result is renormalised. The scale and limit are device scalars of the runtime."""

    neg_lpad: int
    guided: tuple[bool, ...]
    normalize: bool


def combine_guidance(pos: torch.Tensor, neg: torch.Tensor, scale: torch.Tensor, limit: torch.Tensor,
                     normalize: bool) -> None:
    """pos <- pos + g (pos - neg), in place (neg is overwritten), as diffusers computes it; with normalisation,
    scaled down where |pred| exceeds limit * |pos| (branch-free, so it can be recorded: the factor is exactly 1 where
    diffusers leaves pred alone). `scale` and `limit` are 0-d device tensors."""
    if normalize:
        pos_norm = torch.linalg.vector_norm(pos)
    neg.sub_(pos).neg_()  # pos - neg (negation is exact)
    neg.mul_(scale)
    pos.add_(neg)
    if normalize:
        new_norm = torch.linalg.vector_norm(pos)
        max_norm = pos_norm * limit
        pos.mul_(torch.where(new_norm > max_norm, max_norm / new_norm, torch.ones_like(new_norm)))
