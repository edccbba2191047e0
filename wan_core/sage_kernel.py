"""The Triton kernel of `wan_core.sage_attention` (8-bit Q·Kᵀ and P·V, float32 online softmax).

One program computes BLOCK_M query rows of one (batch, head) over all keys: the flash-attention
loop, with the scores dequantised by the per-token scales of q and k (already in the log2
domain), P = exp2(s - running max) rounded to e4m3 after a ×448 stretch, and vᵀ stored
[D, L] so the FP8 matmul gets its B operand K-major, as Hopper's FP8 tensor cores require. The
last partial key block is masked; padded query rows are computed and not stored.
"""

import triton
import triton.language as tl

__all__ = ["attn_fwd", "attn_fwd_tuned"]


@triton.jit
def _attn_inner(acc, l_i, m_i, q, qs, k_ptrs, ks_ptrs, v_ptrs, start, end, lk,
           HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr, MASK: tl.constexpr):
    for n in range(start, end, BLOCK_N):
        k = tl.load(k_ptrs + n * HEAD_DIM)  # [BLOCK_N, D]
        ks = tl.load(ks_ptrs + n)  # [BLOCK_N]
        if QK_INT8:
            s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qs[:, None] * ks[None, :]  # log2-domain scores
        if MASK:
            cols = n + tl.arange(0, BLOCK_N)
            s = tl.where((cols < lk)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + n)  # [D, BLOCK_N] of vᵀ: K-major for the FP8 matmul
        acc = acc * alpha[:, None]
        acc = tl.dot((p * 448.0).to(tl.float8e4nv), tl.trans(v), acc)
        m_i = m_new
    return acc, l_i, m_i

@triton.jit
def attn_fwd(Q, QS, K, KS, VT, VS, O, lq, lk, lqp, lkp, heads, stride_ob, stride_ol, stride_oh,
         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + bh * lqp * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    qs = tl.load(QS + bh * lqp + offs_m)
    k_ptrs = K + bh * lkp * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    ks_ptrs = KS + bh * lkp + offs_n
    v_ptrs = VT + bh * HEAD_DIM * lkp + offs_d[:, None] * lkp + offs_n[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (lk // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, qs, k_ptrs, ks_ptrs, v_ptrs, 0, n_full, lk,
                           HEAD_DIM, BLOCK_N, QK_INT8, False)
    if n_full < lk:
        acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, qs, k_ptrs, ks_ptrs, v_ptrs, n_full, n_full + BLOCK_N, lk,
                               HEAD_DIM, BLOCK_N, QK_INT8, True)
    vs = tl.load(VS + bh * HEAD_DIM + offs_d)
    out = acc * (vs * (1.0 / 448.0))[None, :] / l_i[:, None]
    b = bh // heads
    h = bh % heads
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < lq)

CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3),
                         (128, 128, 4, 2), (64, 128, 4, 3)]
]


attn_fwd_tuned = triton.autotune(CONFIGS, key=["lkp", "HEAD_DIM", "QK_INT8"])(attn_fwd)
