"""Sampler nodes: single GPU (WanSampler, optionally with feature caching) and several GPUs (WanMultiGPUSampler)."""

from __future__ import annotations

import contextlib
import threading

import torch

from wan_core.layers.cache import cache_from_config, published_model_key
from wan_core.model_cache import build_vae, component_loaded, lease
from wan_core.models.vae import latent_to_raw
from wan_core.sampling.denoise import denoise
from wan_core.sampling.loop import Cond, latent_shape, make_noise
from wan_core.sampling.preview import fit_rgb_projection, latent_to_rgb
from wan_core.sampling.schedulers import make_scheduler
from wan_core.spec import ModelSpec

from . import compat, stats
from .types import (
    CATEGORY,
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

_projections: dict = {}
_projections_lock = threading.Lock()


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
            "text_embeds": (WAN_TEXT_EMBEDS,),
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
        "optional": {"image_embeds": (WAN_IMAGE_EMBEDS, {"tooltip": "I2V: from WanImageEncode"})},
    }


def _projection(model: ModelSpec):
    """The VAE's latent -> RGB preview map, fitted once per VAE file."""
    key = (model.vae, str(model.torch_vae_dtype), model.torch_device)
    with _projections_lock:
        if key not in _projections:
            with component_loaded(build_vae(model), model, "vae") as vae:
                _projections[key] = fit_rgb_projection(vae)
        return _projections[key]


def check_run(model: ModelSpec, image_embeds: ImageEmbeds | None, width: int, height: int, num_frames: int):
    """The latent shape [C, F, h, w] of the run and its I2V tensors; clear errors for a wrong pairing."""
    if model.task == "i2v":
        if image_embeds is None:
            raise ValueError(
                "this is an image-to-video model: connect a WanImageEncode (with a start image) to the sampler's image_embeds"
            )
        c = image_embeds.cond
        return latent_shape(image_embeds.num_frames, c.height, c.width), c
    if image_embeds is not None:
        raise ValueError("image_embeds were given but the model is text-to-video: load an I2V model or disconnect them")
    return latent_shape(num_frames, height, width), None


