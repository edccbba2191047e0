"""Triton kernels that take q and k before their RMSNorm and RoPE into the 8-bit attention's inputs.

Why: in fast mode a self-attention layer's q and k went through four passes before its kernel:
q's and k's RMSNorm + RoPE (`fused_kernels.rms_norm_rope`, each written whole in bf16), then the
quantiser's stats pass (k and v read) and codes pass (q, k and v read). Here `qk_prep` norms,
rotates and quantises q in one pass (its scale is per token and head: local to a row) and takes
k's column sums (the smoothing mean) with k's 1/rms per token; the codes pass
(`sage_quant_kernel.quantize_qkv` with K_NORM) norms and rotates k again on the fly from those
1/rms values instead of reading a normed copy, and the stats pass reads v only. At 720p (75,600
tokens x 5,120 channels) that is ~5.0 GB of traffic per layer instead of ~8.1 GB.

The normed and rotated values are `rms_norm_rope`'s bit for bit where the same float32
operations run in the same order: x · (1/rms) · weight rounded to bf16, the pair rotation, the
result rounded to bf16 (the unfused path's q and k), then the codes as `quantize_qkv` makes them.
"""

import triton
import triton.language as tl

__all__ = ["qk_prep", "qk_prep_tuned", "norm_rope_tile"]


@triton.jit
def rotate_pairs(y0, y1, c, s):
    """The RoPE rotation of channel pairs (y0, y1: the even and odd channels, float32) by their
    angles' cos/sin, interleaved back and rounded to bf16 as the unfused op's output; float32."""
    return tl.interleave(y0 * c - y1 * s, y0 * s + y1 * c).to(tl.bfloat16).to(tl.float32)


@triton.jit
def norm_rope_tile(x, rstd, w, t, valid, cos_ptr, sin_ptr, HALF_D: tl.constexpr):
    """k's normed and rotated values for a tile of one head: x [SUB, 2·HALF_D] float32 (raw k),
    rstd [SUB] (its tokens' 1/rms over all heads), w [2·HALF_D] (the head's norm weight), t [SUB]
    (token positions in the [L, HALF_D] cos/sin tables), valid [SUB] (t < L: padding tokens,
    whose x and rstd are 0, read no angle)."""
    y = (x * rstd[:, None] * w[None, :]).to(tl.bfloat16).to(tl.float32)
    ang = t[:, None] * HALF_D + tl.arange(0, HALF_D)[None, :]  # [SUB, HALF_D]
    y0, y1 = tl.split(tl.reshape(y, [y.shape[0], HALF_D, 2]))  # [SUB, D] -> the pairs' even and odd channels
    c = tl.load(cos_ptr + ang, mask=valid[:, None], other=0.0)
    s = tl.load(sin_ptr + ang, mask=valid[:, None], other=0.0)
    return rotate_pairs(y0, y1, c, s)


