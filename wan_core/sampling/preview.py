"""Cheap live previews: a linear latent -> RGB projection fitted to the VAE itself.

A preview is shown after every sampling step, so it must cost next to nothing: one `[16 -> 3]`
matrix product per latent pixel, no VAE decode. The matrix is not a table copied from elsewhere:
`fit_rgb_projection` measures it on the VAE in hand, once, by decoding a small batch of seeded
random latents and solving least squares between each latent pixel and the mean colour of the
8 x 8 pixel block it decodes to. This works for the real Wan2.1 VAE and for the tiny random
test VAEs alike (the fit is only as good as a linear map can be: colours and layout, no detail).

Latents here are the normalised latents the DiT works on (`WanVAE.encode` output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["RGBProjection", "fit_rgb_projection", "latent_to_rgb"]


@dataclass(frozen=True)
class RGBProjection:
    """rgb = weight @ z + bias, for one latent pixel z [C]; rgb in [-1, 1] (the VAE's pixel range)."""

    weight: torch.Tensor  # [3, C] float32
    bias: torch.Tensor  # [3] float32


@torch.no_grad()
def fit_rgb_projection(vae, size: int = 16, samples: int = 2, seed: int = 0) -> RGBProjection:
    """Fit the projection on `vae` (anything with `config.z_dim`, `config.spatial_ratio` and `decode`).

    Decodes `samples` single-frame latents [1, C, 1, size, size] drawn from N(0, 1) (the normalised
    latent's scale), average-pools each decoded frame to latent resolution and solves
    `[z, 1] @ [W^T; b] = rgb` over all latent pixels. Cost: one tiny decode, a few ms on a GPU.
    """
    z_dim, ratio = vae.config.z_dim, vae.config.spatial_ratio
    g = torch.Generator().manual_seed(seed)
    zs, rgbs = [], []
    for _ in range(samples):
        z = torch.randn(1, z_dim, 1, size, size, generator=g)
        video = vae.decode(z).float().cpu()  # [1, 3, 1, size * ratio, size * ratio]
        rgb = F.avg_pool2d(video[:, :, 0], ratio)  # [1, 3, size, size]
        zs.append(z[0, :, 0].reshape(z_dim, -1).T)  # [C, size, size] -> [size^2, C]
        rgbs.append(rgb[0].reshape(3, -1).T)  # [3, size, size] -> [size^2, 3]
    z = torch.cat(zs).double()
    design = torch.cat([z, torch.ones(len(z), 1, dtype=torch.float64)], dim=1)  # [N, C + 1]
    sol = torch.linalg.lstsq(design, torch.cat(rgbs).double()).solution  # [C + 1, 3]
    return RGBProjection(weight=sol[:-1].T.float().contiguous(), bias=sol[-1].float().contiguous())


@torch.no_grad()
def latent_to_rgb(latent: torch.Tensor, proj: RGBProjection, frame: int = 0) -> torch.Tensor:
    """One latent frame -> uint8 RGB image [h, w, 3] at latent resolution (CPU).

    latent: [C, F, h, w] or [B, C, F, h, w] (the first batch entry is shown); `frame` picks the
    latent frame (0 = the first video frame).
    """
    if latent.ndim == 5:
        latent = latent[0]
    if latent.ndim != 4 or latent.shape[0] != proj.weight.shape[1]:
        raise ValueError(f"expected a latent [{proj.weight.shape[1]}, F, h, w], got shape {tuple(latent.shape)}")
    z = latent[:, frame].float().cpu()  # [C, h, w]
    rgb = torch.einsum("rc,chw->hwr", proj.weight, z) + proj.bias  # [h, w, 3] in about [-1, 1]
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
