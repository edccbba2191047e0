"""Cross-attention to a short prompt computed through its output projection: out = P · (V W_o).

Why: head h's attention output is P_h V_h (P_h [Lq, n + 1]: each query's softmax weights over the
n + 1 keys of `text_attention`), and the output projection sums the heads, out = Σ_h P_h V_h W_hᵀ
(W_h: the projection's columns of head h). Taking U_h = V_h W_hᵀ first ([n + 1, N] per head, from
the text alone: a few hundred MFLOP per block) leaves one GEMM of the weights [Lq, H·Lp] with U
stacked [H·Lp, N], instead of the attention output [Lq, C] with the projection [C, N]: H·Lp / C of
its multiply-adds (Lp: n + 1, rounded up so that H·Lp is a multiple of 16; Wan's heads of 128:
Lp / 128, a sixth for a 20-token prompt), and the kernel stores H·Lp values per query instead of C.

Exact algebra. With FP8 linears the weights are e4m3 codes under one fixed scale (P ≤ 1, so
1/448) and U is quantised per output channel, as W_o is: each operand carries one e4m3 rounding,
as the plain path's attention codes and W_o do.

When: the text branch alone (an I2V image branch adds 257 keys, more than the projection saves),
n + 1 ≤ `PROJECTED_MAX_KEYS`, and an output projection whose operands the op can take (a plain
linear, or an FP8 linear on `torch._scaled_mm`: `block_ops` checks). Otherwise the op computes
`text_attention` and the projection as the plain path does. The host reads the lengths (on the
CPU) and picks inside one custom op, so a prompt of another length recompiles nothing.

`cross_text_attention` is `text_attention` as the DiT's cross-attention holds it: with both forms
the fused block ops look for, `.codes` (its output as e4m3 codes) and `.projected` (this one).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .fp8_rows import _AMAX_FLOOR, FP8_DTYPE, FP8_MAX, next_pow2, rowwise_scaled_mm
from .text_attention import (
    _check_inputs,
    _text_attention_op,
    _use_triton,
    key_log_counts,
    text_attention,
    text_attention_codes,
)

__all__ = ["cross_text_attention", "text_attention_projected", "text_probs", "launch_text_probs", "reference_text_probs",
           "value_projection", "projects", "PROJECTED_MAX_KEYS", "MM_KINDS"]

# The most keys (real tokens + the padding's one) computed through the projection; above, the plain
# path. The GEMM's work grows with the keys while the projection's does not: this is the largest
# count at which the projected form was still measured faster (`bench_text_projected.py`,
# benchmarks/NOTES.md). 0: never projected, and the fused block ops then normalise q as the plain
# path does (no q-norm fold: `block_ops.cross_attend`).
PROJECTED_MAX_KEYS = 112
# How the projection's GEMM runs: "linear" (weight in the compute dtype, `F.linear`), or an FP8
# linear's `torch._scaled_mm` kernels (`wan_core.layers.fp8`; e4m3 weight, per-channel scale).
MM_KINDS = ("linear", "scaled_mm", "scaled_mm_fast")


def _padded_keys(lengths: torch.Tensor, lk: int, heads: int) -> int:
    """n + 1 keys (capped at lk) of the longest prompt, rounded up so that heads x keys is a
    multiple of 16 (the FP8 GEMM's K step): to an even count for Wan's 40 (or 24) heads."""
    keys = min(int(lengths.max()) + 1, lk)
    step = 16 // math.gcd(heads, 16)
    return -(-keys // step) * step


def reference_text_probs(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, lp: int,
                         q_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The weights in torch: softmax over `text_attention`'s keys (log-count bias; each row's scores
    times q_scale [B, Lq] when given) -> float32 [B, Lq, H, lp], zero beyond each item's keys (and beyond lk)."""
    bias = key_log_counts(lengths.to(q.device), k.shape[1])[:, None, None, :]  # [B, 1, 1, Lk]
    s = torch.einsum("blhd,bjhd->blhj", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if q_scale is not None:
        s = s * q_scale[:, :, None, None]
    s = s + bias
    p = torch.softmax(s, dim=-1)[..., :lp]
    return F.pad(p, (0, lp - p.shape[-1]))


def text_probs(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, lp: int, codes: bool,
               q_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Each query's weights over the text keys [B, Lq, H, lp]: e4m3 codes of 448·P when `codes`,
    else q's dtype. The Triton kernel on CUDA, torch elsewhere."""
    if q.device.type != "cuda":
        p = reference_text_probs(q, k, lengths, lp, q_scale)
        return (p * (FP8_MAX if codes else 1.0)).to(FP8_DTYPE if codes else q.dtype)
    return launch_text_probs(q, k, lengths, lp, codes, q_scale)


def launch_text_probs(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, lp: int, codes: bool,
                      q_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`text_probs` by the Triton kernel (`text_attention_kernel.text_probs_fwd`; on CPU tensors,
    Triton's interpreter: tests)."""
    import triton

    from . import text_attention_kernel as tk

    b, lq, h, d = q.shape
    p = torch.empty(b, lq, h, lp, dtype=FP8_DTYPE if codes else q.dtype, device=q.device)
    n = lengths.to(device=q.device, dtype=torch.int32, non_blocking=True).contiguous()
    rs = q_scale.contiguous() if q_scale is not None else n  # unread without q_scale
    args = (q, k, n, rs, p, lq, k.shape[1], lp, h, math.log2(math.e) / math.sqrt(d), FP8_MAX if codes else 1.0,
            *q.stride()[:3], *k.stride()[:3], *p.stride()[:3])  # fmt: skip
    keys, has_r = max(16, next_pow2(lp)), q_scale is not None
    if q.device.type == "cuda":
        grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), b * h)  # noqa: E731
        tk.text_probs_fwd_tuned[grid](*args, HEAD_DIM=d, KEYS=keys, HAS_R=has_r)
    else:  # Triton's interpreter (tests)
        tk.text_probs_fwd[(triton.cdiv(lq, 64), b * h)](*args, HEAD_DIM=d, BLOCK_M=64, KEYS=keys, HAS_R=has_r)
    return p


def value_projection(v: torch.Tensor, lp: int, weight: torch.Tensor) -> torch.Tensor:
    """U of one batch item, stacked and transposed: v [Lk, H, D], weight [N, H·D] (any float or
    e4m3 codes, read as v's dtype) -> [N, H·lp], column h·lp + j = W_h v_j (rows j >= Lk: zero)."""
    lk, h, d = v.shape
    vv = F.pad(v[:lp], (0, 0, 0, 0, 0, max(0, lp - lk)))  # [lp, H, D]
    w = weight.to(v.dtype).view(-1, h, d).transpose(0, 1)  # [N, H, D] -> [H, N, D]
    u = torch.bmm(w, vv.permute(1, 2, 0))  # [H, N, D] @ [H, D, lp] -> [H, N, lp]
    return u.transpose(0, 1).reshape(-1, h * lp)  # [N, H, lp] -> [N, H·lp]


def _projected(q, k, v, lengths, weight, weight_scale, bias, mm: str, q_scale) -> torch.Tensor:
    """The weights P [Lq, H·lp] of each prompt times its U [H·lp, N] (+ bias) -> [B, Lq, N]."""
    b, lq = q.shape[:2]
    lp = _padded_keys(lengths, k.shape[1], q.shape[2])
    fp8 = mm != "linear"
    p = text_probs(q, k, lengths, lp, fp8, q_scale).flatten(2)  # [B, Lq, H, lp] -> [B, Lq, H·lp]
    out = q.new_empty(b, lq, weight.shape[0])
    for i in range(b):  # one U per prompt
        u = value_projection(v[i], lp, weight)  # [N, H·lp]
        if not fp8 and bias is not None:
            torch.addmm(bias, p[i], u.t(), out=out[i])
            continue
        if not fp8:
            torch.mm(p[i], u.t(), out=out[i])
            continue
        amax = u.abs().amax(dim=1, keepdim=True).float().clamp(min=_AMAX_FLOOR)  # [N, 1]
        u_codes = (u.float() * (FP8_MAX / amax)).to(FP8_DTYPE)
        p_scale = torch.full((lq, 1), 1.0 / FP8_MAX, dtype=torch.float32, device=q.device)
        rowwise_scaled_mm(p[i], p_scale, u_codes, weight_scale * (amax / FP8_MAX), bias, q.dtype,
                          fast_accum=mm == "scaled_mm_fast", out=out[i])  # fmt: skip
    return out


def _plain(q, k, v, lengths, k_img, v_img, weight, weight_scale, bias, mm: str, q_scale) -> torch.Tensor:
    """`text_attention`, then the projection, as the model's plain path computes them."""
    b, lq = q.shape[:2]
    if mm == "linear":
        return F.linear(_text_attention_op(q, k, v, lengths, k_img, v_img, False, q_scale)[0].flatten(2), weight, bias)
    codes, scale = _text_attention_op(q, k, v, lengths, k_img, v_img, True, q_scale)
    out = rowwise_scaled_mm(codes.reshape(b * lq, -1), scale, weight, weight_scale, bias, q.dtype,
                            fast_accum=mm == "scaled_mm_fast")  # fmt: skip
    return out.view(b, lq, -1)


def projects(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, k_img: torch.Tensor | None) -> bool:
    """Whether the op takes the projected form for these inputs (`PROJECTED_MAX_KEYS`; Triton on
    CUDA needs a power-of-two head dim)."""
    if k_img is not None or min(int(lengths.max()) + 1, k.shape[1]) > PROJECTED_MAX_KEYS:
        return False
    return q.device.type != "cuda" or _use_triton(q)


@torch.library.custom_op("wan_core::text_attention_projected", mutates_args=())
def _projected_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    k_img: torch.Tensor | None,
    v_img: torch.Tensor | None,
    weight: torch.Tensor,
    weight_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    mm: str,
    q_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    if projects(q, k, lengths, k_img):
        return _projected(q, k, v, lengths, weight, weight_scale, bias, mm, q_scale)
    return _plain(q, k, v, lengths, k_img, v_img, weight, weight_scale, bias, mm, q_scale)


@_projected_op.register_fake
def _(q, k, v, lengths, k_img, v_img, weight, weight_scale, bias, mm, q_scale=None):
    return q.new_empty(q.shape[0], q.shape[1], weight.shape[0])


def text_attention_projected(q, k, v, lengths, k_img, v_img, weight, weight_scale, bias, mm: str,
                             q_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The output projection of `text_attention(q, k, v, lengths, k_img, v_img, q_scale)`: [B, Lq, N]
    in q's dtype. weight [N, H·D] (with mm "linear": q's dtype; else e4m3 codes and weight_scale
    [N, 1], an FP8 linear's), bias [N] or None; mm one of `MM_KINDS`."""
    _check_inputs(q, k_img, v_img, q_scale)
    if mm not in MM_KINDS:
        raise ValueError(f"mm must be one of {MM_KINDS}, got {mm!r}")
    if (mm == "linear") != (weight_scale is None):
        raise ValueError("weight_scale goes with the FP8 kernels (mm 'scaled_mm' / 'scaled_mm_fast') only")
    if weight.shape[1] != q.shape[2] * q.shape[3]:
        raise ValueError(f"weight {tuple(weight.shape)} does not take the {q.shape[2]} x {q.shape[3]} attention output")
    return _projected_op(q, k, v, lengths, k_img, v_img, weight, weight_scale, bias, mm, q_scale)


def cross_text_attention(q, k, v, lengths, k_img=None, v_img=None, q_scale=None) -> torch.Tensor:
    """`text_attention` (the same arguments and result), carrying the forms the fused block ops
    use where the output projection allows: `.codes` and `.projected`."""
    return text_attention(q, k, v, lengths, k_img, v_img, q_scale)


cross_text_attention.codes = text_attention_codes  # type: ignore[attr-defined]
cross_text_attention.projected = text_attention_projected  # type: ignore[attr-defined]
