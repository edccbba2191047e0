"""Triton kernel that takes q before its RMSNorm and RoPE straight to the 8-bit attention's codes.

Why: in fast mode q went through two passes before the attention kernel: its RMSNorm + RoPE
(`fused_kernels.rms_norm_rope`, which writes q whole in bf16) and the quantiser's codes pass
(which reads it back). q's scale is per token and head, local to a row, so one pass can do all
of it: at 720p (75,600 tokens x 5,120 channels) 1.5 GB of a layer's traffic becomes 0.4 GB.
k cannot follow: its codes need its mean over all tokens first (the smoothing), so it is normed
by its own pass (here, `QUANT` off: the same math stored in bf16) and quantised as before.

One program holds a token row as a [heads, head dim] tile (heads padded to a power of two), so
the head's amax is a reduction along the tile's rows and the RoPE angles are loaded once per
row. The values are the unfused path's: x · (1/rms) · weight rounded to bf16, each channel pair
rotated, rounded to bf16 (the 1/rms may differ in its last bit: the sum of squares is reduced
in another order), then the codes as `sage_quant_kernel.quantize_qkv` makes them.
"""

import triton
import triton.language as tl

__all__ = ["qk_norm_rope", "qk_norm_rope_tuned"]


@triton.jit
def qk_norm_rope(x_ptr, w_ptr, cos_ptr, sin_ptr, o_ptr, s_ptr, L, Lp, H, eps, q_extra,
                 HEAD_DIM: tl.constexpr, NH: tl.constexpr, QUANT: tl.constexpr):
    """Token row t of batch item b of x [B, L, H·D] (q or k before its RMSNorm; weight w [H·D],
    RoPE tables [L, D/2]): normed over all heads, rotated, rounded to bf16. QUANT: e4m3 codes
    into o [B, H, Lp, D] with one scale per head into s [B, H, Lp] (times q_extra, the softmax
    scale); rows t >= L (the padding up to Lp) get zero codes. Else: bf16 into o [B, L, H·D]."""
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    HALF_D: tl.constexpr = HEAD_DIM // 2
    heads = tl.arange(0, NH)
    d = tl.arange(0, HEAD_DIM)
    j = tl.arange(0, HALF_D)
    C = H * HEAD_DIM
    valid_h = (t + 0 * heads) < L  # t < L as vectors (the interpreter refuses a scalar mask)
    hmask = (heads < H)[:, None]
    mask = hmask & valid_h[:, None]
    chan = heads[:, None] * HEAD_DIM + d[None, :]  # [NH, D]: the row's channels
    x = tl.load(x_ptr + (b * L + t) * C + chan, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(x * x, 1), 0) / C + eps)
    y = (x * rstd * tl.load(w_ptr + chan, mask=hmask, other=0.0)).to(tl.bfloat16).to(tl.float32)
    y0, y1 = tl.split(tl.reshape(y, [NH, HALF_D, 2]))  # each head's even and odd channels
    valid_j = (t + 0 * j) < L
    c = tl.load(cos_ptr + t * HALF_D + j, mask=valid_j, other=0.0)[None, :]  # the row's angles, shared by the heads
    s = tl.load(sin_ptr + t * HALF_D + j, mask=valid_j, other=0.0)[None, :]
    out = tl.interleave(y0 * c - y1 * s, y0 * s + y1 * c).to(tl.bfloat16)  # [NH, D]
    if QUANT:
        of = out.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(of), 1), 1e-12) * (1.0 / 448.0)  # [NH]: one per head
        rows = (b * H + heads.to(tl.int64)) * Lp + t  # [NH] rows of [B, H, Lp, D]
        tl.store(o_ptr + rows[:, None] * HEAD_DIM + d[None, :], tl.math.div_rn(of, scale[:, None]).to(tl.float8e4nv),
                 mask=hmask)
        tl.store(s_ptr + rows, scale * q_extra, mask=heads < H)
    else:
        tl.store(o_ptr + (b * L + t) * C + chan, out, mask=mask)


# GPU launches are autotuned over the warps per row (the interpreter runs the plain kernel).
qk_norm_rope_tuned = triton.autotune([triton.Config({}, num_warps=w) for w in (4, 8, 16)],
                                     key=["H", "HEAD_DIM", "QUANT"])(qk_norm_rope)
