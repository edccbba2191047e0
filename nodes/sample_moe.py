"""The Wan2.2 A14B two-expert sampler: a high-noise and a low-noise model, as ComfyUI's own Wan2.2
templates wire them (two loaders, each with its own 4-step LoRA, then the steps split between them).

The split is the official one by default (`switch` "boundary": a step is the high-noise expert's
while its timestep t >= boundary * 1000; 0 = the official 0.875 for T2V, 0.900 for I2V) or by step
count (`switch` "step": steps 0 .. switch_step-1 on the high-noise expert, as ComfyUI's templates'
KSamplerAdvanced pair does with end/start step 2 of 4). Each expert has its own guidance scale.
Everything else is WanSampler's: the same inputs, checks, progress, previews and cancel.
"""

from __future__ import annotations

from wan_core.api import SWITCH_MODES, ModelSpec, expert_pair

from .sample import (
    SCHEDULERS,
    check_run,
    parallel_inputs,
    sample_here,
    sample_on_workers,
    sampler_inputs,
    settings,
    text_inputs,
)
from .types import CATEGORY, DISTILL_STEP_LIST, LATENT, WAN_MODEL, ImageEmbeds, TextEmbeds


def _cfg(expert: str, tip: str) -> tuple:
    return (
        "FLOAT",
        {"default": 1.0, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip": f"{expert} expert's guidance; {tip}"},
    )


def moe_inputs() -> dict:
    """WanSampler's inputs with two models, a guidance per expert and the switch (same widgets otherwise)."""
    base = sampler_inputs()
    req = base["required"]
    required = {
        "high_noise_model": (WAN_MODEL, {"tooltip": "the high-noise expert (…high_noise… file), with its LoRA"}),
        "low_noise_model": (WAN_MODEL, {"tooltip": "the low-noise expert (…low_noise… file), with its LoRA"}),
        **{k: req[k] for k in ("width", "height", "num_frames")},
        "steps": ("INT", {"default": 4, "min": 1, "max": 1000, "tooltip": "4 with the 4-step LoRAs; base: 40"}),
        "cfg_high": _cfg("high-noise", "1 = no CFG (4-step LoRAs); base T2V 4.0, I2V 3.5"),
        "cfg_low": _cfg("low-noise", "1 = no CFG (4-step LoRAs); base T2V 3.0, I2V 3.5"),
        "shift": (
            "FLOAT",
            {
                "default": 5.0,
                "min": 0.1,
                "max": 100.0,
                "step": 0.1,
                "tooltip": "5 (4-step LoRAs, base I2V); base T2V 12",
            },
        ),
        "scheduler": (
            SCHEDULERS,
            {"default": "distill", "tooltip": "distill: the 4-step LoRAs (list 1000,750,500,250); unipc: base models"},
        ),
        "switch": (
            list(SWITCH_MODES),
            {
                "default": "boundary",
                "tooltip": "boundary: by timestep (official); step: by step count (ComfyUI's templates)",
            },
        ),
        "boundary": (
            "FLOAT",
            {
                "default": 0.0,
                "min": 0.0,
                "max": 1.0,
                "step": 0.005,
                "tooltip": "boundary mode: high-noise expert while t >= boundary x 1000; "
                "0 = official (T2V 0.875, I2V 0.900)",
            },
        ),
        "switch_step": (
            "INT",
            {
                "default": 0,
                "min": 0,
                "max": 1000,
                "tooltip": "step mode: the steps before this one on the high-noise expert; 0 = half",
            },
        ),
        **{k: req[k] for k in ("seed", "denoising_step_list")},
    }
    return {"required": required, "optional": base["optional"]}


class WanSamplerMoE:
    """Denoise with the two Wan2.2 A14B experts: the high-noise one first, then the low-noise one."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (LATENT,)
    RETURN_NAMES = ("samples",)
    FUNCTION = "sample"
    DESCRIPTION = (
        "Wan2.2 A14B T2V / I2V with its two experts. 4-step LoRAs: distill, 4 steps, cfg 1 / 1, shift 5 "
        "(ComfyUI's templates: switch step 2). Base: unipc, 40 steps, boundary 0 (official); T2V cfg 4 / 3, "
        "shift 12; I2V cfg 3.5 / 3.5, shift 5."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return moe_inputs()

    def sample(
        self,
        high_noise_model: ModelSpec,
        low_noise_model: ModelSpec,
        text_embeds: TextEmbeds | None = None,
        width: int = 832,
        height: int = 480,
        num_frames: int = 81,
        steps: int = 4,
        cfg_high: float = 1.0,
        cfg_low: float = 1.0,
        shift: float = 5.0,
        scheduler: str = "distill",
        switch: str = "boundary",
        boundary: float = 0.0,
        switch_step: int = 0,
        seed: int = 42,
        denoising_step_list: str = DISTILL_STEP_LIST,
        image_embeds: ImageEmbeds | None = None,
        positive=None,
        negative=None,
    ):
        pair = expert_pair(high_noise_model, low_noise_model, switch, boundary, switch_step, steps, cfg_high, cfg_low)
        pos, neg = text_inputs(text_embeds, positive, negative, max(cfg_high, cfg_low))
        size, image = check_run(pair.high, image_embeds, width, height, num_frames)
        run = settings(steps, cfg_high, shift, scheduler, seed, denoising_step_list)
        return sample_here(pair.high, pair, run, pos, neg, size, image, steps)


class WanMultiGPUSamplerMoE(WanSamplerMoE):
    """The two-expert sampler on the multi-GPU worker group (Ulysses / Ring sequence parallel, CFG
    parallel): every worker leases both experts; each step runs on the expert the switch picks."""

    DESCRIPTION = "Wan2.2 A14B two experts on several GPUs: num_gpus = (2 if cfg_parallel else 1) x ulysses x ring."

    @classmethod
    def INPUT_TYPES(cls):
        spec = moe_inputs()
        spec["required"].update(parallel_inputs())
        return spec

    def sample(self, high_noise_model: ModelSpec, low_noise_model: ModelSpec, text_embeds: TextEmbeds | None = None,
               width: int = 832, height: int = 480, num_frames: int = 81, steps: int = 4, cfg_high: float = 1.0,
               cfg_low: float = 1.0, shift: float = 5.0, scheduler: str = "distill", switch: str = "boundary",
               boundary: float = 0.0, switch_step: int = 0, seed: int = 42,
               denoising_step_list: str = DISTILL_STEP_LIST, num_gpus: int = 2, ulysses_degree: int = 2,
               ring_degree: int = 1, cfg_parallel: bool = False, image_embeds: ImageEmbeds | None = None,
               positive=None, negative=None):  # fmt: skip
        pair = expert_pair(high_noise_model, low_noise_model, switch, boundary, switch_step, steps, cfg_high, cfg_low)
        pos, neg = text_inputs(text_embeds, positive, negative, max(cfg_high, cfg_low))
        size, image = check_run(pair.high, image_embeds, width, height, num_frames)
        run = settings(steps, cfg_high, shift, scheduler, seed, denoising_step_list)
        return sample_on_workers(pair, run, pos, neg, size, image, steps, num_gpus, ulysses_degree, ring_degree,
                                 cfg_parallel)  # fmt: skip
