"""Wan2.2 A14B expert switching: the official boundary rule on the official grids, the step split,
per-expert guidance in the loop, and TI2V first-frame anchoring."""

import pytest
import torch

from wan_core.sampling.experts import OFFICIAL_BOUNDARY, Experts, ExpertSwitch
from wan_core.sampling.first_frame import FirstFrame
from wan_core.sampling.loop import Cond, sample
from wan_core.sampling.schedulers import make_scheduler
from wan_core.wan22 import expert_loras, model_defaults


@pytest.mark.parametrize(
    "task, shift, n_high, last_high, first_low",
    [("t2v", 12.0, 26, 877, 865), ("i2v", 5.0, 15, 902, None)],  # WAN22.md (official generate loop)
)
def test_boundary_on_the_official_40_step_grid(task, shift, n_high, last_high, first_low):
    sched = make_scheduler("unipc", 40, shift)
    plan = ExpertSwitch(boundary=OFFICIAL_BOUNDARY[task]).plan(sched.timesteps)
    assert sum(plan) == n_high and plan == [True] * n_high + [False] * (40 - n_high)  # high first, then low, once
    assert int(sched.timesteps[n_high - 1]) == last_high
    if first_low is not None:
        assert int(sched.timesteps[n_high]) == first_low
    assert all(t >= OFFICIAL_BOUNDARY[task] * 1000 for t in sched.timesteps[:n_high])


def test_step_split_and_bad_switches():
    sched = make_scheduler("distill", None, 5.0, [1000, 750, 500, 250])
    assert ExpertSwitch(step=2).plan(sched.timesteps) == [True, True, False, False]
    assert ExpertSwitch(step=0).plan(sched.timesteps) == [False] * 4
    with pytest.raises(ValueError, match="either a boundary"):
        ExpertSwitch(boundary=0.9, step=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ExpertSwitch(boundary=875)
    with pytest.raises(ValueError, match=">= 0"):
        ExpertSwitch(step=-1)


class _Recorder(torch.nn.Module):
    """A stand-in DiT: v = scale * x (half that for the context "u"); records (name, t, context) per call."""

    def __init__(self, name, scale, log):
        super().__init__()
        self.name, self.scale, self.log = name, scale, log
        self.cfg = type("cfg", (), {"patch_size": (1, 2, 2)})()

    def forward(self, x, t, context, clip_fea=None, y=None):
        self.log.append((self.name, t.clone(), context))
        return self.scale * x * (0.5 if context == "u" else 1.0)


def test_loop_hands_each_step_to_its_expert_with_its_guidance():
    log = []
    high, low = _Recorder("high", 0.5, log), _Recorder("low", 0.25, log)
    sched = make_scheduler("unipc", 6, 12.0)
    experts = Experts(high, low, ExpertSwitch(boundary=0.875), guidance_high=4.0, guidance_low=3.0)
    swaps = []
    x = torch.randn(1, 4, 1, 2, 2)
    sample(experts, x, sched, Cond("c"), Cond("u"), guidance=99.0, on_expert=swaps.append)
    plan = ExpertSwitch(boundary=0.875).plan(sched.timesteps)
    assert [name for name, _, ctx in log if ctx == "c"] == ["high" if h else "low" for h in plan]
    assert swaps == [high, low]  # one swap-in each, in order

    # guidance per expert: same result as a hand-written loop with the scale of each step's expert
    ref = x.float()
    sched.reset()
    for i, h in enumerate(plan):
        s, g = (0.5, 4.0) if h else (0.25, 3.0)
        v = 0.5 * s * ref + g * (s * ref - 0.5 * s * ref)  # v_u + g (v_c - v_u)
        ref = sched.step(v, i, ref)
    out = sample(experts, x, sched, Cond("c"), Cond("u"))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_first_frame_is_held_and_its_tokens_are_clean():
    log = []
    model = _Recorder("m", 0.3, log)
    z = torch.randn(1, 4, 1, 4, 6)
    sched = make_scheduler("unipc", 3, 5.0)
    out = sample(model, torch.randn(1, 4, 3, 4, 6), sched, Cond("c"), None, guidance=1.0, first_frame=FirstFrame(z))
    assert torch.equal(out[:, :, :1], z)  # latent frame 0 is exactly the image's latent
    t = log[0][1]
    assert t.shape == (1, 3 * 2 * 3)  # one timestep per token: F x h/2 x w/2
    assert (t[0, :6] == 0).all() and (t[0, 6:] == sched.timesteps[0]).all()


def test_per_expert_loras_and_defaults():
    split = expert_loras([
        {"name": "high_noise_model", "path": "h.safetensors", "strength": 1.0},
        {"name": "low_noise_model", "path": "l.safetensors", "strength": 0.5},
    ])  # fmt: skip
    assert split == {"high": [("h.safetensors", 1.0)], "low": [("l.safetensors", 0.5)]}
    with pytest.raises(ValueError, match="high_noise_model"):
        expert_loras([{"path": "x.safetensors"}])
    assert model_defaults("wan2.2_moe", "t2v")["sample_guide_scale"] == [4.0, 3.0]  # LightX2V order: [high, low]
    assert model_defaults("wan2.2_moe_distill", "i2v")["boundary_step_index"] == 2
    assert model_defaults("wan2.1", "t2v") == {}
