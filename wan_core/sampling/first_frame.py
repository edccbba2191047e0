"""TI2V-5B image conditioning: latent frame 0 held at the image's latent for the whole run.

The official WanTI2V.i2v (wan/textimage2video.py, wan/utils/utils.py masks_like) has no `y` input
and no mask channels: before the first step and after every scheduler step the latent becomes
(1 - mask) * z + mask * latent with mask 0 on latent frame 0, so frame 0 is always exactly the
image's latent z (also in the output); and the model is told frame 0 is clean: its tokens get
timestep 0, every other token the step's t (one value per 2x2 patch, token order f, h, w). The
scheduler step itself uses the scalar t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FirstFrame"]


@dataclass
class FirstFrame:
    """z: the image's latent [B, C, 1, h, w] (C = 48 for the Wan2.2 VAE), float32."""

    z: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, F, h, w] with latent frame 0 replaced by z (what the official 0/1-mask blend gives)."""
        out = x.clone()
        out[:, :, :1] = self.z.to(x)
        return out

    def timesteps(self, t: torch.Tensor, latent_shape, patch_size) -> torch.Tensor:
        """Per-token timesteps [B, L]: 0 on frame-0 tokens, t elsewhere (t: [B])."""
        b, _, f, h, w = latent_shape
        pt, ph, pw = patch_size
        keep = torch.ones(f // pt, h // ph, w // pw, device=t.device, dtype=t.dtype)  # mask2[0] subsampled per patch
        keep[0] = 0
        return keep.flatten()[None, :] * t.reshape(b, 1)  # [B, L], L = F' * h' * w'

    def to(self, device) -> FirstFrame:
        return FirstFrame(self.z.to(device))
