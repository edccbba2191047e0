"""The Triton kernel of `wan_core.kernels.sage_attention` (8-bit Q·Kᵀ and P·V, float32 online softmax).

One program computes BLOCK_M query rows of one (batch, head) over all keys: the flash-attention
loop with 8-bit tensor-core matmuls. At 8 bits the tensor cores are no longer the bottleneck;
the per-score scalar work is (exp2 runs at 1/8 of the FMA rate), so the loop body is cut to five
operations per score: max, one FMA, exp2, add, convert. That is why

- k has one scale per KBLK keys (`sage_attention.KBLK`, a multiple of BLOCK_N: a scalar per tile) and q one per query row, so the dequantising
  factor c = q_scale · k_scale is a per-row vector, folded into the FMA s·c - m';
- the ×448 stretch of P into e4m3 is folded into the same FMA (m' = m - log2 448): the row sums
  l carry the same factor 448, which cancels in acc / l;
- v is quantised with its mean over the keys taken out (added back at the end, exact since the
  softmax weights sum to one), so its 8 bits carry what differs between keys;
- vᵀ is stored [D, L] so that the P·V matmul gets its B operand K-major, as the FP8 tensor cores
  require.

USE_TMA loads the q/k/v tiles with the bulk tensor copy engine (host-side tensor descriptors);
PIPELINE issues the next tile's Q·Kᵀ before this tile's softmax, so that the tensor cores and
the exp2 units overlap (FlashAttention-3's intra-warpgroup overlap, written out by hand).
WARP_SPEC asks Triton's automatic warp specialisation to split the loop into load, matmul and
softmax warps (Triton documents it for Blackwell; off: its Hopper pass gained nothing here,
benchmarks/NOTES.md). The
last partial key block is masked; padded query rows are computed and not stored. The pieces of
the loop are shared with the block-sparse variant, `sage_sparse_kernel`.
"""

import triton
import triton.language as tl

__all__ = ["attn_fwd", "attn_fwd_tuned", "CONFIGS", "load_q", "qk_tile", "softmax_pv", "key_tile", "store_out",
           "set_block_shapes"]

# The pieces below are shared with the block-sparse variant (`sage_sparse_kernel`): the same q
# tile, the same step per key tile, the same epilogue; only the order of the key tiles differs.


