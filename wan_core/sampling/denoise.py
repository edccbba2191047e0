"""The denoising stage as every door runs it (pipeline, CLI, ComfyUI sampler node).

Around `sampling.sample`: the feature cache attached for the run (the last layer of
`wan_core.layers.stack`; its branch-aware predict chosen), an offloaded DiT brought to the GPU for the loop only, and a CUDA out-of-memory error
re-raised with the offload settings that would fit. One function, so the doors cannot drift.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .loop import Cond, StepInfo, guided_velocity, sample
from .schedulers import FlowScheduler

__all__ = ["denoise", "token_count"]


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
):
    """Run the sampler; returns (final latent, the cache's report or None).

    cache: a `wan_core.layers.cache.FeatureCache` (or None); predict: the guidance step, default
    `guided_velocity` (its branch-declaring twin when a cache is attached); wrap_predict: applied
    to the default (CFG parallel wraps it this way).
    """
    from ..layers.cache import feature_cache, guided_velocity_branches
    from ..layers.offload import dit_loaded, explain_oom

    if predict is None:
        predict = guided_velocity_branches if cache is not None else guided_velocity
        if wrap_predict is not None:
            predict = wrap_predict(predict)
    with torch.no_grad(), feature_cache(model, cache, num_steps=len(scheduler)):
        try:
            with dit_loaded(model, noise):  # an offloaded DiT on the GPU for the loop only
                latent = sample(model, noise, scheduler, cond, uncond, guidance, callback=callback, predict=predict)
        except torch.OutOfMemoryError as e:
            raise explain_oom(e, model, token_count(model, noise.shape)) from e
    return latent, (cache.report() if cache is not None else None)