class WanSampler:
    """Denoise a Wan2.1 video latent: progress bar with the step count, live previews, cancel between steps."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (LATENT,)
    RETURN_NAMES = ("samples",)
    FUNCTION = "sample"
    DESCRIPTION = (
        "Base models: unipc, 50 steps (I2V 40), guidance 5, shift 5 (I2V-480P 3). "
        "4-step distill models/LoRAs: distill, 4 steps, guidance 1, shift 5, list 1000,750,500,250."
    )

    @classmethod
    def INPUT_TYPES(cls):
        spec = sampler_inputs()
        spec["optional"]["cache"] = (WAN_CACHE, {"tooltip": "feature caching (base models): from WanCacheConfig"})
        return spec

    def sample(
        self,
        model: ModelSpec,
        text_embeds: TextEmbeds,
        width: int,
        height: int,
        num_frames: int,
        steps: int,
        guidance: float,
        shift: float,
        scheduler: str,
        seed: int,
        denoising_step_list: str = DISTILL_STEP_LIST,
        image_embeds: ImageEmbeds | None = None,
        cache: CacheSettings | None = None,
    ):
        shape, i2v = check_run(model, image_embeds, width, height, num_frames)
        step_list = parse_step_list(denoising_step_list) if scheduler == "distill" else None
        sched = make_scheduler(scheduler, steps, shift, step_list)
        with contextlib.ExitStack() as held:
            with stats.stage("load DiT", model.torch_device) as load_rec:
                dit = held.enter_context(lease(model))  # the shared DiT at this model's LoRAs, held for the run
            fc = None
            if cache is not None:  # checked before sampling: a table the model lacks is an error now
                key = published_model_key(dit.cfg, shape[-2] * 8, shape[-1] * 8)
                fc = cache_from_config({**cache.to_config(), "infer_steps": len(sched)}, key)
            device = torch.device(model.torch_device)  # an offloaded DiT's weights live in CPU memory between runs
            progress = compat.Progress(len(sched))
            previews = compat.previews_enabled() and model.vae is not None
            proj = _projection(model) if previews else None

            def on_step(info):
                image = compat.preview_payload(latent_to_rgb(info.x0, proj)) if proj is not None else None
                progress.update(info.step + 1, image)

            kw = {"clip_fea": i2v.clip_fea.to(device), "y": i2v.y.to(device)} if i2v is not None else {}
            cond = Cond(context=[text_embeds.positive.to(device)], **kw)
            uncond = Cond(context=[text_embeds.negative.to(device)], **kw) if guidance != 1.0 else None
            with stats.stage("sample", device) as rec:
                noise = make_noise((1, *shape), seed, device=device)
                with torch.inference_mode():
                    latent, report = denoise(dit, noise, sched, cond, uncond, guidance, fc, callback=on_step)
        rec["steps"] = len(sched)
        rec["seconds_per_step"] = round(rec["seconds"] / len(sched), 3)
        if report is not None:
            rec.update(cache=report.summary(), evaluations=report.evaluations, skipped_evaluations=report.skipped_total)
        out = {"samples": latent_to_raw(latent).cpu()}  # ComfyUI's LATENT convention: raw VAE latents
        return {"ui": stats.ui(load_rec, rec), "result": (out,)}


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
        spec["required"].update(
            {
                "num_gpus": ("INT", {"default": 2, "min": 1, "max": 64}),
                "ulysses_degree": ("INT", {"default": 2, "min": 1, "max": 64, "tooltip": "must divide the 40 heads"}),
                "ring_degree": ("INT", {"default": 1, "min": 1, "max": 64}),
                "cfg_parallel": ("BOOLEAN", {"default": False, "tooltip": "cond and uncond on two GPU groups"}),
            }
        )
        return spec

    def sample(
        self,
        model: ModelSpec,
        text_embeds: TextEmbeds,
        width: int,
        height: int,
        num_frames: int,
        steps: int,
        guidance: float,
        shift: float,
        scheduler: str,
        seed: int,
        denoising_step_list: str = DISTILL_STEP_LIST,
        num_gpus: int = 2,
        ulysses_degree: int = 2,
        ring_degree: int = 1,
        cfg_parallel: bool = False,
        image_embeds: ImageEmbeds | None = None,
    ):
        from wan_core.layers.parallel.group import ParallelConfig
        from wan_core.layers.parallel.workers import RunCancelled, SampleRequest, get_worker_group

        shape, i2v = check_run(model, image_embeds, width, height, num_frames)
        step_list = parse_step_list(denoising_step_list) if scheduler == "distill" else None
        sched = make_scheduler(scheduler, steps, shift, step_list)
        parallel = ParallelConfig(cfg=2 if cfg_parallel else 1, ulysses=ulysses_degree, ring=ring_degree)
        if parallel.world_size != num_gpus:
            raise ValueError(
                f"num_gpus={num_gpus} but cfg ({parallel.cfg}) x ulysses ({ulysses_degree}) x ring ({ring_degree}) "
                f"= {parallel.world_size}; make them agree"
            )
        if cfg_parallel and guidance == 1.0:
            raise ValueError("cfg_parallel needs guidance > 1 (there is no unconditional branch to run in parallel)")
        device = model.torch_device
        kw = {"clip_fea": i2v.clip_fea, "y": i2v.y} if i2v is not None else {}
        cond = Cond(context=[text_embeds.positive], **kw)
        uncond = Cond(context=[text_embeds.negative], **kw) if guidance != 1.0 else None
        previews = compat.previews_enabled() and model.vae is not None
        proj = _projection(model) if previews else None
        progress = compat.Progress(len(sched))
        interrupted: list[BaseException] = []

        def on_step(p):
            if interrupted:
                return
            image = compat.preview_payload(latent_to_rgb(p.x0, proj)) if proj is not None and p.x0 is not None else None
            try:
                progress.update(p.step + 1, image)  # raises on a cancel: remember it, stop the workers
            except BaseException as e:
                interrupted.append(e)

        request = SampleRequest(make_noise((1, *shape), seed), sched, cond, uncond, guidance, preview=proj is not None)
        with stats.stage("multi-GPU sample", device) as rec:
            group = get_worker_group(num_gpus, parallel, device="cuda" if device.startswith("cuda") else "cpu")
            try:
                latent = group.run(
                    model, request, on_step, cancel=lambda: bool(interrupted) or compat.cancel_requested()
                )
            except RunCancelled:
                if interrupted:
                    raise interrupted[0] from None
                compat.check_interrupted()
                raise compat.Interrupted("run cancelled") from None
        rec.update(steps=len(sched), seconds_per_step=round(rec["seconds"] / len(sched), 3), gpus=num_gpus)
        return {"ui": stats.ui(rec), "result": ({"samples": latent_to_raw(latent).cpu()},)}
