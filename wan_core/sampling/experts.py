"""Wan2.2 A14B: two experts, one run. Which one evaluates each step, with which guidance.

The official code (wan/text2video.py `_prepare_model_for_timestep`) hands step i to the
high-noise expert while the scheduler's timestep t_i >= boundary * 1000 (T2V 0.875, I2V 0.900),
with guide_scale[1]; after that the low-noise expert with guide_scale[0]. LightX2V's
`wan2.2_moe_distill` and ComfyUI's own Wan2.2 templates split by step count instead (steps
0..k-1 high, the rest low; LightX2V's `boundary_step_index`, ComfyUI's KSamplerAdvanced end/start
step). `ExpertSwitch` is either rule; `Experts` pairs it with the two models and their scales.

Guidance order: LightX2V's config key `sample_guide_scale` is [high, low] (its MultiModelStruct
takes index 0 for the high-noise expert); the official config tuple is (low, high). Here the
scales are named fields, so neither order can be misread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ExpertSwitch", "Experts", "OFFICIAL_BOUNDARY"]

# Official `boundary` per A14B task (wan/configs/wan_t2v_A14B.py, wan_i2v_A14B.py)
OFFICIAL_BOUNDARY = {"t2v": 0.875, "i2v": 0.900}


@dataclass(frozen=True)
class ExpertSwitch:
    """Which expert runs step i: by timestep (`boundary`, a fraction of 1000) or by step (`step`).

    boundary: step i is the high-noise expert's while t_i >= boundary * num_train_timesteps.
    step: steps 0 .. step-1 are the high-noise expert's (0: all low, >= steps: all high).
    """

    boundary: float | None = None
    step: int | None = None
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if (self.boundary is None) == (self.step is None):
            raise ValueError("an expert switch takes either a boundary (timestep fraction) or a switch step, not both")
        if self.boundary is not None:
            b = self.boundary
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b <= 1.0:
                raise ValueError(f"boundary must be a number in [0, 1] (fraction of 1000 timesteps), got {b!r}")
        if self.step is not None and (isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0):
            raise ValueError(f"the expert switch step must be an integer >= 0, got {self.step!r}")

    def is_high(self, i: int, t: float) -> bool:
        """Step i (timestep t as handed to the model) belongs to the high-noise expert."""
        if self.step is not None:
            return i < self.step
        return float(t) >= self.boundary * self.num_train_timesteps

    def plan(self, timesteps: torch.Tensor) -> list[bool]:
        """[is_high] per step of a scheduler's timesteps."""
        return [self.is_high(i, float(t)) for i, t in enumerate(timesteps)]

    def describe(self, timesteps: torch.Tensor) -> str:
        n_high = sum(self.plan(timesteps))
        rule = f"t >= {self.boundary * self.num_train_timesteps:g}" if self.step is None else f"step < {self.step}"
        return f"{n_high} of {len(timesteps)} steps on the high-noise expert ({rule})"


@dataclass
class Experts:
    """The two A14B experts of one run and their guidance scales.

    `pick(i, t)` -> (model, guidance) for step i. Both are the same architecture; `high` takes the
    noisy early steps. `models` lists them high first (for layers applied to both).
    """

    high: torch.nn.Module
    low: torch.nn.Module
    switch: ExpertSwitch
    guidance_high: float = 1.0
    guidance_low: float = 1.0

    def pick(self, i: int, t: float) -> tuple[torch.nn.Module, float]:
        if self.switch.is_high(i, t):
            return self.high, self.guidance_high
        return self.low, self.guidance_low

    @property
    def models(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        return self.high, self.low

    @property
    def cfg(self):
        """The architecture (both experts share it)."""
        return self.high.cfg
