"""Triton kernels for the 8-bit attention's input quantisation (`sage_attention.quantize`, FP8).

Two passes over k and v instead of inductor's five or six: `kv_stats` reads k and v once for
their per-channel sums (the smoothing means) and v's per-channel max and min (v's scale is
max |v - mean| = max(max - mean, mean - min)), one partial result per token chunk, summed in
torch afterwards so the result does not depend on the order blocks run in (no atomics: the same
inputs give the same codes on every run). `quantize_qkv` then reads q, k and v once and writes
the three code tensors in the attention kernel's layouts: q and k [B, H, Lp, D] with one scale per
query token and per KBLK keys, vᵀ [B, H, D, Lp]. The divisions are rounded to nearest
(`div_rn`: Triton's plain division is approximate), as torch divides tensors, and the scales are
amax times the float32 reciprocal of 448, as the torch reference writes them (torch's CUDA
division by a Python scalar multiplies by its reciprocal, its CPU division does not; writing the
multiplication makes the reference the same on both), so the codes equal the reference's
wherever the means agree.

FlashAttention-3's FP8 inputs (`fa3_fp8.quantize`: one scale per batch and head for q, smoothed k
and smoothed v) take the same two passes: `kv_stats` with QK_RANGE also keeps k's per-channel max
and min and q's per-channel max |q| (each head's amax of k - mean is the largest of
max(max - mean, mean - min) over its channels), and `quantize_per_head` writes the codes.
"""

import triton
import triton.language as tl

__all__ = ["kv_stats", "quantize_qkv", "quantize_per_head", "kv_stats_tuned", "quantize_qkv_tuned", "quantize_per_head_tuned"]


@triton.jit
def kv_stats(k_ptr, v_ptr, part_ptr, L, C, n_chunks, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
             SUB: tl.constexpr, q_ptr=None, QK_RANGE: tl.constexpr = False):
    """Partial statistics of one chunk of BLOCK_L tokens x BLOCK_C channels: part[b, chunk, 0..3, c]
    = sum k, sum v, max v, min v over the chunk's tokens, SUB tokens at a time. k/v: [B, L, C].
    With QK_RANGE (FlashAttention-3's per-head scales) also rows 4..6 = max k, min k, max |q|."""
    chunk = tl.program_id(0)
    cblk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    cols = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sk = tl.zeros([SUB, BLOCK_C], dtype=tl.float32)
    sv = tl.zeros([SUB, BLOCK_C], dtype=tl.float32)
    mx = tl.full([SUB, BLOCK_C], float("-inf"), dtype=tl.float32)
    mn = tl.full([SUB, BLOCK_C], float("inf"), dtype=tl.float32)
    kmx = tl.full([SUB, BLOCK_C], float("-inf"), dtype=tl.float32)
    kmn = tl.full([SUB, BLOCK_C], float("inf"), dtype=tl.float32)
    qmx = tl.zeros([SUB, BLOCK_C], dtype=tl.float32)
    for s in range(0, BLOCK_L, SUB):
        rows = chunk * BLOCK_L + s + tl.arange(0, SUB)
        mask = (rows < L)[:, None] & cmask[None, :]
        offs = b * L * C + rows.to(tl.int64)[:, None] * C + cols[None, :]
        k = tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sk += k
        sv += v
        mx = tl.maximum(mx, tl.where(mask, v, float("-inf")))
        mn = tl.minimum(mn, tl.where(mask, v, float("inf")))
        if QK_RANGE:
            kmx = tl.maximum(kmx, tl.where(mask, k, float("-inf")))
            kmn = tl.minimum(kmn, tl.where(mask, k, float("inf")))
            qmx = tl.maximum(qmx, tl.abs(tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)))
    rows_out = 7 if QK_RANGE else 4
    out = part_ptr + ((b * n_chunks + chunk) * rows_out) * C + cols
    tl.store(out, tl.sum(sk, 0), mask=cmask)
    tl.store(out + C, tl.sum(sv, 0), mask=cmask)
    tl.store(out + 2 * C, tl.max(mx, 0), mask=cmask)
    tl.store(out + 3 * C, tl.min(mn, 0), mask=cmask)
    if QK_RANGE:
        tl.store(out + 4 * C, tl.max(kmx, 0), mask=cmask)
        tl.store(out + 5 * C, tl.min(kmn, 0), mask=cmask)
        tl.store(out + 6 * C, tl.max(qmx, 0), mask=cmask)


