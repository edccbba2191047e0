"""The Triton kernel of `wan_core.kernels.radial_attention`: block-sparse flash attention.

One program computes BLOCK_M query rows of one (batch, head). Its query rows lie in one
128-row block of the radial mask (BLOCK_M divides 128), and it visits only the key blocks that
block row keeps, read from the plan's compact form (`counts` [n], `indices` [n, max count]),
each 128-key block in 128 / BLOCK_N tiles: the flash-attention loop (float32 online softmax in
the log2 domain, Q·Kᵀ and P·V on the tensor cores in the input dtype, float32 accumulators)
over a list of blocks instead of all of them. Keys at or beyond L (the padding of the last
block) are masked; query rows beyond L are computed and not stored. q, k, v and the output are
read and written in place in their [B, L, H, D] layout (strides passed), no transposed copies.
"""

import triton
import triton.language as tl

__all__ = ["radial_fwd", "radial_fwd_tuned", "CONFIGS"]


@triton.jit
def radial_fwd(Q, K, V, O, CNT, IDX, length, heads, max_cnt, qk_scale,
               stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
               stride_vb, stride_vl, stride_vh, stride_ob, stride_ol, stride_oh,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_BLOCK: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    row_blk = (pid_m * BLOCK_M) // MASK_BLOCK  # the mask row these query rows belong to
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_ql + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < length, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_kept = tl.load(CNT + row_blk)
    for t in range(0, n_kept):
        kb = tl.load(IDX + row_blk * max_cnt + t)
        for sub in tl.static_range(MASK_BLOCK // BLOCK_N):
            cols = kb * MASK_BLOCK + sub * BLOCK_N + offs_n
            keep = cols < length  # the padded tail of the last block
            rows = cols[:, None].to(tl.int64)
            k = tl.load(k_base + rows * stride_kl + offs_d[None, :], mask=keep[:, None], other=0.0)  # [BLOCK_N, D]
            s = tl.dot(q, tl.trans(k)) * qk_scale  # log2-domain scores [BLOCK_M, BLOCK_N]
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + rows * stride_vl + offs_d[None, :], mask=keep[:, None], other=0.0)  # [BLOCK_N, D]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a block row with no kept key block: zeros
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < length)


# Tiles for the autotuner on a GPU (the interpreter runs one fixed config). Not measured yet:
# the dense kernels' choices (sage_kernel.CONFIGS) as a start.
CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 4)]
]
radial_fwd_tuned = triton.autotune(CONFIGS, key=["HEAD_DIM", "max_cnt"])(radial_fwd)
