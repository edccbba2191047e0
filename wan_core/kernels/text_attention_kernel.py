"""The Triton kernel of `wan_core.kernels.text_attention`: cross-attention to the text tokens with
the zero-padding collapsed into one key, plus (I2V) the image tokens' branch in the same program.

One program computes BLOCK_M query rows of one (batch, head): a flash-attention loop over the
keys [0, n] only, n = the batch item's real text tokens (read from memory, so one compiled kernel
serves every prompt length). Key n, the first padding row, stands for all lk - n padding rows
(they are equal): its score gets + log2(lk - n), i.e. it is counted lk - n times in the softmax.
With HAS_IMG, a second loop attends to the lk2 image keys (its own softmax, as in the model) and
the two results are summed in float32 before the one store: q is read once and no separate add
pass runs over the two branches' outputs. With CODES the store is e4m3 codes (the output times the
batch item's multiplier OS[b], from the caller's bound on |output|), the FP8 projection's input.
Scores in the log2 domain (exp2), float32 online softmax, bf16 matmuls with float32 accumulation.
With HAS_R each query row's scores are also multiplied by R[b, l] (float32): q's RMSNorm factor
where the caller folded the norm's weight into the keys (`block_ops`: q is then read as the q
linear wrote it, not after a normalising pass of its own).

`text_probs_fwd` stops before the values: it stores each query's softmax weights over the same
n + 1 keys (times a multiplier: 448 for e4m3 codes), the input of `text_projected`'s GEMM.

`scale_rows` writes q times its rows' factors R for the exact backend of a long prompt, which takes
no per-row factor: one pass, each product in float32 rounded once (torch's mixed-dtype multiply
takes a slow casting path over the 387 M values of a 720p q).
"""

import triton
import triton.language as tl

__all__ = ["text_attn_fwd", "text_attn_fwd_tuned", "CONFIGS", "text_probs_fwd", "text_probs_fwd_tuned", "scale_rows"]


