"""FlowMatch Euler with a fixed shift, in plain Python and float32, equal to diffusers' for Z-Image.

diffusers 0.42 (ZImagePipeline + FlowMatchEulerDiscreteScheduler, use_dynamic_shifting=False):
    sigmas    = linspace(1, 1/n, n) in float32, shifted by  s*sigma / (1 + (s-1)*sigma),  then 0 appended
    timesteps = sigmas[:-1] * 1000;  the transformer is given t = (1000 - timestep) / 1000
    step i:     x <- x + (sigma[i+1] - sigma[i]) * (-velocity)
n steps make n transformer calls (9 for "9 steps"). A step whose two sigmas are equal would move nothing; it is
dropped from the plan instead of costing a transformer pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Schedule:
    sigmas: np.ndarray  # [n + 1] float32, last is 0
    timesteps: np.ndarray  # [n] float32, sigma * num_train_timesteps (the scheduler's timesteps)
    model_t: np.ndarray  # [k] float32, what the transformer is given at each step that runs
    dt: np.ndarray  # [k] float32, sigma_next - sigma of each step that runs

    @property
    def passes(self) -> int:
        return len(self.model_t)


def flow_match_schedule(
    steps: int, shift: float, num_train_timesteps: int = 1000, sigmas: list[float] | None = None
) -> Schedule:
    """The schedule for `steps` steps, or for custom unshifted `sigmas` (as the pipeline's `sigmas=` argument)."""
    if sigmas is not None:
        base = np.array(sigmas).astype(np.float32)
    else:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        base = np.array(torch.linspace(1.0, 1.0 / steps, steps).tolist()).astype(np.float32)
    shift = float(shift)
    sigmas = shift * base / (1 + (shift - 1) * base)  # float32 throughout (python floats are weak scalars)
    sigmas = np.append(sigmas.astype(np.float32), np.float32(0.0))
    timesteps = (torch.from_numpy(sigmas[:-1]) * num_train_timesteps).numpy()
    ts = torch.from_numpy(timesteps)
    model_t = ((num_train_timesteps - ts) / num_train_timesteps).numpy()
    dt = (torch.from_numpy(sigmas[1:]) - torch.from_numpy(sigmas[:-1])).numpy()
    runs = dt != 0
    return Schedule(sigmas, timesteps, model_t[runs].copy(), dt[runs].copy())
