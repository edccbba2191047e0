"""The DiT's 3-D rotary position embedding: the cos/sin tables of a token grid and the rotation.

Plain torch math shared by the model (`wan_core.models.dit`) and the fused q/k RMSNorm + RoPE op
(`wan_core.kernels.fused_ops`), whose torch reference it is; kept here so that kernels need not
import the model.
"""

from __future__ import annotations

import torch

__all__ = ["rope_tables", "apply_rope"]


def _inv_freqs(n: int, theta: float = 10000.0) -> torch.Tensor:
    # n rotation pairs spanning a sub-space of 2n channels: theta^(-2i / 2n)
    return 1.0 / torch.pow(theta, torch.arange(0, 2 * n, 2, dtype=torch.float64) / (2 * n))


def rope_tables(grid: tuple[int, int, int], head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of the 3-D RoPE for a (frames, height, width) token grid.

    The head's D/2 rotation pairs are split between time, height and width as the official
    code splits them (for D = 128: 22, 21, 21). Returns two float32 tensors [L, D/2],
    L = F*H*W in (f, h, w) row-major order, the order of the patch tokens.
    """
    f, h, w = grid
    c = head_dim // 2
    n_h = n_w = c // 3
    n_t = c - n_h - n_w
    pos = [torch.arange(s, dtype=torch.float64) for s in (f, h, w)]
    ang_t = torch.outer(pos[0], _inv_freqs(n_t))  # [F, n_t]
    ang_h = torch.outer(pos[1], _inv_freqs(n_h))  # [H, n_h]
    ang_w = torch.outer(pos[2], _inv_freqs(n_w))  # [W, n_w]
    ang = torch.cat(
        [
            ang_t[:, None, None, :].expand(f, h, w, n_t),
            ang_h[None, :, None, :].expand(f, h, w, n_h),
            ang_w[None, None, :, :].expand(f, h, w, n_w),
        ],
        dim=-1,
    ).reshape(f * h * w, c)  # [L, D/2]
    return ang.cos().float().to(device), ang.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, L, H, D] by the angles of cos/sin [L, D/2] (float32 math)."""
    b, l, h, d = x.shape
    xf = x.float().view(b, l, h, d // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # [B, L, H, D/2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)  # [B, L, H, D/2, 2]
    return out.view(b, l, h, d).to(x.dtype)
