"""The runtime's schedule equals the installed diffusers' for Z-Image, and zero-length steps are not run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zimage_trt.runtime.scheduler import flow_match_schedule


def diffusers_schedule(steps: int, sigmas=None):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    sched.set_timesteps(steps, sigmas=sigmas if sigmas is not None else get_default_z_image_sigmas(steps), mu=0.0)
    return sched


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 9, 20, 50])
def test_sigmas_and_timesteps_equal_diffusers(steps):
    ref = diffusers_schedule(steps)
    ours = flow_match_schedule(steps, shift=3.0)
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    # What the pipeline hands the transformer: (1000 - t) / 1000 in float32.
    np.testing.assert_array_equal(ours.model_t, ((1000 - ref.timesteps) / 1000).numpy())
    assert ours.passes == steps


def test_nine_steps_make_nine_transformer_calls():
    s = flow_match_schedule(9, shift=3.0)
    assert s.passes == 9
    assert s.sigmas[0] == 1.0 and s.sigmas[-1] == 0.0
    np.testing.assert_allclose(
        s.sigmas, [1, 0.96, 0.913, 0.8571, 0.7895, 0.7059, 0.6, 0.4615, 0.2727, 0], atol=1e-4
    )
    assert (s.dt < 0).all()


def test_zero_length_step_is_dropped_and_changes_nothing():
    # Custom sigmas that end in 0: the scheduler appends another 0, so its last step has length zero.
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]
    ref = diffusers_schedule(len(sigmas), sigmas)
    ours = flow_match_schedule(len(sigmas), 3.0, sigmas=sigmas)
    assert len(ref.timesteps) == 5
    assert ours.passes == 4  # diffusers would call the transformer 5 times
    # Euler over the reference schedule with any velocity equals ours with the zero step removed.
    x = torch.zeros(3)
    v = torch.tensor([1.0, -2.0, 0.5])
    ref_x = x.clone()
    for i in range(len(ref.timesteps)):
        ref_x = ref_x + (ref.sigmas[i + 1] - ref.sigmas[i]) * (-v)
    our_x = x.clone()
    for dt in ours.dt:
        our_x = our_x + torch.tensor(dt) * (-v)
    torch.testing.assert_close(our_x, ref_x, rtol=0, atol=0)
