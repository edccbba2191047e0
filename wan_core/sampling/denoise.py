"""The denoising stage as every door runs it (pipeline, CLI, ComfyUI sampler node).

Around `sampling.sample`: the feature cache attached for the run (the last layer of
`wan_core.layers.stack`; its branch-aware predict chosen), an offloaded DiT brought to the GPU for the loop only, and a CUDA out-of-memory error
re-raised with the offload settings that would fit. One function, so the doors cannot drift.

`SampleRequest` + `denoise_request` are the same stage described as data: what a door (the
ComfyUI sampler node, each rank of the multi-GPU worker group) hands over, the feature cache
given as its config keys so every process builds its own for the model it holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from .experts import Experts
from .first_frame import FirstFrame
from .loop import Cond, StepInfo, guided_velocity, sample
from .schedulers import FlowScheduler

__all__ = ["denoise", "denoise_request", "make_feature_cache", "SampleRequest", "token_count"]


@dataclass
class SampleRequest:
    """One sampling run besides the model (all picklable and small: it travels to worker processes).

    noise: [B, 16, F, H, W] float32; scheduler: a `wan_core.sampling.schedulers` scheduler (reset
    at the start); cond/uncond: `Cond` (moved to the model's device by `denoise_request`);
    preview: the worker group sends x0 (CPU float32) with every progress message; cache: feature
    caching keys as LightX2V names them (`feature_caching`, `teacache_thresh`, ...; see
    `wan_core.layers.cache.config`), None for no caching; first_frame: TI2V-5B image conditioning
    (the image's latent held as latent frame 0), None for none.
    """

    noise: torch.Tensor
    scheduler: Any
    cond: Cond
    uncond: Cond | None = None
    guidance: float = 5.0
    preview: bool = False
    cache: Mapping | None = None
    first_frame: FirstFrame | None = None

    def to(self, device) -> SampleRequest:
        """The request with its tensors on `device`."""
        first = self.first_frame.to(device) if self.first_frame is not None else None
        return replace(self, noise=self.noise.to(device), cond=_cond_to(self.cond, device),
                       uncond=_cond_to(self.uncond, device), first_frame=first)  # fmt: skip


def _cond_to(c: Cond | None, device) -> Cond | None:
    if c is None:
        return None

    def move(v):
        return v.to(device) if isinstance(v, torch.Tensor) else v

    ctx = [move(x) for x in c.context] if isinstance(c.context, (list, tuple)) else move(c.context)
    return Cond(ctx, move(c.clip_fea), move(c.y))


def make_feature_cache(model, cache: Mapping | None, latent_shape, num_steps: int):
    """A fresh `FeatureCache` for one run of `model` on a latent [B, C, F, h, w] (None: no caching).

    The published table is chosen from the DiT and the video size unless the keys name one; a
    model without one is a ValueError here, before any step runs.
    """
    if not cache or (cache.get("feature_caching") or "NoCaching") == "NoCaching":
        return None
    from ..layers.cache import cache_from_config, published_model_key

    key = published_model_key(model.cfg, latent_shape[-2] * 8, latent_shape[-1] * 8)
    return cache_from_config({**cache, "infer_steps": num_steps}, key)


def token_count(model, latent_shape) -> int:
    """DiT tokens of a latent [B, C, F, H, W] (the activation size the offload planner needs)."""
    pt, ph, pw = model.cfg.patch_size
    b, _, f, h, w = latent_shape
    return b * (f // pt) * (h // ph) * (w // pw)


def denoise(
    model,
    noise: torch.Tensor,
    scheduler: FlowScheduler,
    cond: Cond,
    uncond: Cond | None,
    guidance: float,
    cache=None,
    callback: Callable[[StepInfo], None] | None = None,
    predict: Callable | None = None,
    wrap_predict: Callable[[Callable], Callable] | None = None,
    first_frame: FirstFrame | None = None,
):
    """Run the sampler; returns (final latent, the cache's report or None).

    model: a DiT or Wan2.2 `Experts` (an offloaded expert is on the GPU for its own steps only:
    the swap happens at the switch); cache: a `wan_core.layers.cache.FeatureCache` (or None);
    predict: the guidance step, default `guided_velocity` (its branch-declaring twin when a cache
    is attached); wrap_predict: applied to the default (CFG parallel wraps it this way);
    first_frame: TI2V-5B image conditioning.
    """
    from ..layers.cache import feature_cache, guided_velocity_branches
    from ..layers.offload import explain_oom

    experts = isinstance(model, Experts)
    if experts and cache is not None:
        raise ValueError("feature caching (TeaCache / MagCache) is not available for the two-expert Wan2.2 A14B models")
    if predict is None:
        predict = guided_velocity_branches if cache is not None else guided_velocity
        if wrap_predict is not None:
            predict = wrap_predict(predict)
    first = model.high if experts else model
    with torch.no_grad(), feature_cache(first, cache, num_steps=len(scheduler)), _Residency(noise) as residency:
        try:
            latent = sample(model, noise, scheduler, cond, uncond, guidance, callback=callback, predict=predict,
                            first_frame=first_frame, on_expert=residency.activate)  # fmt: skip
        except torch.OutOfMemoryError as e:
            raise explain_oom(e, residency.current or first, token_count(first, noise.shape)) from e
    return latent, (cache.report() if cache is not None else None)


class _Residency:
    """The running model's weights on its device, one model at a time: an offloaded DiT is brought
    in (`layers.offload.dit_loaded`) before its first step and let go when another model takes
    over (the Wan2.2 expert swap) or the loop ends, so the GPU is free for the VAE after."""

    def __init__(self, noise: torch.Tensor):
        self.noise = noise
        self.current = None
        self._stack = contextlib.ExitStack()

    def activate(self, model) -> None:
        from ..layers.offload import dit_loaded

        self._stack.close()  # the previous model's weights go back first (two may not fit)
        self.current = model
        self._stack.enter_context(dit_loaded(model, self.noise))

    def __enter__(self) -> _Residency:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def denoise_request(
    model,
    req: SampleRequest,
    callback: Callable[[StepInfo], None] | None = None,
    wrap_predict: Callable[[Callable], Callable] | None = None,
    device=None,
):
    """`denoise` for a `SampleRequest`: its tensors moved to `device` (None: left where they are),
    its feature cache built for this model; returns (final latent, cache report or None)."""
    if device is not None:
        req = req.to(device)
    cache = make_feature_cache(model, req.cache, req.noise.shape, len(req.scheduler))
    return denoise(model, req.noise, req.scheduler, req.cond, req.uncond, req.guidance, cache, callback,
                   wrap_predict=wrap_predict, first_frame=req.first_frame)  # fmt: skip
