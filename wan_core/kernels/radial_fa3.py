"""Radial attention through FlashAttention-3's e4m3 kernel: the block mask as a page table.

Why: our block-sparse 8-bit Triton kernel runs its kept blocks at our dense Triton kernel's rate,
which is ~15 % below FA3's e4m3 one (benchmarks/NOTES.md, tenth session). FA3 has no block
mask, but it has paged keys: a query block is one sequence of a varlen batch, and its page table
lists the key pages of the blocks it keeps, so FA3 reads those keys only, at its own rate.

The quantisation is `fa3_fp8`'s (per-head scales, k and v smoothed), so the result is the dense
`fa3_fp8` backend's math restricted to the kept blocks. Keys are paged in `page` tokens: 128
(the mask block) with k and v padded to a whole block, or any divisor of both 128 and the length
(no padding). Needs an FA3 build with paged KV and varlen (the pip build has both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fa3_fp8 import _quantize_op
from .radial_mask import RadialPlan

__all__ = ["paged_layout", "radial_attention_fa3", "available"]


def available(device) -> str | None:
    """None when FA3's paged e4m3 kernel can run on `device`, else why not."""
    from .fa3_fp8 import available as fa3_problem

    why = fa3_problem(device)
    if why is not None:
        return why
    try:  # the build's switches (FA3 writes them next to its interface); absent: a full build
        from flash_attn_config import CONFIG

        flags = CONFIG.get("build_flags", {})
    except ImportError:
        flags = {}
    off = [f for f in ("PAGEDKV", "VARLEN", "FP8") if flags.get(f"FLASHATTENTION_DISABLE_{f}")]
    return f"the installed FlashAttention-3 was built without {', '.join(off)}" if off else None


def paged_layout(plan: RadialPlan, page: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(cu_seqlens_q int32 [batch·n + 1], page table int32 [batch·n, pages per row], keys used per
    row int32 [batch·n], pages per batch item) for `batch` videos of `plan`'s layout, n query blocks each."""
    bs, length = plan.block_size, plan.length
    if bs % page:
        raise ValueError(f"page size {page} must divide the mask block {bs}")
    n = plan.counts.shape[0]
    dev = plan.counts.device
    padded = length % page != 0
    pages = n * bs // page if padded else length // page  # per batch item
    sub = bs // page
    table = (plan.indices.long()[:, :, None] * sub + torch.arange(sub, device=dev)).reshape(n, -1)  # [n, max·sub]
    table = table.clamp(max=pages - 1)  # past a row's keys: never read, kept in range
    tail = n * bs - length  # padded tokens of the last block
    last_kept = plan.indices.gather(1, (plan.counts.long() - 1).clamp(min=0)[:, None])[:, 0] == n - 1
    used = plan.counts * bs - torch.where(last_kept, tail, 0)  # [n] real keys per query block
    offsets = torch.arange(batch, device=dev)[:, None, None] * pages
    table = (table[None] + offsets).reshape(batch * n, -1).to(torch.int32).contiguous()
    starts = torch.arange(n, device=dev) * bs
    cu = torch.cat([(starts[None] + torch.arange(batch, device=dev)[:, None] * length).reshape(-1),
                    torch.tensor([batch * length], device=dev)]).to(torch.int32)  # fmt: skip
    return cu, table, used.repeat(batch).to(torch.int32).contiguous(), pages


def _pages(codes: torch.Tensor, length_padded: int, page: int) -> torch.Tensor:
    """e4m3 codes [B, L, H, D] -> pages [B · Lp / page, page, H, D], zero-padded to Lp tokens."""
    b, length, h, d = codes.shape
    if length_padded != length:
        codes = F.pad(codes.view(torch.uint8), (0, 0, 0, 0, 0, length_padded - length)).view(codes.dtype)
    return codes.reshape(b * length_padded // page, page, h, d)


def radial_attention_fa3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RadialPlan,
                         page: int | None = None) -> torch.Tensor:
    """Self-attention [B, L, H, D] over `plan`'s kept blocks by FA3's paged e4m3 kernel; q's dtype.
    `page`: key page size (None: 128, k and v padded to whole blocks)."""
    from flash_attn_interface import flash_attn_with_kvcache

    b, length, h, d = q.shape
    page = page or plan.block_size
    cu, table, used, pages = paged_layout(plan, page, b)
    n = plan.counts.shape[0]
    qc, qd, kc, kd, vc, vd, vm = _quantize_op(q, k, v)
    lp = pages * page
    rows = b * n  # one varlen sequence per query block

    def per_row(scale: torch.Tensor) -> torch.Tensor:  # [B, H] -> [B·n, H] (a view)
        return scale[:, None, :].expand(b, n, h).reshape(rows, h) if b > 1 else scale.expand(rows, h)

    # max_seqlen_q one past the block: FA3 pages keys by TMA only when max_seqlen_q · h / h_k exceeds
    # its 128-row tile (a decoding heuristic) and the page is a multiple of its key tile
    out = flash_attn_with_kvcache(qc.reshape(b * length, h, d), _pages(kc, lp, page), _pages(vc, lp, page),
                                  cache_seqlens=used, page_table=table, cu_seqlens_q=cu,
                                  max_seqlen_q=plan.block_size + 1, q_descale=per_row(qd), k_descale=per_row(kd),
                                  v_descale=per_row(vd), softmax_scale=d**-0.5)  # fmt: skip
    out = out[0] if isinstance(out, tuple) else out  # [B·L, H, D]
    return (out.view(b, length, h, d).float() + vm).to(q.dtype)
