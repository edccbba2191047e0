"""Wan2.2 run settings for the doors: LightX2V's `model_cls` names, the official defaults per model,
the expert switch and the per-expert LoRAs.

model_cls (LightX2V): "wan2.2_moe" (A14B T2V / I2V, two experts switched at the official
timestep boundary), "wan2.2_moe_distill" (the same with a 4-step distilled model or the
Lightning / lightx2v LoRAs, switched by step: `boundary_step_index`, default 2), "wan2.2"
(TI2V-5B, one model; task "t2v", or "i2v" with an image held as latent frame 0).
Defaults are the official configs' (wan/configs/wan_*_A14B.py, wan_ti2v_5B.py; LightX2V's
wan22 configs agree); a key the user gives wins.

For doors that take the two experts as two model descriptions (the ComfyUI two-expert sampler):
`switch_for` turns a mode ("boundary" | "step") and its value into an `ExpertSwitch` (0 = the
default: the official boundary, or half the steps), and `expert_pair` checks that two `ModelSpec`s
are the high- and low-noise experts of one A14B model (file headers and names only) and gives
each its own role, i.e. its own slot in the model cache.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from .loading.family import check_expert_pair
from .sampling.experts import OFFICIAL_BOUNDARY, ExpertSwitch
from .sampling.schedulers import DISTILL_STEPS
from .spec import ModelSpec

__all__ = [
    "WAN22_CLASSES", "MOE_CLASSES", "model_defaults", "expert_switch", "expert_loras", "EXPERT_NAMES",
    "SWITCH_MODES", "ExpertPair", "switch_for", "expert_pair",
]  # fmt: skip

MOE_CLASSES = ("wan2.2_moe", "wan2.2_moe_distill")
WAN22_CLASSES = (*MOE_CLASSES, "wan2.2")
EXPERT_NAMES = {"high": "high_noise_model", "low": "low_noise_model"}  # LightX2V's lora_configs "name"s

_DEFAULTS: dict[tuple[str, str], dict] = {
    # official: sample_shift, sample_steps, sample_guide_scale (low, high) -> LightX2V's [high, low]
    ("wan2.2_moe", "t2v"): dict(infer_steps=40, sample_shift=12.0, sample_guide_scale=[4.0, 3.0]),
    ("wan2.2_moe", "i2v"): dict(infer_steps=40, sample_shift=5.0, sample_guide_scale=[3.5, 3.5]),
    # LightX2V configs/distill/wan22/*: 4 steps, shift 5, no CFG, high-noise steps 0-1
    ("wan2.2_moe_distill", "t2v"): dict(denoising_step_list=list(DISTILL_STEPS), sample_shift=5.0, enable_cfg=False, boundary_step_index=2),
    ("wan2.2_moe_distill", "i2v"): dict(denoising_step_list=list(DISTILL_STEPS), sample_shift=5.0, enable_cfg=False, boundary_step_index=2),
    # TI2V-5B: 50 steps, shift 5, guide 5, 121 frames at 24 fps, 1280x704
    ("wan2.2", "t2v"): dict(infer_steps=50, sample_shift=5.0, sample_guide_scale=5.0, target_video_length=121,
                            fps=24, target_height=704, target_width=1280),
    ("wan2.2", "i2v"): dict(infer_steps=50, sample_shift=5.0, sample_guide_scale=5.0, target_video_length=121,
                            fps=24, target_height=704, target_width=1280),
}  # fmt: skip


def model_defaults(model_cls: str, task: str) -> dict:
    """The official settings of a Wan2.2 model for a task ({} for Wan2.1 classes)."""
    return dict(_DEFAULTS.get((model_cls, task), {}))


def expert_switch(cfg, task: str) -> ExpertSwitch:
    """The switch a config asks for: `boundary_step_index` (a step split) or `boundary` (default: the
    official one of the task); ValueError when both are given."""
    if cfg.boundary is not None and cfg.boundary_step_index is not None:
        raise ValueError(
            "give either boundary (switch experts by timestep) or boundary_step_index (switch by step), not both"
        )
    if cfg.boundary_step_index is not None:
        return ExpertSwitch(step=cfg.boundary_step_index)
    return ExpertSwitch(boundary=cfg.boundary if cfg.boundary is not None else OFFICIAL_BOUNDARY[task])


def expert_loras(lora_configs: list[Mapping] | None) -> dict[str, list[tuple[str, float]]]:
    """`lora_configs` of a two-expert run split by their "name" ("high_noise_model" /
    "low_noise_model", as LightX2V's configs name them) -> {"high": [(path, strength)], "low": [...]};
    an entry without a valid name is a ValueError (it would be unclear which expert it is for)."""
    out: dict[str, list[tuple[str, float]]] = {"high": [], "low": []}
    by_name = {v: k for k, v in EXPERT_NAMES.items()}
    for i, item in enumerate(lora_configs or []):
        name = item.get("name") if isinstance(item, Mapping) else None
        if name not in by_name:
            raise ValueError(
                f"lora_configs[{i}] needs \"name\": \"high_noise_model\" or \"low_noise_model\" in a two-expert "
                f"Wan2.2 run (each expert takes its own LoRA), got {name!r}"
            )
        strength = item.get("strength", 1.0)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise ValueError(f"lora_configs[{i}].strength must be a number, got {strength!r}")
        if not isinstance(item.get("path"), str) or not item["path"]:
            raise ValueError(f"lora_configs[{i}] needs a \"path\" to a LoRA file")
        out[by_name[name]].append((item["path"], float(strength)))
    return out


# ----------------------------------------------------------------------------- two model descriptions
SWITCH_MODES = ("boundary", "step")


@dataclass(frozen=True)
class ExpertPair:
    """The two A14B experts of one run, described (built and leased by the sampler): `high` and `low`
    carry their roles (`ModelSpec.expert`), `switch` splits the steps, each expert has its guidance."""

    high: ModelSpec
    low: ModelSpec
    switch: ExpertSwitch
    guidance_high: float = 1.0
    guidance_low: float = 1.0

    @property
    def guidances(self) -> tuple[float, float]:
        return self.guidance_high, self.guidance_low


def switch_for(mode: str, task: str, boundary: float = 0.0, step: int = 0, steps: int | None = None) -> ExpertSwitch:
    """The expert switch a sampler's settings ask for. mode "boundary": step i is the high-noise
    expert's while t_i >= boundary * 1000 (0: the official boundary of the task, T2V 0.875, I2V 0.9);
    mode "step": steps 0 .. step-1 are the high-noise expert's (0: half of `steps`, ComfyUI's 4-step
    templates: 2). A step split that leaves the low-noise expert no step is an error."""
    if mode not in SWITCH_MODES:
        raise ValueError(f"the expert switch is one of {SWITCH_MODES}, got {mode!r}")
    if task not in OFFICIAL_BOUNDARY:
        raise ValueError(f"two experts run Wan2.2 A14B T2V or I2V, not {task!r}")
    if mode == "boundary":
        if boundary < 0 or boundary > 1:
            raise ValueError(
                f"boundary is a fraction of the 1000 timesteps in (0, 1] (0: the official {OFFICIAL_BOUNDARY[task]}), "
                f"got {boundary}"
            )
        return ExpertSwitch(boundary=float(boundary) if boundary > 0 else OFFICIAL_BOUNDARY[task])
    if step < 0:
        raise ValueError(f"switch_step must be >= 0 (0: half the steps), got {step}")
    if step == 0:
        if steps is None:
            raise ValueError("switch_step 0 (half the steps) needs the step count")
        step = max(1, steps // 2)
    if steps is not None and step >= steps:
        raise ValueError(
            f"switch_step {step} puts all {steps} steps on the high-noise expert and none on the low-noise one: "
            f"use a switch step below {steps} (ComfyUI's 4-step templates: 2)"
        )
    return ExpertSwitch(step=int(step))


def _same_files(a, b) -> bool:
    norm = lambda p: tuple(os.path.realpath(x) for x in p) if isinstance(p, tuple) else os.path.realpath(p)  # noqa: E731
    return norm(a) == norm(b)


def expert_pair(
    high: ModelSpec,
    low: ModelSpec,
    mode: str = "boundary",
    boundary: float = 0.0,
    step: int = 0,
    steps: int | None = None,
    guidance_high: float = 1.0,
    guidance_low: float = 1.0,
) -> ExpertPair:
    """Check that `high` / `low` describe the high- and low-noise experts of one Wan2.2 A14B model and
    pair them with their roles (`ModelSpec.expert`: each its own cached DiT) and the switch
    `switch_for(mode, task, boundary, step, steps)`. One-line errors, before any weights are read:
    the same model twice, TI2V-5B (one model), experts of two tasks, a Wan2.1 DiT, the experts
    swapped, two architectures (`loading.family.check_expert_pair`), a switch that cannot work."""
    if _same_files(high.dit, low.dit):
        raise ValueError(
            f"the same model ({os.path.basename(os.fspath(high.dit if isinstance(high.dit, str) else high.dit[0]))}) "
            "is connected as both experts: load the high-noise expert for high_noise_model and the low-noise one "
            "for low_noise_model"
        )
    for spec, slot in ((high, "high_noise_model"), (low, "low_noise_model")):
        if spec.task == "ti2v":
            raise ValueError(
                f"{slot} is the Wan2.2 TI2V-5B model, which is one model, not an expert pair: sample it with "
                "WanSampler (Wan Sampler)"
            )
    if high.task != low.task:
        raise ValueError(
            f"high_noise_model is a {high.task.upper()} expert but low_noise_model is for {low.task.upper()}: give "
            "the two experts of one Wan2.2 A14B model (both T2V or both I2V)"
        )
    check_expert_pair(high.dit, low.dit, high.task)
    if high.clip or low.clip:  # a Wan2.2 expert has no CLIP branch; the loader names no CLIP file for it
        raise ValueError("Wan2.2 A14B uses no CLIP image encoder: set the loaders' clip_vision to (none)")
    switch = switch_for(mode, high.task, boundary, step, steps)
    return ExpertPair(high.replace(expert="high"), low.replace(expert="low"), switch, float(guidance_high),
                      float(guidance_low))  # fmt: skip