@triton.jit
def _branch(q, k_base, v_base, sk_l, sv_l, n_keys, bias_col, bias, row_scale,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """softmax(q·Kᵀ) V over keys [0, n_keys) of one (batch, head), each row's scores times
    row_scale [BLOCK_M] (to the log2 domain), key `bias_col`'s raised by `bias`: the normalised
    float32 result [BLOCK_M, D]."""
    offs_d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, n_keys, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        keys = offs_n < n_keys
        k = tl.load(k_base + offs_n[:, None] * sk_l + offs_d[None, :], mask=keys[:, None], other=0.0)  # [BLOCK_N, D]
        v = tl.load(v_base + offs_n[:, None] * sv_l + offs_d[None, :], mask=keys[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * row_scale[:, None]  # [BLOCK_M, BLOCK_N], log2 domain
        s = s + tl.where(offs_n == bias_col, bias, 0.0)[None, :]
        s = tl.where(keys[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc / l_i[:, None]


@triton.jit
def _program_rows(Q, N, R, lq, lk, heads, scale_log2, sq_b, sq_l, sq_h,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_R: tl.constexpr):
    """This program's batch item and head, its query rows (offsets, mask [BLOCK_M, 1], the q tile
    [BLOCK_M, D], each row's score multiplier: scale_log2, times R[b, l] with HAS_R), the item's
    real text tokens n (rows n..lk-1 are the padding), its keys (the real ones and, when there is
    padding, its first row) and that row's log2 count."""
    b = (tl.program_id(1) // heads).to(tl.int64)
    h = (tl.program_id(1) % heads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < lq
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None].to(tl.int64) * sq_l + offs_d[None, :], mask=rows, other=0.0)
    if HAS_R:
        row_scale = tl.load(R + b * lq + offs_m, mask=offs_m < lq, other=1.0) * scale_log2
    else:
        row_scale = tl.full([BLOCK_M], scale_log2, tl.float32)
    n = tl.load(N + b)
    n_keys = tl.minimum(n + 1, lk)
    pad_bias = tl.log2(tl.maximum(lk - n, 1).to(tl.float32))  # the padding row counted lk - n times
    return b, h, offs_m, rows, q, row_scale, n, n_keys, pad_bias


@triton.jit
def text_attn_fwd(Q, K, V, N, R, K2, V2, O, OS, lq, lk, lk2, heads, scale_log2,
                  sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h, sk2_b, sk2_l, sk2_h, sv2_b, sv2_l, sv2_h,
                  so_b, so_l, so_h,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_IMG: tl.constexpr,
                  CODES: tl.constexpr = False, HAS_R: tl.constexpr = False):
    b, h, offs_m, rows, q, row_scale, n, n_keys, pad_bias = _program_rows(
        Q, N, R, lq, lk, heads, scale_log2, sq_b, sq_l, sq_h, HEAD_DIM, BLOCK_M, HAS_R)
    offs_d = tl.arange(0, HEAD_DIM)
    out = _branch(q, K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h, sk_l, sv_l, n_keys, n, pad_bias, row_scale,
                  HEAD_DIM, BLOCK_M, BLOCK_N)
    if HAS_IMG:  # the image branch: every key real, no bias (column -1 matches no key)
        out += _branch(q, K2 + b * sk2_b + h * sk2_h, V2 + b * sv2_b + h * sv2_h, sk2_l, sv2_l, lk2, -1, 0.0,
                       row_scale, HEAD_DIM, BLOCK_M, BLOCK_N)
    if CODES:  # e4m3 codes for the FP8 output projection: times the batch item's multiplier OS[b]
        out = tl.clamp(out * tl.load(OS + b), -448.0, 448.0)
    tl.store(O + b * so_b + h * so_h + offs_m[:, None].to(tl.int64) * so_l + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=rows)


# Key tiles of 64 or 128 only: the autotuner times its first call, whose prompt length may be short
# (one tile whatever its width), and a narrow tile would then run a 512-token prompt's 8-16 tiles.
CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2)]
]
text_attn_fwd_tuned = triton.autotune(CONFIGS, key=["lk", "lk2", "HEAD_DIM", "HAS_IMG", "CODES", "HAS_R"])(text_attn_fwd)


@triton.jit
def text_probs_fwd(Q, K, N, R, P, lq, lk, lp, heads, scale_log2, mult, sq_b, sq_l, sq_h, sk_b, sk_l, sk_h,
                   sp_b, sp_l, sp_h, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, KEYS: tl.constexpr,
                   HAS_R: tl.constexpr = False):
    """P[b, l, h, j] = mult · softmax_j(q·k_j), j < lp: the weights of keys [0, n] of `text_attn_fwd`
    (key n counted lk - n times; with HAS_R, row l's scores times R[b, l]), 0 for j > n. All KEYS
    (>= lp) keys in one tile."""
    b, h, offs_m, rows, q, row_scale, n, n_keys, pad_bias = _program_rows(
        Q, N, R, lq, lk, heads, scale_log2, sq_b, sq_l, sq_h, HEAD_DIM, BLOCK_M, HAS_R)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, KEYS)
    keys = offs_n < n_keys
    k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_l + offs_d[None, :], mask=keys[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k)) * row_scale[:, None]  # [BLOCK_M, KEYS], log2 domain
    s = s + tl.where(offs_n == n, pad_bias, 0.0)[None, :]
    s = tl.where(keys[None, :], s, float("-inf"))
    p = tl.math.exp2(s - tl.max(s, 1)[:, None])
    p = tl.minimum(p * (mult / tl.sum(p, 1))[:, None], mult)  # the largest weight is 1 at most
    tl.store(P + b * sp_b + h * sp_h + offs_m[:, None].to(tl.int64) * sp_l + offs_n[None, :],
             p.to(P.dtype.element_ty), mask=rows & (offs_n[None, :] < lp))


text_probs_fwd_tuned = triton.autotune(
    [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in [(64, 4), (128, 4), (128, 8)]],
    key=["lq", "KEYS", "HEAD_DIM", "HAS_R"],
)(text_probs_fwd)


@triton.jit
def scale_rows(X, R, O, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """O = X · R[row] over a contiguous [rows, cols] X (R float32 [rows]): a BLOCK_R x BLOCK_C tile."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    offs = r[:, None] * cols + c[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(R + r, mask=r < rows, other=0.0)
    tl.store(O + offs, (x * f[:, None]).to(O.dtype.element_ty), mask=mask)