@triton.jit
def quantize_qkv(q_ptr, k_ptr, v_ptr, km_ptr, vm_ptr, vs_ptr,  # inputs: [B, L, H, D]; means, v scales [B, H, D]
                 qc_ptr, qs_ptr, kc_ptr, ks_ptr, vt_ptr,  # outputs (layouts in the module docstring)
                 L, Lp, H, q_extra,
                 HEAD_DIM: tl.constexpr, KBLK: tl.constexpr, SUB: tl.constexpr):
    """One KBLK-token block of one (batch, head): q, k (smoothed) and v (smoothed) to e4m3,
    SUB tokens at a time."""
    blk = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    bh = b * H + h
    km = tl.load(km_ptr + bh * HEAD_DIM + d)
    vm = tl.load(vm_ptr + bh * HEAD_DIM + d)
    vs = tl.load(vs_ptr + bh * HEAD_DIM + d)
    C = H * HEAD_DIM
    # k: the block's amax first (one scale per KBLK keys), then its codes
    amax = tl.zeros([SUB, HEAD_DIM], dtype=tl.float32)
    for s in range(0, KBLK, SUB):
        t = blk * KBLK + s + tl.arange(0, SUB)
        mask = (t < L)[:, None]
        offs = (b * L + t.to(tl.int64))[:, None] * C + h * HEAD_DIM + d[None, :]
        kf = tl.where(mask, tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32) - km[None, :], 0.0)
        amax = tl.maximum(amax, tl.abs(kf))
    kscale = tl.maximum(tl.max(tl.max(amax, 1), 0), 1e-12) * (1.0 / 448.0)
    tl.store(ks_ptr + bh * (Lp // KBLK) + blk, kscale)
    for s in range(0, KBLK, SUB):
        t = blk * KBLK + s + tl.arange(0, SUB)
        mask = (t < L)[:, None]
        offs = (b * L + t.to(tl.int64))[:, None] * C + h * HEAD_DIM + d[None, :]
        out = (bh * Lp + t.to(tl.int64))[:, None] * HEAD_DIM + d[None, :]  # [B, H, Lp, D]
        kf = tl.where(mask, tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32) - km[None, :], 0.0)
        tl.store(kc_ptr + out, tl.math.div_rn(kf, kscale).to(tl.float8e4nv))
    for s in range(0, KBLK, SUB):  # q: one scale per token
        t = blk * KBLK + s + tl.arange(0, SUB)
        mask = (t < L)[:, None]
        offs = (b * L + t.to(tl.int64))[:, None] * C + h * HEAD_DIM + d[None, :]
        out = (bh * Lp + t.to(tl.int64))[:, None] * HEAD_DIM + d[None, :]
        qf = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        qscale = tl.maximum(tl.max(tl.abs(qf), 1), 1e-12) * (1.0 / 448.0)  # [SUB]
        tl.store(qc_ptr + out, tl.math.div_rn(qf, qscale[:, None]).to(tl.float8e4nv))
        tl.store(qs_ptr + bh * Lp + t, qscale * q_extra)
    for s in range(0, KBLK, SUB):  # v: smoothed, one scale per channel, stored transposed
        t = blk * KBLK + s + tl.arange(0, SUB)
        mask = (t < L)[:, None]
        offs = (b * L + t.to(tl.int64))[:, None] * C + h * HEAD_DIM + d[None, :]
        vf = tl.where(mask, tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32) - vm[None, :], 0.0)
        vcodes = tl.math.div_rn(vf, vs[None, :]).to(tl.float8e4nv)  # [SUB, D]
        vt_offs = (bh * HEAD_DIM + d.to(tl.int64))[:, None] * Lp + t[None, :]  # [D, SUB] in [B, H, D, Lp]
        tl.store(vt_ptr + vt_offs, tl.trans(vcodes))


@triton.jit
def quantize_per_head(q_ptr, k_ptr, v_ptr, km_ptr, vm_ptr, qd_ptr, kd_ptr, vd_ptr,  # [B, L, H, D]; [B, C]; [B, H]
                      qc_ptr, kc_ptr, vc_ptr,  # codes [B, L, H, D], FlashAttention-3's layout
                      L, H, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, SUB: tl.constexpr):
    """FlashAttention-3's inputs: q, k - mean(k) and v - mean(v) over one (batch, head)'s scale
    (`fa3_fp8.quantize`), BLOCK_T tokens of one head, SUB at a time; codes keep [B, L, H, D]."""
    blk = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    C = H * HEAD_DIM
    km = tl.load(km_ptr + b * C + h * HEAD_DIM + d)
    vm = tl.load(vm_ptr + b * C + h * HEAD_DIM + d)
    qd = tl.load(qd_ptr + b * H + h)
    kd = tl.load(kd_ptr + b * H + h)
    vd = tl.load(vd_ptr + b * H + h)
    for s in range(0, BLOCK_T, SUB):
        t = blk * BLOCK_T + s + tl.arange(0, SUB)
        mask = (t < L)[:, None]
        offs = (b * L + t.to(tl.int64))[:, None] * C + h * HEAD_DIM + d[None, :]
        qf = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        kf = tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32) - km[None, :]
        vf = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32) - vm[None, :]
        tl.store(qc_ptr + offs, tl.math.div_rn(qf, qd).to(tl.float8e4nv), mask=mask)
        tl.store(kc_ptr + offs, tl.math.div_rn(kf, kd).to(tl.float8e4nv), mask=mask)
        tl.store(vc_ptr + offs, tl.math.div_rn(vf, vd).to(tl.float8e4nv), mask=mask)


def _tuned(fn, configs, key):
    return triton.autotune([triton.Config(c, num_warps=w) for c, w in configs], key=key)(fn)


# GPU launches are autotuned (the CPU tests run the plain kernels in Triton's interpreter). The
# token chunk of kv_stats stays fixed: the partial-result rows are laid out by it.
kv_stats_tuned = _tuned(
    kv_stats,
    [(dict(BLOCK_C=bc, SUB=sub), w) for bc, sub in ((128, 16), (256, 8), (64, 32), (128, 32)) for w in (4, 8)],
    ["L", "C"],
)
quantize_qkv_tuned = _tuned(quantize_qkv, [(dict(SUB=sub), w) for sub in (16, 32, 64) for w in (4, 8)], ["L", "H"])
quantize_per_head_tuned = _tuned(quantize_per_head, [(dict(BLOCK_T=bt, SUB=sub), w) for bt, sub in ((64, 16), (128, 32), (256, 32))
                                                     for w in (4, 8)], ["L", "H"])
