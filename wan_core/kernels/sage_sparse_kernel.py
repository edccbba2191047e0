"""The block-sparse variant of `sage_kernel`: 8-bit attention over a list of kept key blocks.

Why: a block-sparse attention (Radial Attention keeps ~34 % of the 128 x 128 blocks at 480p,
~26 % at 720p) only pays off on Hopper if each kept block runs at the 8-bit rate; the bf16
sparse kernel (`radial_kernel`) runs a block about 2x slower than an e4m3 dense kernel does.

Same inputs as the dense kernel (`sage_attention.quantize`: q per token, k per KBLK = 256 keys,
vᵀ per channel, k and v smoothed), same q tile, same step per key tile and same epilogue (the
shared pieces of `sage_kernel`): only the order of the key tiles differs. One program computes
BLOCK_M query rows of one (batch, head); they lie in one MASK_BLOCK-row block of the mask
(BLOCK_M divides MASK_BLOCK), whose kept key blocks it reads from the compact form of the plan
(`counts` [n], `indices` [n, max count], ascending), each in MASK_BLOCK / BLOCK_N tiles. A k scale
covers KBLK / MASK_BLOCK whole mask blocks (KBLK a multiple of MASK_BLOCK or the reverse: a tile
never straddles two scales). Smoothing stays exact under a mask: k's mean shifts every score of a
row by one constant, v's mean is added back with weights that sum to one over the kept keys.

Only the last mask block can hold keys at or past lk (the padding); with ascending indices it is
a row's last entry, so the loop over the others runs unmasked and that block runs its tiles up to
lk with the key mask, as the dense kernel's last tile. With every block kept this is the dense
kernel's tile sequence exactly (same values, bit for bit, at equal BLOCK_N).

PIPELINE runs the kept tiles as one flat loop that issues the next tile's Q·Kᵀ before this tile's
softmax (the dense kernel's hand-pipelined form): a few per cent faster here, where the dense
kernel gained nothing (`sage_attention.SPARSE_OPTIONS`).
"""

import triton
import triton.language as tl

from .sage_kernel import key_tile, load_q, qk_tile, set_block_shapes, softmax_pv, store_out

__all__ = ["attn_fwd_sparse", "attn_fwd_sparse_tuned", "CONFIGS"]


@triton.jit
def attn_fwd_sparse(Q, QS, K, KS, VT, VS, VM, O, OS, CNT, IDX, lq, lk, lqp, lkp, heads, max_cnt,
                    stride_ob, stride_ol, stride_oh,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr,
                    USE_TMA: tl.constexpr, KBLK: tl.constexpr, MASK_BLOCK: tl.constexpr, PIPELINE: tl.constexpr,
                    CODES: tl.constexpr = False):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    k_row = bh * lkp  # row in the [B·H·Lkp, D] view of k
    v_row = bh * HEAD_DIM  # row in the [B·H·D, Lkp] view of vᵀ
    q, qs, ks_ptr, m_i, l_i, acc = load_q(Q, QS, KS, pid_m, bh, lqp, lkp, HEAD_DIM, BLOCK_M, USE_TMA, KBLK)
    row = IDX + ((pid_m * BLOCK_M) // MASK_BLOCK) * max_cnt  # this mask row's kept key blocks
    n_kept = tl.load(CNT + (pid_m * BLOCK_M) // MASK_BLOCK)
    last = tl.load(row + tl.maximum(n_kept - 1, 0))
    ragged = (n_kept > 0) & (last * MASK_BLOCK + MASK_BLOCK > lk)  # the row keeps the padded last block
    n_whole = n_kept - ragged.to(tl.int32)
    if PIPELINE:  # one flat loop over the key tiles, the next tile's Q·Kᵀ issued before this one's softmax
        subs: tl.constexpr = MASK_BLOCK // BLOCK_N
        n_tiles = n_whole * subs
        if n_tiles > 0:
            col = tl.load(row) * MASK_BLOCK
            s, kscale = qk_tile(q, K, ks_ptr, k_row, col, lk, HEAD_DIM, BLOCK_N, QK_INT8, USE_TMA, False, KBLK)
            for t in range(1, n_tiles):
                col_next = tl.load(row + t // subs) * MASK_BLOCK + (t % subs) * BLOCK_N
                s_next, kscale_next = qk_tile(q, K, ks_ptr, k_row, col_next, lk, HEAD_DIM, BLOCK_N, QK_INT8, USE_TMA,
                                              False, KBLK)
                acc, l_i, m_i = softmax_pv(s, kscale, qs, acc, l_i, m_i, VT, v_row, col, lkp, HEAD_DIM, BLOCK_N,
                                           USE_TMA)
                s, kscale, col = s_next, kscale_next, col_next
            acc, l_i, m_i = softmax_pv(s, kscale, qs, acc, l_i, m_i, VT, v_row, col, lkp, HEAD_DIM, BLOCK_N, USE_TMA)
    else:
        for t in range(0, n_whole):
            kb = tl.load(row + t)
            for sub in tl.static_range(MASK_BLOCK // BLOCK_N):
                acc, l_i, m_i = key_tile(q, qs, K, ks_ptr, VT, k_row, v_row, kb * MASK_BLOCK + sub * BLOCK_N, lk,
                                         lkp, acc, l_i, m_i, HEAD_DIM, BLOCK_N, QK_INT8, USE_TMA, False, KBLK)
    if n_whole < n_kept:
        for col in range(last * MASK_BLOCK, lk, BLOCK_N):
            acc, l_i, m_i = key_tile(q, qs, K, ks_ptr, VT, k_row, v_row, col, lk, lkp, acc, l_i, m_i, HEAD_DIM,
                                     BLOCK_N, QK_INT8, USE_TMA, True, KBLK)
    store_out(acc, l_i, VS, VM, O, OS, pid_m, bh, lq, heads, stride_ob, stride_ol, stride_oh, HEAD_DIM, BLOCK_M, CODES)


def _fits_mask_block(configs, named_args, **kwargs):
    """Autotuner pruning: only tiles that divide the mask block (a program's rows in one mask row)."""
    block = kwargs.get("MASK_BLOCK", named_args.get("MASK_BLOCK"))
    fit = [c for c in configs if block % c.kwargs["BLOCK_M"] == 0 and block % c.kwargs["BLOCK_N"] == 0]
    return fit


# The autotuner's tiles, where no measured tile is fixed (`sage_attention.SPARSE_OPTIONS`: Hopper
# runs 64 x 128, 4 warps, 2 stages, the fastest in the H100 sweep; NOTES.md, tenth session): that
# one and the next best there (all divide 128, the radial mask's block).
CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=set_block_shapes)
    for bm, bn, w, s in [(64, 128, 4, 2), (64, 128, 4, 3), (128, 128, 8, 3), (128, 128, 8, 4)]
]
attn_fwd_sparse_tuned = triton.autotune(
    CONFIGS, key=["lkp", "max_cnt", "HEAD_DIM", "QK_INT8", "USE_TMA", "MASK_BLOCK", "PIPELINE", "CODES"],
    prune_configs_by={"early_config_prune": _fits_mask_block},
)(attn_fwd_sparse)  # fmt: skip
