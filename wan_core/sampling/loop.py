"""The denoising loop: scheduler steps around (guided) DiT evaluations.

One function, `sample`, used by every door (pipeline, CLI, nodes). Its two seams are what the
optional features wrap: `predict` (how a velocity is obtained from the model for one step:
classifier-free guidance by default; CFG-parallel replaces it) and `callback` (progress,
previews and cancel hang on it; raising from it stops the run between two steps). Each step's
model calls run inside `attention_context.sampling_step(i)`, for attention backends whose first
steps differ (radial_attn's dense steps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kernels.attention_context import sampling_step
from .experts import Experts
from .first_frame import FirstFrame
from .schedulers import FlowScheduler

__all__ = ["Cond", "StepInfo", "guided_velocity", "sample", "make_noise", "latent_shape", "latent_geometry"]


@dataclass
class Cond:
    """What the DiT is conditioned on for one branch of guidance.

    context: T5 features [Lt, 4096] (a list for a batch, or a padded [B, Lt, 4096] tensor);
    Wan2.1 I2V adds clip_fea [B, 257, 1280] and y [B, 20, F, H, W] (mask + first-frame latent), the
    same for the conditional and unconditional branches; Wan2.2 I2V-A14B only y (no CLIP).
    """

    context: object
    clip_fea: torch.Tensor | None = None
    y: torch.Tensor | None = None


@dataclass
class StepInfo:
    step: int  # 0-based index of the step just finished
    total: int
    t: float  # timestep the DiT received
    latent: torch.Tensor  # the latent after this step
    x0: torch.Tensor  # the model's clean-latent estimate at this step (for previews)


def guided_velocity(model, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond | None, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: v_u + g (v_c - v_u); guidance 1 (or no uncond) is one evaluation."""
    v = model(x, t, cond.context, clip_fea=cond.clip_fea, y=cond.y)
    if uncond is None or guidance == 1.0:
        return v
    v_u = model(x, t, uncond.context, clip_fea=uncond.clip_fea, y=uncond.y)
    return v_u + guidance * (v - v_u)


def latent_geometry(task: str) -> tuple[int, int]:
    """(latent channels, spatial stride) of a task's VAE: TI2V-5B's Wan2.2 VAE 48 and 16x, else 16 and 8x."""
    return (48, 16) if task == "ti2v" else (16, 8)


def latent_shape(frames: int, height: int, width: int, z_dim: int = 16, stride: int = 8) -> tuple[int, int, int, int]:
    """Video size -> latent [C, F, H, W] (VAE: 4x in time after the first frame, `stride`x in space:
    8 for the Wan2.1 VAE, 16 for the Wan2.2 VAE of TI2V-5B, z_dim 48); sides a multiple of 2 * stride."""
    if (frames - 1) % 4:
        raise ValueError(f"frame count must be 4n+1 (e.g. 81), got {frames}")
    if height % (2 * stride) or width % (2 * stride):
        raise ValueError(f"height and width must be multiples of {2 * stride}, got {height}x{width}")
    return (z_dim, (frames - 1) // 4 + 1, height // stride, width // stride)


def make_noise(shape, seed: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise drawn on the CPU from `seed`, then moved: the same seed gives the same noise on every device."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def sample(
    model,
    noise: torch.Tensor,
    scheduler: FlowScheduler,
    cond: Cond,
    uncond: Cond | None = None,
    guidance: float = 5.0,
    callback: Callable[[StepInfo], None] | None = None,
    predict: Callable = guided_velocity,
    first_frame: FirstFrame | None = None,
    on_expert: Callable[[torch.nn.Module], None] | None = None,
) -> torch.Tensor:
    """Run the scheduler from `noise` [B, C, F, H, W] (float32) to the final latent.

    The latent is kept in float32 between steps (the DiT casts its input); timesteps go to the
    model as a [B] tensor on the latent's device ([B, L] per token with `first_frame`).
    model: one DiT, or Wan2.2 A14B `Experts` (each step's model and guidance chosen by its switch;
    `guidance` is then unused); on_expert(model) is called before the first step a model runs
    after another (where a caller swaps expert weights in). first_frame: TI2V-5B image
    conditioning (latent frame 0 held at the image's latent, its tokens at t = 0).
    """
    x = noise.float()
    if first_frame is not None:
        x = first_frame.apply(x)
    scheduler.reset()
    n = len(scheduler)
    current = None
    for i in range(n):
        t = scheduler.timesteps[i].to(x.device).expand(x.shape[0])
        step_model, g = model.pick(i, float(scheduler.timesteps[i])) if isinstance(model, Experts) else (model, guidance)
        if step_model is not current:
            if on_expert is not None:
                on_expert(step_model)
            current = step_model
        t_in = first_frame.timesteps(t, x.shape, step_model.cfg.patch_size) if first_frame is not None else t
        with sampling_step(i):
            v = predict(step_model, x, t_in, cond, uncond, g).float()
        sigma = float(scheduler.sigmas[i])
        x0 = x - sigma * v
        x = scheduler.step(v, i, x)
        if first_frame is not None:
            x = first_frame.apply(x)
            x0 = first_frame.apply(x0)
        if callback is not None:
            callback(StepInfo(step=i, total=n, t=float(scheduler.timesteps[i]), latent=x, x0=x0))
    return x
