"""Sampler nodes: single GPU (WanSampler, optionally with feature caching) and several GPUs (WanMultiGPUSampler),
and what every sampler node shares: the text and image inputs and their checks, and `sample_here`, a
run in this process with progress, previews and cancel (the two-expert sampler: `sample_moe.py`)."""

from __future__ import annotations

import contextlib

from wan_core.api import (
    I2VCondition,
    ModelSpec,
    ParallelConfig,
    RunCancelled,
    SamplerSettings,
    TI2VCondition,
    context_from_conditioning,
    latent_to_raw,
    latent_to_rgb,
    preview_projection,
    run_sampler,
    run_sampler_on_workers,
)

from . import compat, stats
from .types import (
    CATEGORY,
    CONDITIONING,
    DISTILL_STEP_LIST,
    LATENT,
    WAN_CACHE,
    WAN_IMAGE_EMBEDS,
    WAN_MODEL,
    WAN_TEXT_EMBEDS,
    CacheSettings,
    ImageEmbeds,
    TextEmbeds,
)

SCHEDULERS = ["unipc", "euler", "distill"]
MAX_SIZE = 4096


def parse_step_list(text: str) -> list[int]:
    """'1000, 750, 500, 250' -> [1000, 750, 500, 250] (the scheduler checks the values)."""
    try:
        return [int(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(
            f"denoising_step_list must be comma-separated integers like {DISTILL_STEP_LIST!r}, got {text!r}"
        ) from e


def sampler_inputs() -> dict:
    return {
        "required": {
            "model": (WAN_MODEL,),
            "width": (
                "INT",
                {
                    "default": 832,
                    "min": 16,
                    "max": MAX_SIZE,
                    "step": 16,
                    "tooltip": "T2V; I2V takes it from WanImageEncode",
                },
            ),
            "height": (
                "INT",
                {
                    "default": 480,
                    "min": 16,
                    "max": MAX_SIZE,
                    "step": 16,
                    "tooltip": "T2V; I2V takes it from WanImageEncode",
                },
            ),
            "num_frames": (
                "INT",
                {"default": 81, "min": 1, "max": 1025, "step": 4, "tooltip": "4n+1; I2V takes it from WanImageEncode"},
            ),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000}),
            "guidance": (
                "FLOAT",
                {"default": 5.0, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip": "1 = no CFG (one DiT pass per step)"},
            ),
            "shift": (
                "FLOAT",
                {
                    "default": 5.0,
                    "min": 0.1,
                    "max": 100.0,
                    "step": 0.1,
                    "tooltip": "5 for T2V and I2V-720P, 3 for I2V-480P",
                },
            ),
            "scheduler": (
                SCHEDULERS,
                {"default": "unipc", "tooltip": "unipc: base model; distill: the 4-step lightx2v models/LoRAs"},
            ),
            "seed": ("INT", {"default": 42, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
            "denoising_step_list": ("STRING", {"default": DISTILL_STEP_LIST, "tooltip": "distill scheduler only"}),
        },
        "optional": {
            "text_embeds": (WAN_TEXT_EMBEDS, {"tooltip": "from WanTextEncode; or connect positive/negative instead"}),
            "positive": (CONDITIONING, {"tooltip": "instead of text_embeds: core CLIPTextEncode (CLIPLoader wan)"}),
            "negative": (CONDITIONING, {"tooltip": "instead of text_embeds: core CLIPTextEncode; guidance > 1"}),
            "image_embeds": (WAN_IMAGE_EMBEDS, {"tooltip": "I2V: from WanImageEncode"}),
        },
    }


def text_inputs(text_embeds: TextEmbeds | None, positive, negative, guidance: float):
    """(positive, negative) umT5 features [L, 4096] from WanTextEncode's embeds or from core CONDITIONING."""
    if text_embeds is not None:
        if positive is not None or negative is not None:
            raise ValueError(
                "connect either text_embeds (WanTextEncode) or positive/negative (CLIPTextEncode), not both"
            )
        return text_embeds.positive, text_embeds.negative
    if positive is None:
        raise ValueError(
            "no prompt: connect text_embeds (from WanTextEncode) or positive (from a core CLIPTextEncode, CLIPLoader type wan)"
        )
    if negative is None and guidance != 1.0:
        raise ValueError(
            "guidance > 1 needs a negative prompt: connect a CLIPTextEncode to negative (Wan's default negative "
            "prompt, or an empty one), or set guidance to 1"
        )
    neg = context_from_conditioning(negative) if negative is not None else None
    return context_from_conditioning(positive), neg


def check_run(model: ModelSpec, image_embeds: ImageEmbeds | None, width: int, height: int, num_frames: int):
    """The video size (frames, height, width) of the run and its image conditioning; clear errors for a
    wrong pairing. I2V needs image embeds made for its kind (Wan2.1: with CLIP tokens; Wan2.2 A14B:
    without); TI2V-5B takes them or not (text+image or text only); T2V takes none."""
    c = image_embeds.cond if image_embeds is not None else None
    if model.task == "i2v":
        if c is None:
            raise ValueError(
                "this is an image-to-video model: connect a WanImageEncode (with a start image) to the sampler's image_embeds"
            )
        if not isinstance(c, I2VCondition):
            raise ValueError(
                "image_embeds were made for TI2V-5B, not for this I2V model: encode the image with this model"
            )
        if (c.clip_fea is not None) != bool(model.clip):
            made, this = ("Wan2.1 I2V (with CLIP)", "Wan2.2 I2V-A14B (no CLIP)") if model.clip is None else (
                "Wan2.2 I2V-A14B (no CLIP)", "Wan2.1 I2V (with CLIP)")  # fmt: skip
            raise ValueError(
                f"image_embeds were made for {made} but this model is {this}: encode the image with this model"
            )
    elif model.task == "ti2v":
        if c is not None and not isinstance(c, TI2VCondition):
            raise ValueError(
                "image_embeds were made for an I2V model, not for TI2V-5B: encode the image with the TI2V-5B model"
            )
    elif c is not None:
        raise ValueError("image_embeds were given but the model is text-to-video: load an I2V model or disconnect them")
    if c is None:
        return (num_frames, height, width), None
    return (image_embeds.num_frames, c.height, c.width), c


def settings(
    steps, guidance, shift, scheduler, seed, denoising_step_list, cache: CacheSettings | None = None
) -> SamplerSettings:
    """The widgets as the engine's SamplerSettings (the step list is read for the distill scheduler only)."""
    step_list = tuple(parse_step_list(denoising_step_list)) if scheduler == "distill" else None
    cache_keys = cache.to_config() if cache is not None else None
    return SamplerSettings(steps, guidance, shift, scheduler, seed, step_list, cache_keys)


def previews(model: ModelSpec):
    """The latent -> RGB map for live previews, or None when the front end shows none."""
    return preview_projection(model) if compat.previews_enabled() and model.vae is not None else None


def cache_fields(report) -> dict:
    """The feature cache's numbers for a stage record (nothing without caching)."""
    if report is None:
        return {}
    return {"cache": report.summary(), "evaluations": report.evaluations, "skipped_evaluations": report.skipped_total}


def sample_here(model: ModelSpec, target, run: SamplerSettings, pos, neg, size, image, steps: int) -> dict:
    """One run in this process, as a sampler node returns it: a progress bar with the step count, live
    previews (through `model`'s VAE), cancel between steps, the timed "load DiT" and "sample" stages.

    target: what `run_sampler` samples: `model`, or the two experts (`wan_core.api.expert_pair`).
    """
    proj = previews(model)
    progress = compat.Progress(steps)
    records: list[dict] = []

    @contextlib.contextmanager
    def stage(name):  # the engine's "load DiT" and "sample" stages, timed for the front end
        with stats.stage(name, model.torch_device) as rec:
            records.append(rec)
            yield

    def on_step(info):
        image_ = compat.preview_payload(latent_to_rgb(info.x0, proj)) if proj is not None else None
        progress.update(info.step + 1, image_)

    result = run_sampler(target, run, pos, neg, size, image, on_step, stage)
    records[-1].update(steps=result.steps, seconds_per_step=round(records[-1]["seconds"] / result.steps, 3))
    records[-1].update(cache_fields(result.cache_report))
    if result.experts is not None:
        records[-1]["experts"] = result.experts
    out = {"samples": latent_to_raw(result.latent)}  # ComfyUI's LATENT convention: raw VAE latents
    return {"ui": stats.ui(*records), "result": (out,)}


class WanSampler:
    """Denoise a video latent with one model (Wan2.1, TI2V-5B, or one Wan2.2 expert alone): progress bar
    with the step count, live previews, cancel between steps."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (LATENT,)
    RETURN_NAMES = ("samples",)
    FUNCTION = "sample"
    DESCRIPTION = (
        "Base models: unipc, 50 steps (I2V 40), guidance 5, shift 5 (I2V-480P 3). "
        "4-step distill models/LoRAs: distill, 4 steps, guidance 1, shift 5, list 1000,750,500,250. "
        "Wan2.2 TI2V-5B: unipc, 50 steps, guidance 5, shift 5, 1280x704, 121 frames (24 fps)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        spec = sampler_inputs()
        spec["optional"]["cache"] = (WAN_CACHE, {"tooltip": "feature caching (base models): from WanCacheConfig"})
        return spec

    def sample(
        self,
        model: ModelSpec,
        text_embeds: TextEmbeds | None = None,
        width: int = 832,
        height: int = 480,
        num_frames: int = 81,
        steps: int = 50,
        guidance: float = 5.0,
        shift: float = 5.0,
        scheduler: str = "unipc",
        seed: int = 42,
        denoising_step_list: str = DISTILL_STEP_LIST,
        image_embeds: ImageEmbeds | None = None,
        cache: CacheSettings | None = None,
        positive=None,
        negative=None,
    ):
        pos, neg = text_inputs(text_embeds, positive, negative, guidance)
        size, image = check_run(model, image_embeds, width, height, num_frames)
        run = settings(steps, guidance, shift, scheduler, seed, denoising_step_list, cache)
        return sample_here(model, model, run, pos, neg, size, image, steps)


class WanMultiGPUSampler:
    """WanSampler over several GPUs (sequence parallel Ulysses/Ring, CFG parallel) with a persistent worker group.

    The workers (one process per GPU) receive the model description, not tensors, and build the
    DiT themselves from the same files; the group stays up between runs and is torn down and
    restarted after a worker error. On a machine without CUDA the workers run on the CPU (gloo).
    """

    CATEGORY = CATEGORY
    RETURN_TYPES = (LATENT,)
    RETURN_NAMES = ("samples",)
    FUNCTION = "sample"
    DESCRIPTION = "Multi-GPU sampling: num_gpus = (2 if cfg_parallel else 1) x ulysses_degree x ring_degree."

    @classmethod
    def INPUT_TYPES(cls):
        spec = sampler_inputs()
        spec["optional"]["cache"] = (WAN_CACHE, {"tooltip": "feature caching (base models): from WanCacheConfig"})
        spec["required"].update(parallel_inputs())
        return spec

    def sample(
        self,
        model: ModelSpec,
        text_embeds: TextEmbeds | None = None,
        width: int = 832,
        height: int = 480,
        num_frames: int = 81,
        steps: int = 50,
        guidance: float = 5.0,
        shift: float = 5.0,
        scheduler: str = "unipc",
        seed: int = 42,
        denoising_step_list: str = DISTILL_STEP_LIST,
        num_gpus: int = 2,
        ulysses_degree: int = 2,
        ring_degree: int = 1,
        cfg_parallel: bool = False,
        image_embeds: ImageEmbeds | None = None,
        cache: CacheSettings | None = None,
        positive=None,
        negative=None,
    ):
        pos, neg = text_inputs(text_embeds, positive, negative, guidance)
        size, i2v = check_run(model, image_embeds, width, height, num_frames)
        run = settings(steps, guidance, shift, scheduler, seed, denoising_step_list, cache)
        return sample_on_workers(model, run, pos, neg, size, i2v, steps, num_gpus, ulysses_degree, ring_degree,
                                 cfg_parallel)  # fmt: skip


def parallel_inputs() -> dict:
    """The worker group's widgets (both multi-GPU samplers)."""
    return {
        "num_gpus": ("INT", {"default": 2, "min": 1, "max": 64}),
        "ulysses_degree": ("INT", {"default": 2, "min": 1, "max": 64, "tooltip": "must divide the 40 heads"}),
        "ring_degree": ("INT", {"default": 1, "min": 1, "max": 64}),
        "cfg_parallel": ("BOOLEAN", {"default": False, "tooltip": "cond and uncond on two GPU groups"}),
    }


def sample_on_workers(target, run: SamplerSettings, pos, neg, size, image, steps: int, num_gpus: int,
                      ulysses_degree: int, ring_degree: int, cfg_parallel: bool) -> dict:  # fmt: skip
    """One run on the multi-GPU worker group, with progress, previews and cancel: the multi-GPU
    samplers' shared body. target: a model, or the two Wan2.2 experts (`expert_pair`)."""
    model = getattr(target, "high", target)  # the (first) model: device, preview projection
    parallel = ParallelConfig(cfg=2 if cfg_parallel else 1, ulysses=ulysses_degree, ring=ring_degree)
    if parallel.world_size != num_gpus:
        raise ValueError(
            f"num_gpus={num_gpus} but cfg ({parallel.cfg}) x ulysses ({ulysses_degree}) x ring ({ring_degree}) "
            f"= {parallel.world_size}; make them agree"
        )
    proj = previews(model)
    progress = compat.Progress(steps)
    interrupted: list[BaseException] = []

    def on_step(p):
        if interrupted:
            return
        image = compat.preview_payload(latent_to_rgb(p.x0, proj)) if proj is not None and p.x0 is not None else None
        try:
            progress.update(p.step + 1, image)  # raises on a cancel: remember it, stop the workers
        except BaseException as e:
            interrupted.append(e)

    with stats.stage("multi-GPU sample", model.torch_device) as rec:
        try:
            result = run_sampler_on_workers(
                target, run, pos, neg, size, parallel, image, on_step,
                cancel=lambda: bool(interrupted) or compat.cancel_requested(), preview=proj is not None,
            )  # fmt: skip
        except RunCancelled:
            if interrupted:
                raise interrupted[0] from None
            compat.check_interrupted()
            raise compat.Interrupted("run cancelled") from None
    rec.update(steps=result.steps, seconds_per_step=round(rec["seconds"] / result.steps, 3), gpus=num_gpus)
    rec.update(cache_fields(result.cache_report))
    return {"ui": stats.ui(rec), "result": ({"samples": latent_to_raw(result.latent)},)}
