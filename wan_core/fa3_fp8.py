"""FP8 self-attention through FlashAttention-3's e4m3 kernel (Hopper), with our quantisation.

Why: FlashAttention-3 overlaps the softmax of one warpgroup with the matmuls of another, which
our Triton kernel (`sage_attention.py`) cannot express; its e4m3 forward is the fastest 8-bit
attention we can run on an H100 when the `flash_attn_3` package is installed. The kernel takes
e4m3 q/k/v with one float32 "descale" per (batch, head) for each and returns bf16. What goes in
decides the error, so the quantisation is ours:

- k is smoothed: its mean over the tokens is subtracted per head and channel. Every score of a
  query row moves by the same constant q·mean(k), which the softmax ignores, and the e4m3 grid is
  spent on what differs between keys (real models' keys carry a large shared bias).
- v is smoothed too: its mean over the keys is subtracted before the rounding and added to the
  output afterwards (exact: the softmax weights of a row sum to one).
- q, the smoothed k and the smoothed v each get one scale per (batch, head): amax / 448.

`quantize` is that math in torch (inductor fuses it into the compiled block); `reference` runs
the same quantised attention in float32 torch, for tests; `fa3_fp8_attention` is the backend
(`[B, L, H, D]` in and out, as every backend in `attention.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["quantize", "reference", "fa3_fp8_attention", "available"]

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def available(device) -> str | None:
    """None when FlashAttention-3's FP8 kernel can run on `device`, else why not."""
    import importlib.util

    dev = torch.device(device)
    if importlib.util.find_spec("flash_attn_interface") is None:
        return "the flash_attn_3 package (FlashAttention-3, Hopper build) is not installed"
    if dev.type != "cuda":
        return f"it runs on CUDA GPUs only (device {dev})"
    if torch.cuda.get_device_capability(dev)[0] != 9:
        return f"FlashAttention-3 runs on Hopper GPUs (compute capability 9.x), not on {torch.cuda.get_device_name(dev)}"
    return None


def _per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] float32 -> e4m3 codes [B, L, H, D] and descales [B, H] (x ≈ codes · descale)."""
    amax = x.abs().amax(dim=(1, 3))  # [B, H]
    # times the rounded reciprocal, as the other quantisers here (the same on every device)
    descale = amax.clamp(min=1e-12) * (1.0 / FP8_MAX)
    codes = (x / descale[:, None, :, None]).to(FP8)
    return codes, descale


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q/k/v [B, L, H, D] -> (q codes, q descale [B, H], k codes, k descale, v codes, v descale,
    v mean [B, 1, H, D] float32). Codes keep the [B, L, H, D] layout the kernel reads."""
    qc, qd = _per_head(q.float())
    kf = k.float()
    kc, kd = _per_head(kf - kf.mean(dim=1, keepdim=True))
    vf = v.float()
    vm = vf.mean(dim=1, keepdim=True)  # [B, 1, H, D]
    vc, vd = _per_head(vf - vm)
    return qc, qd, kc, kd, vc, vd, vm


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The quantised inputs' attention in float32 (exact softmax, no rounding of P), plus the v
    mean, in q's dtype: what the kernel approximates. [B, L, H, D]."""
    qc, qd, kc, kd, vc, vd, vm = quantize(q, k, v)

    def deq(c, d):  # [B, L, H, D] -> [B, H, L, D]
        return (c.float() * d[:, None, :, None]).transpose(1, 2)

    o = F.scaled_dot_product_attention(deq(qc, qd), deq(kc, kd), deq(vc, vd)).transpose(1, 2)
    return (o + vm).to(q.dtype)


def fa3_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Self-attention [B, L, H, D] -> [B, L, H, D] (q's dtype) by FlashAttention-3's e4m3 kernel."""
    from flash_attn_interface import flash_attn_func

    qc, qd, kc, kd, vc, vd, vm = quantize(q, k, v)
    out = flash_attn_func(qc, kc, vc, softmax_scale=q.shape[-1] ** -0.5, q_descale=qd, k_descale=kd, v_descale=vd)
    out = out[0] if isinstance(out, tuple) else out
    return (out.float() + vm).to(q.dtype)