@triton.jit
def load_q(Q, QS, KS, pid_m, bh, lqp, lkp, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, USE_TMA: tl.constexpr,
           KBLK: tl.constexpr):
    """A program's q codes [BLOCK_M, D] and scales [BLOCK_M], its head's k-scale pointer, and the
    empty online-softmax state (m, l, acc)."""
    q_row = bh * lqp + pid_m * BLOCK_M  # row in the [B·H·Lqp, D] view of q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    if USE_TMA:
        q = Q.load([q_row, 0])
    else:
        q = tl.load(Q + (q_row + tl.arange(0, BLOCK_M))[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :])
    qs = tl.load(QS + bh.to(tl.int64) * lqp + offs_m)
    ks_ptr = KS + bh.to(tl.int64) * (lkp // KBLK)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    return q, qs, ks_ptr, m_i, l_i, acc


@triton.jit
def qk_tile(q, K, ks_ptr, row, col, lk, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr,
            USE_TMA: tl.constexpr, MASK: tl.constexpr, KBLK: tl.constexpr):
    """Raw scores of one key tile [BLOCK_M, BLOCK_N] (not yet dequantised) and its k scale."""
    if USE_TMA:
        k = K.load([row + col, 0])  # [BLOCK_N, D]
    else:
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        k = tl.load(K + (row + col + offs_n)[:, None] * HEAD_DIM + offs_d[None, :])
    if QK_INT8:
        s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    else:
        s = tl.dot(q, tl.trans(k))
    if MASK:
        cols = col + tl.arange(0, BLOCK_N)
        s = tl.where((cols < lk)[None, :], s, float("-inf"))
    return s, tl.load(ks_ptr + col // KBLK)


@triton.jit
def softmax_pv(s, kscale, qs, acc, l_i, m_i, VT, v_row, col, lkp, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               USE_TMA: tl.constexpr):
    """One key tile's online-softmax update and P·V: the new (acc, l, m)."""
    c = qs * kscale  # [BLOCK_M]: raw score -> log2-domain score
    m_new = tl.maximum(m_i, tl.max(s, 1) * c)
    p = tl.math.exp2(s * c[:, None] - (m_new - 8.807354922057604)[:, None])  # 448 · exp2(score - max)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if USE_TMA:
        v = VT.load([v_row, col])  # [D, BLOCK_N]
    else:
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        v = tl.load(VT + (v_row + offs_d)[:, None] * lkp + (col + offs_n)[None, :])
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(tl.float8e4nv), tl.trans(v), acc)
    return acc, l_i, m_new


@triton.jit
def key_tile(q, qs, K, ks_ptr, VT, k_row, v_row, col, lk, lkp, acc, l_i, m_i, HEAD_DIM: tl.constexpr,
             BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr, USE_TMA: tl.constexpr, MASK: tl.constexpr,
             KBLK: tl.constexpr):
    """The whole step of one key tile starting at key `col`: scores, softmax update, P·V."""
    s, kscale = qk_tile(q, K, ks_ptr, k_row, col, lk, HEAD_DIM, BLOCK_N, QK_INT8, USE_TMA, MASK, KBLK)
    return softmax_pv(s, kscale, qs, acc, l_i, m_i, VT, v_row, col, lkp, HEAD_DIM, BLOCK_N, USE_TMA)


@triton.jit
def store_out(acc, l_i, VS, VM, O, OS, pid_m, bh, lq, heads, stride_ob, stride_ol, stride_oh, HEAD_DIM: tl.constexpr,
              BLOCK_M: tl.constexpr, CODES: tl.constexpr):
    """Dequantise (v scales, the 448 of P cancels in acc / l), add v's mean back, store the rows
    below lq. A row that saw no key (l = 0: only a sparse mask's empty row) is stored as zeros.
    CODES: O is e4m3, the rows are stored times the batch item's multiplier OS[b] (the caller's
    bound on |output|, `sage_attention.out_multiplier`), for the FP8 linear after the attention."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    vs = tl.load(VS + bh.to(tl.int64) * HEAD_DIM + offs_d)
    vm = tl.load(VM + bh.to(tl.int64) * HEAD_DIM + offs_d)  # the mean of v taken out before quantising
    seen = l_i > 0.0
    out = acc * vs[None, :] / tl.where(seen, l_i, 1.0)[:, None] + vm[None, :]
    out = tl.where(seen[:, None], out, 0.0)
    b = bh // heads
    h = bh % heads
    if CODES:
        out = tl.clamp(out * tl.load(OS + b), -448.0, 448.0)
    o_ptrs = O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < lq)


@triton.jit
def attn_fwd(Q, QS, K, KS, VT, VS, VM, O, OS, lq, lk, lqp, lkp, heads, stride_ob, stride_ol, stride_oh,
             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr,
             USE_TMA: tl.constexpr, PIPELINE: tl.constexpr, KBLK: tl.constexpr, WARP_SPEC: tl.constexpr = False,
             CODES: tl.constexpr = False):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    k_row = bh * lkp  # row in the [B·H·Lkp, D] view of k
    v_row = bh * HEAD_DIM  # row in the [B·H·D, Lkp] view of vᵀ
    q, qs, ks_ptr, m_i, l_i, acc = load_q(Q, QS, KS, pid_m, bh, lqp, lkp, HEAD_DIM, BLOCK_M, USE_TMA, KBLK)
    n_full = (lk // BLOCK_N) * BLOCK_N
    if PIPELINE:
        if n_full > 0:
            s, kscale = qk_tile(q, K, ks_ptr, k_row, 0, lk, HEAD_DIM, BLOCK_N, QK_INT8, USE_TMA, False, KBLK)
            for col in range(0, n_full - BLOCK_N, BLOCK_N):
                s_next, kscale_next = qk_tile(q, K, ks_ptr, k_row, col + BLOCK_N, lk, HEAD_DIM, BLOCK_N, QK_INT8,
                                              USE_TMA, False, KBLK)
                acc, l_i, m_i = softmax_pv(s, kscale, qs, acc, l_i, m_i, VT, v_row, col, lkp, HEAD_DIM, BLOCK_N,
                                           USE_TMA)
                s, kscale = s_next, kscale_next
            acc, l_i, m_i = softmax_pv(s, kscale, qs, acc, l_i, m_i, VT, v_row, n_full - BLOCK_N, lkp, HEAD_DIM,
                                       BLOCK_N, USE_TMA)
    else:
        for col in tl.range(0, n_full, BLOCK_N, warp_specialize=WARP_SPEC):
            acc, l_i, m_i = key_tile(q, qs, K, ks_ptr, VT, k_row, v_row, col, lk, lkp, acc, l_i, m_i, HEAD_DIM,
                                     BLOCK_N, QK_INT8, USE_TMA, False, KBLK)
    if n_full < lk:
        acc, l_i, m_i = key_tile(q, qs, K, ks_ptr, VT, k_row, v_row, n_full, lk, lkp, acc, l_i, m_i, HEAD_DIM,
                                 BLOCK_N, QK_INT8, USE_TMA, True, KBLK)
    store_out(acc, l_i, VS, VM, O, OS, pid_m, bh, lq, heads, stride_ob, stride_ol, stride_oh, HEAD_DIM, BLOCK_M, CODES)


def set_block_shapes(nargs):
    """Autotuner pre-hook: the tensor descriptors' tile shapes follow the config's block sizes."""
    if nargs["USE_TMA"]:
        d, bm, bn = nargs["HEAD_DIM"], nargs["BLOCK_M"], nargs["BLOCK_N"]
        nargs["Q"].block_shape = [bm, d]
        nargs["K"].block_shape = [bn, d]
        nargs["VT"].block_shape = [d, bn]


# No BLOCK_N = 256: it spills registers (benchmarks/NOTES.md).
CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=set_block_shapes)
    for bm, bn, w, s in [(64, 128, 4, 3), (64, 128, 4, 4), (64, 64, 4, 4), (128, 128, 8, 2), (128, 128, 8, 3),
                         (128, 64, 8, 3), (128, 128, 8, 4)]
]
attn_fwd_tuned = triton.autotune(CONFIGS, key=["lkp", "HEAD_DIM", "QK_INT8", "USE_TMA", "PIPELINE", "WARP_SPEC",
                                                    "CODES"])(attn_fwd)
