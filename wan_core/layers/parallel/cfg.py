"""CFG parallel: the conditional and unconditional DiT evaluations of a step on two rank groups.

Replaces `wan_core.sampling.loop.guided_velocity` as the `predict` of `sample`. Ranks with cfg index 0
evaluate the conditional branch, index 1 the unconditional one; one all-gather of the two
float32 velocities across the cfg group lets every rank form v_u + g (v_c - v_u) with the same
arithmetic as one process, so the latents stay identical on all ranks and no broadcast is needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from ...sampling.loop import Cond, guided_velocity
from .group import ParallelGroups

__all__ = ["cfg_parallel_predict"]


def cfg_parallel_predict(groups: ParallelGroups, base: Callable = guided_velocity) -> Callable:
    """A `predict(model, x, t, cond, uncond, guidance)` for `sample` on this rank's cfg group.

    With cfg degree 1 it is `base` (e.g. `cache.guided_velocity_branches` when a feature cache
    is attached). Without guidance (guidance 1 or no uncond) both groups evaluate the
    conditional branch through `base` and nothing is exchanged. Each rank's model call runs
    inside `cache_branch(...)` so an attached feature cache keys its state by the right branch.
    """
    if groups.config.cfg == 1:
        return base
    from ..cache.layer import COND, UNCOND, cache_branch

    def predict(model, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond | None, guidance: float) -> torch.Tensor:
        if uncond is None or guidance == 1.0:
            return base(model, x, t, cond, None, guidance)
        mine, branch = (cond, COND) if groups.cfg_rank == 0 else (uncond, UNCOND)
        with cache_branch(branch):
            v = model(x, t, mine.context, clip_fea=mine.clip_fea, y=mine.y).float().contiguous()
        both = [torch.empty_like(v) for _ in range(2)]
        dist.all_gather(both, v, group=groups.cfg_group)  # [v_cond, v_uncond]
        v_c, v_u = both
        return v_u + guidance * (v_c - v_u)

    return predict