@triton.jit
def norm_rope_partner(x, partner_ptrs, rstd, w, w_head_ptr, t, valid, mask, cos_ptr, sin_ptr, HEAD_DIM: tl.constexpr):
    """`norm_rope_tile` without moving channels between lanes: each lane loads its pair partner
    (channel d ^ 1, from the same cache lines) and computes its own output channel."""
    d = tl.arange(0, HEAD_DIM)
    dp = d + 1 - 2 * (d % 2)  # d ^ 1
    y = (x * rstd[:, None] * w[None, :]).to(tl.bfloat16).to(tl.float32)
    xp = tl.load(partner_ptrs, mask=mask, other=0.0).to(tl.float32)
    yp = (xp * rstd[:, None] * tl.load(w_head_ptr + dp)[None, :]).to(tl.bfloat16).to(tl.float32)
    ang = t[:, None] * (HEAD_DIM // 2) + (d // 2)[None, :]
    c = tl.load(cos_ptr + ang, mask=valid[:, None], other=0.0)
    s = tl.load(sin_ptr + ang, mask=valid[:, None], other=0.0)
    even = (d % 2 == 0)[None, :]  # even: y0·c - y1·s; odd: y0·s + y1·c (y0 the even channel)
    return tl.where(even, y * c - yp * s, yp * s + y * c).to(tl.bfloat16).to(tl.float32)


@triton.jit
def qk_prep(q_ptr, k_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr,  # q/k [B, L, C] before their norms; weights [C]; [L, D/2]
            qc_ptr, qs_ptr, krs_ptr, ksum_ptr,  # q codes [B, H, Lp, D] and scales [B, H, Lp]; k 1/rms [B, L]; [B, n, C]
            L, Lp, C, H, eps, q_extra,
            HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, ROWS: tl.constexpr,
            HAS_Q: tl.constexpr = True, HAS_K: tl.constexpr = True):
    """ROWS token rows of one batch item (chunk n of Lp / ROWS; rows past L are padding: zero q
    codes, as `quantize_qkv` writes them): q normed, rotated and quantised to e4m3 with one
    scale per token and head (times q_extra, the softmax scale); k normed and rotated, summed
    per channel over the chunk (ksum[b, n]), its 1/rms per token kept for the codes pass."""
    chunk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    HALF_D: tl.constexpr = HEAD_DIM // 2
    NH: tl.constexpr = 2 * BLOCK_P // HEAD_DIM  # heads in the padded row
    offs = tl.arange(0, 2 * BLOCK_P)
    mask = offs < C
    p = tl.arange(0, BLOCK_P)
    pmask = p < C // 2
    heads = tl.arange(0, NH)
    d = tl.arange(0, HEAD_DIM)
    wq = tl.load(wq_ptr + offs, mask=mask, other=0.0)
    wk = tl.load(wk_ptr + offs, mask=mask, other=0.0)
    ksum = tl.zeros([2 * BLOCK_P], dtype=tl.float32)
    for r in range(ROWS):
        t = chunk * ROWS + r
        valid = t < L
        row = b * L + t
        # masks as vectors (t < L for every lane): the interpreter refuses a scalar broadcast into a load's mask
        vmask = mask & (t * C + offs < L * C)
        ang = t * HALF_D + p % HALF_D  # each pair's angle in the [L, D/2] tables
        c = tl.load(cos_ptr + ang, mask=pmask & (ang < L * HALF_D), other=0.0)
        s = tl.load(sin_ptr + ang, mask=pmask & (ang < L * HALF_D), other=0.0)
        if HAS_Q:
            x = tl.load(q_ptr + row * C + offs, mask=vmask, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / C + eps)
            y0, y1 = tl.split(tl.reshape((x * rstd * wq).to(tl.bfloat16).to(tl.float32), [BLOCK_P, 2]))
            yq = tl.reshape(rotate_pairs(y0, y1, c, s), [NH, HEAD_DIM])  # [C padded] -> [heads, D]
            qscale = tl.maximum(tl.max(tl.abs(yq), 1), 1e-12) * (1.0 / 448.0)  # [NH]
            hmask = heads < H
            out = ((b * H + heads.to(tl.int64)) * Lp + t)[:, None] * HEAD_DIM + d[None, :]  # [NH, D] in [B, H, Lp, D]
            tl.store(qc_ptr + out, tl.math.div_rn(yq, qscale[:, None]).to(tl.float8e4nv), mask=hmask[:, None])
            tl.store(qs_ptr + (b * H + heads) * Lp + t, qscale * q_extra, mask=hmask)
        if HAS_K:
            x = tl.load(k_ptr + row * C + offs, mask=vmask, other=0.0).to(tl.float32)
            rstd = tl.where(valid, 1.0 / tl.sqrt(tl.sum(x * x, 0) / C + eps), 0.0)
            y0, y1 = tl.split(tl.reshape((x * rstd * wk).to(tl.bfloat16).to(tl.float32), [BLOCK_P, 2]))
            ksum += rotate_pairs(y0, y1, c, s)
            tl.store(krs_ptr + row, rstd, mask=valid)
    if HAS_K:
        tl.store(ksum_ptr + (b * (Lp // ROWS) + chunk) * C + offs, ksum, mask=mask)


# GPU launches are autotuned over the warps per program (the rows per program lay out ksum).
qk_prep_tuned = triton.autotune([triton.Config({}, num_warps=w) for w in (4, 8, 16)], key=["C", "H"])(qk_prep)
