"""Wan2.2 run settings for the doors: LightX2V's `model_cls` names, the official defaults per model,
the expert switch and the per-expert LoRAs.

model_cls (LightX2V): "wan2.2_moe" (A14B T2V / I2V, two experts switched at the official
timestep boundary), "wan2.2_moe_distill" (the same with a 4-step distilled model or the
Lightning / lightx2v LoRAs, switched by step: `boundary_step_index`, default 2), "wan2.2"
(TI2V-5B, one model; task "t2v", or "i2v" with an image held as latent frame 0).
Defaults are the official configs' (wan/configs/wan_*_A14B.py, wan_ti2v_5B.py; LightX2V's
wan22 configs agree); a key the user gives wins.
"""

from __future__ import annotations

from collections.abc import Mapping

from .sampling.experts import OFFICIAL_BOUNDARY, ExpertSwitch

__all__ = ["WAN22_CLASSES", "MOE_CLASSES", "model_defaults", "expert_switch", "expert_loras", "EXPERT_NAMES"]

MOE_CLASSES = ("wan2.2_moe", "wan2.2_moe_distill")
WAN22_CLASSES = (*MOE_CLASSES, "wan2.2")
EXPERT_NAMES = {"high": "high_noise_model", "low": "low_noise_model"}  # LightX2V's lora_configs "name"s
DISTILL_STEPS = [1000, 750, 500, 250]

_DEFAULTS: dict[tuple[str, str], dict] = {
    # official: sample_shift, sample_steps, sample_guide_scale (low, high) -> LightX2V's [high, low]
    ("wan2.2_moe", "t2v"): dict(infer_steps=40, sample_shift=12.0, sample_guide_scale=[4.0, 3.0]),
    ("wan2.2_moe", "i2v"): dict(infer_steps=40, sample_shift=5.0, sample_guide_scale=[3.5, 3.5]),
    # LightX2V configs/distill/wan22/*: 4 steps, shift 5, no CFG, high-noise steps 0-1
    ("wan2.2_moe_distill", "t2v"): dict(denoising_step_list=DISTILL_STEPS, sample_shift=5.0, enable_cfg=False, boundary_step_index=2),
    ("wan2.2_moe_distill", "i2v"): dict(denoising_step_list=DISTILL_STEPS, sample_shift=5.0, enable_cfg=False, boundary_step_index=2),
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
