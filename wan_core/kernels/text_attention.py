"""Cross-attention to the text tokens with the zero-padding collapsed into one key.

Why: Wan pads every prompt's T5 features with zero rows to 512 tokens before the text projection
(the official code, LightX2V and ComfyUI all attend to the 512 rows). The projection is per row,
so every padding row gives the same key and the same value, and attending to m equal keys is
attending to one of them with its score raised by log m. A prompt of n < 512 tokens then needs
n + 1 keys instead of 512: the same softmax, a fraction of the work (at 720p the 512-key
cross-attention is ~1.5 % of a fast-mode forward; benchmarks/NOTES.md).

`text_attention(q, k, v, lengths, k_img, v_img)`: q [B, Lq, H, D]; k, v [B, Lk, H, D] computed
from the padded text (rows lengths[b].. of item b are its padding); lengths [B] int32 on the CPU;
k_img, v_img [B, Li, H, D] (I2V's 257 CLIP tokens, or None): their attention, a softmax of its
own, is added to the text's, as the model sums its two branches; q_scale [B, Lq] float32 (or
None): each query row's scores multiplied by it, i.e. q read as q · q_scale (q's RMSNorm factor,
the norm's weight folded into k and k_img by the caller: `block_ops`). A custom op (opaque to
torch.compile, which sees the lengths as a tensor: a new prompt length recompiles nothing). On
CUDA the host reads the lengths and picks the kernel: the Triton kernel `text_attention_kernel`
(head dims a power of two, as Wan's 128; both branches in one program, so q is read once and
the two outputs are summed before the one store) while the text keys it needs are at most
`COLLAPSE_MAX_KEYS`; above, the cost of its keys passes FlashAttention-3's over all Lk rows
(H100, 720p: 0.70 ms for a 12-token prompt, 2.35 ms for 512, FA3 1.32 ms whatever the prompt),
so the device's exact "auto" backend (FA3 where installed, whatever exact backend the model
names) attends to every row, and to the image keys. Elsewhere `reference_text_attention` (SDPA
over the n + 1 keys with the log-count bias, plus SDPA over the image keys).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .fp8_rows import FP8_DTYPE, FP8_MAX, HAS_TRITON, head_rows_codes, row_scales

__all__ = ["text_attention", "text_attention_codes", "text_multiplier", "reference_text_attention", "attend_all_text_rows",
           "key_log_counts", "scaled_rows", "COLLAPSE_MAX_KEYS"]

# The most keys (real tokens + the padding's one) the collapsed kernel runs; longer prompts go to
# the exact backend over all rows (the crossover measured on an H100, benchmarks/NOTES.md).
COLLAPSE_MAX_KEYS = 160


def key_log_counts(lengths: torch.Tensor, lk: int) -> torch.Tensor:
    """The additive score bias [B, Lk] (natural log) that makes keys [0, n] of each item stand for
    all lk keys: 0 on the real keys, log(lk - n) on the first padding row, -inf after it."""
    j = torch.arange(lk, device=lengths.device)[None, :]
    n = lengths.to(torch.int64)[:, None]
    pad = torch.log((lk - n).clamp(min=1).to(torch.float32))
    return torch.where(j < n, 0.0, torch.where(j == n, pad, float("-inf")))


def _sdpa(q, k, v, bias=None):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
    return out.transpose(1, 2)  # [B, H, Lq, D] -> [B, Lq, H, D]


def scaled_rows(q: torch.Tensor, q_scale: torch.Tensor | None, interpret: bool = False) -> torch.Tensor:
    """q [B, Lq, H, D] times its rows' factors q_scale [B, Lq], or q: one pass, each product in
    float32 rounded once to q's dtype (no float32 copy of q). A contiguous q on CUDA goes to the
    Triton kernel `scale_rows` (with `interpret`, CPU tensors too: Triton's interpreter, tests)."""
    if q_scale is None:
        return q
    if q.is_contiguous() and (interpret or q.device.type == "cuda" and HAS_TRITON):
        return _launch_scale_rows(q, q_scale)
    return torch.mul(q, q_scale[:, :, None, None], out=torch.empty_like(q))


def _launch_scale_rows(q: torch.Tensor, q_scale: torch.Tensor) -> torch.Tensor:
    import triton

    from .text_attention_kernel import scale_rows

    out = torch.empty_like(q)
    rows, cols = q.shape[0] * q.shape[1], q.shape[2] * q.shape[3]  # [B, Lq, H, D] as [B·Lq, H·D]
    block_c = min(1024, triton.next_power_of_2(cols))
    grid = (triton.cdiv(rows, 8), triton.cdiv(cols, block_c))
    scale_rows[grid](q, q_scale.contiguous(), out, rows, cols, BLOCK_R=8, BLOCK_C=block_c)
    return out


def reference_text_attention(q, k, v, lengths, k_img=None, v_img=None, q_scale=None) -> torch.Tensor:
    """The op's math in torch (arguments as `text_attention`'s): SDPA with the log-count bias
    (rows after the first padding row are masked out), plus SDPA over the image keys when given."""
    q = scaled_rows(q, q_scale)
    bias = key_log_counts(lengths.to(q.device), k.shape[1])[:, None, None, :].to(q.dtype)  # [B, 1, 1, Lk]
    out = _sdpa(q, k, v, bias)
    if k_img is not None:
        out = out + _sdpa(q, k_img, v_img)
    return out.contiguous()


def attend_all_text_rows(attn_fn):
    """A text-attention function that attends to every padded row with `attn_fn` (lengths unused),
    and to the image keys when given, each branch its own call, their results summed."""

    def attend(q, k, v, lengths, k_img=None, v_img=None):
        out = attn_fn(q, k, v)
        return out if k_img is None else out + attn_fn(q, k_img, v_img)

    return attend


@functools.cache
def _exact_all_rows(device: str):
    from .attention import get_attention

    return attend_all_text_rows(get_attention("auto", device))


def _all_rows(q, k, v, k_img=None, v_img=None) -> torch.Tensor:
    """Attention to every padded row (plus the image keys') through the device's exact "auto"
    backend (FA3 if installed)."""
    return _exact_all_rows(str(q.device))(q, k, v, None, k_img, v_img).contiguous()


def _launch(q, k, v, lengths, k_img=None, v_img=None, out_mult: torch.Tensor | None = None,
            q_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel; with `out_mult` (float32 [B]) its output is stored as e4m3 codes, each batch
    item's rows times its multiplier; with `q_scale` [B, Lq] each row's scores times its factor."""
    import triton

    from . import text_attention_kernel as tk

    b, lq, h, d = q.shape
    codes = out_mult is not None
    out = torch.empty(q.shape, dtype=FP8_DTYPE if codes else q.dtype, device=q.device)
    lengths = lengths.to(device=q.device, dtype=torch.int32, non_blocking=True).contiguous()
    has_img = k_img is not None
    k2, v2 = (k_img, v_img) if has_img else (k, v)  # without the image branch: unread stand-ins
    mult = out_mult if codes else lengths  # unread without codes
    rs = q_scale.contiguous() if q_scale is not None else lengths  # unread without q_scale
    args = (q, k, v, lengths, rs, k2, v2, out, mult, lq, k.shape[1], k2.shape[1] if has_img else 0, h,
            math.log2(math.e) / math.sqrt(d), *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *k2.stride()[:3], *v2.stride()[:3], *out.stride()[:3])  # fmt: skip
    if q.device.type == "cuda":
        grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), b * h)  # noqa: E731
        tk.text_attn_fwd_tuned[grid](*args, HEAD_DIM=d, HAS_IMG=has_img, CODES=codes, HAS_R=q_scale is not None)
    else:  # Triton's interpreter (tests)
        tk.text_attn_fwd[(triton.cdiv(lq, 64), b * h)](*args, HEAD_DIM=d, BLOCK_M=64, BLOCK_N=32, HAS_IMG=has_img,
                                                       CODES=codes, HAS_R=q_scale is not None)  # fmt: skip
    return out


def _use_triton(q: torch.Tensor) -> bool:
    d = q.shape[-1]
    return q.device.type == "cuda" and HAS_TRITON and d >= 16 and d & (d - 1) == 0  # tl.arange: a power of two


def _runs_kernel(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor) -> bool:
    """Whether the Triton kernel runs (else the torch reference off CUDA, or all rows for a long prompt)."""
    return _use_triton(q) and min(int(lengths.max()) + 1, k.shape[1]) <= COLLAPSE_MAX_KEYS  # lengths on the CPU


def _without_kernel(q, k, v, lengths, k_img, v_img, q_scale) -> torch.Tensor:
    if not _use_triton(q):
        return reference_text_attention(q, k, v, lengths, k_img, v_img, q_scale)
    return _all_rows(scaled_rows(q, q_scale), k, v, k_img, v_img)


@torch.library.custom_op("wan_core::text_attention", mutates_args=())
def _text_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    k_img: torch.Tensor | None,
    v_img: torch.Tensor | None,
    codes: bool,
    q_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [B, Lq, H, D] in q's dtype, an empty scale), or with `codes` (its e4m3 codes, each
    row's scale [B·Lq, 1]): one scale per batch item where the kernel runs, per token elsewhere."""
    if not _runs_kernel(q, k, lengths):
        out = _without_kernel(q, k, v, lengths, k_img, v_img, q_scale)
        return head_rows_codes(out) if codes else (out, out.new_empty(0))
    if not codes:
        out = _launch(q, k, v, lengths, k_img, v_img, q_scale=q_scale)
        return out, out.new_empty(0)
    mult = text_multiplier(v, v_img)
    return _launch(q, k, v, lengths, k_img, v_img, out_mult=mult, q_scale=q_scale), row_scales(mult, q.shape[1])


@_text_attention_op.register_fake
def _(q, k, v, lengths, k_img, v_img, codes, q_scale=None):
    b, lq = q.shape[:2]
    if codes:
        return torch.empty(q.shape, dtype=FP8_DTYPE, device=q.device), q.new_empty(b * lq, 1, dtype=torch.float32)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(0)


def text_multiplier(v: torch.Tensor, v_img: torch.Tensor | None = None) -> torch.Tensor:
    """The e4m3 multiplier of the output, one per batch item: 448 / bound, float32 [B]. The text
    branch is a softmax average of v's rows, the image branch one of v_img's, so max |v| (plus
    max |v_img|) bounds every output (`sage_attention.out_multiplier` says why not one per row)."""
    bound = v.abs().amax(dim=(1, 2, 3)).float()  # [B, Lk, H, D] -> [B]
    if v_img is not None:
        bound = bound + v_img.abs().amax(dim=(1, 2, 3)).float()
    return (FP8_MAX / bound.clamp(min=1e-12)).contiguous()


def _check_inputs(q: torch.Tensor, k_img: torch.Tensor | None, v_img: torch.Tensor | None,
                  q_scale: torch.Tensor | None) -> None:
    if (k_img is None) != (v_img is None):
        raise ValueError("the image branch needs both k_img and v_img")
    if q_scale is not None and (q_scale.shape != q.shape[:2] or q_scale.dtype != torch.float32):
        raise ValueError(f"q_scale must be float32 of shape {tuple(q.shape[:2])} (one factor per query row), "
                         f"got {q_scale.dtype} {tuple(q_scale.shape)}")  # fmt: skip


def text_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    k_img: torch.Tensor | None = None,
    v_img: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q [B, Lq, H, D] to text keys k, v [B, Lk, H, D] whose rows from lengths[b] on
    are zero-padding rows (all equal): exactly the attention to all Lk rows, over n + 1 keys
    (lengths: [B] int32 on the CPU); plus, when given, the attention to the image keys k_img,
    v_img [B, Li, H, D] (I2V's second branch). q_scale [B, Lq] float32: q's rows read times it."""
    _check_inputs(q, k_img, v_img, q_scale)
    return _text_attention_op(q, k, v, lengths, k_img, v_img, False, q_scale)[0]


def text_attention_codes(q, k, v, lengths, k_img=None, v_img=None, q_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`text_attention` with its output as e4m3 codes [B, Lq, H, D] and each row's scale [B·Lq, 1]
    (one per batch item, `text_multiplier`, where the kernel runs; per token after the other
    paths): the input of the FP8 output projection."""
    _check_inputs(q, k_img, v_img, q_scale)
    return _text_attention_op(q, k, v, lengths, k_img, v_img, True, q_scale)


text_attention.codes = text_attention_codes  # type: ignore[attr-defined]  (attention.py: a backend's codes)
