"""The VAE's per-pixel work as one Triton pass each over channels-last activations.

Why: every VAE convolution but the first is preceded by RMSNorm over channels and a SiLU. In
torch that is a float32 norm reduction, two broadcast multiplies (1/norm, gamma) and the SiLU:
five passes over activations of up to 96 x 4 x 480 x 832 (300 MB in bf16 per chunk), the
broadcasts on torch's slow strided path; and torch adds each conv's bias after cuDNN in one more
broadcast pass (the profile: benchmarks/NOTES.md). Channels-last, a pixel's channels are
contiguous (96-384 values), so one program reads a block of pixel rows once and writes the
result once:

- `rms_norm_silu`: (x + the previous conv's bias) -> RMSNorm -> SiLU, written straight into the
  causal conv's history + chunk buffer (or three times into its time-folded buffer, see
  `vae_forms.time_folded_conv`), and its last frames also into the next chunk's history;
- `add_bias_residual`: a residual block's end, conv output + its bias + shortcut, in place;
- `fold_rows`, `subpixel_rows`: the copies of the time-folded convs and sub-pixel upsamplers;
- `softmax_rows`: the mid-block attention's softmax (`vae_forms.attention_gemm`), the float32
  scores scaled, normalised and stored in 16 bits in one pass.

Rounding follows the torch code (`vae_forms.rms_norm`, a biased conv, `add_residual`): the norm
in float32, 1/norm then x scale, that factor rounded to the activation dtype, each product and
sum rounded to it, SiLU from the rounded value. `vae_forms.TRITON_OPS` calls the launchers.
"""

import math

import torch
import triton
import triton.language as tl

from .vae_layout import dense_rows

__all__ = [
    "rms_norm_silu", "add_bias_residual", "fold_rows", "subpixel_rows", "softmax_rows", "launch_rms_norm_silu",
    "launch_add_bias_residual", "launch_fold_rows", "launch_subpixel_rows", "launch_softmax_rows", "SOFTMAX_MAX_COLS",
]


@triton.jit
def _fold_store(o_ptr, y, rows, cols, mask, C, frame_rows, out_rows, shift_rows):
    """Store pixel rows `y` [BLOCK_R, BLOCK_C] into a time-folded buffer (rows of 3C channels,
    `out_rows` of them): source row r goes to channel slot i of row r + (2 - i) * frame_rows -
    shift_rows, the same pixel 2 - i frames later, where that row exists."""
    for i in tl.static_range(3):
        dst = rows + (2 - i) * frame_rows - shift_rows
        o_offs = dst[:, None] * (3 * C) + i * C + cols[None, :]
        tl.store(o_ptr + o_offs, y, mask=mask & (dst[:, None] >= 0) & (dst[:, None] < out_rows))


@triton.jit
def fold_rows(
    x_ptr, o_ptr, R, C, x_bstride, o_bstride, frame_rows, out_rows, shift_rows,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Copy BLOCK_R pixel rows of one batch item into a time-folded buffer (`_fold_store`): the
    causal conv's history frames (shift_rows = their rows: they precede the buffer's frame 0), or
    a chunk that no norm writes."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    y = tl.load(x_ptr + b * x_bstride + rows[:, None] * C + cols[None, :], mask=mask, other=0.0)
    _fold_store(o_ptr + b * o_bstride, y, rows, cols, mask, C, frame_rows, out_rows, shift_rows)


@triton.jit
def rms_norm_silu(
    x_ptr, bias_ptr, g_ptr, o_ptr, t_ptr,  # activations, previous conv's bias [C], gamma [C], output, tail
    R, C, x_bstride, o_bstride, scale,  # pixel rows per batch item, channels, batch strides, sqrt(C)
    t_start, t_off, t_bstride,  # first row that also goes to the tail, t_start * C, the tail's batch stride
    frame_rows,  # pixel rows per frame (FOLD only)
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, TAIL: tl.constexpr, FOLD: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """BLOCK_R pixel rows of one batch item: x (+ bias) / ||x|| * sqrt(C) * gamma (then SiLU).
    The output may be a slice of a larger buffer (the causal conv's history + chunk); rows from
    `t_start` on are also written to the tail (the causal conv's history for the next chunk).
    FOLD: the output is a time-folded buffer, rows of 3C channels (`vae_forms.time_folded_conv`): frame f
    goes to slot 2 of row-frame f, slot 1 of f + 1 and slot 0 of f + 2 (those that exist)."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    offs = rows[:, None] * C + cols[None, :]  # [BLOCK_R, BLOCK_C]
    x = tl.load(x_ptr + b * x_bstride + offs, mask=mask, other=0.0).to(tl.float32)
    dt = o_ptr.dtype.element_ty
    if HAS_BIAS:  # the conv output with its bias, rounded as torch's separate add rounds it
        x = (x + tl.load(bias_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]).to(dt).to(tl.float32)
        x = tl.where(mask, x, 0.0)
    norm = tl.maximum(tl.sqrt_rn(tl.sum(x * x, 1)), 1e-12)  # [BLOCK_R]
    inv = (tl.math.div_rn(1.0, norm) * scale).to(dt).to(tl.float32)
    y = (x * inv[:, None]).to(dt).to(tl.float32)
    g = tl.load(g_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    y = (y * g[None, :]).to(dt).to(tl.float32)
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    if FOLD:
        _fold_store(o_ptr + b * o_bstride, y.to(dt), rows, cols, mask, C, frame_rows, R, 0)
    else:
        tl.store(o_ptr + b * o_bstride + offs, y.to(dt), mask=mask)
    if TAIL:
        tl.store(t_ptr + b * t_bstride + offs - t_off, y.to(dt), mask=mask & (rows[:, None] >= t_start))


@triton.jit
def add_bias_residual(
    h_ptr, bias_ptr, s_ptr,  # conv output without its bias (updated in place), the bias [C], shortcut
    R, C, h_bstride, s_bstride,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """A residual block's end: h + bias + shortcut, rounded after each add as torch rounds."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    offs = rows[:, None] * C + cols[None, :]  # [BLOCK_R, BLOCK_C]
    dt = h_ptr.dtype.element_ty
    h = tl.load(h_ptr + b * h_bstride + offs, mask=mask, other=0.0).to(tl.float32)
    h = (h + tl.load(bias_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]).to(dt).to(tl.float32)
    h = h + tl.load(s_ptr + b * s_bstride + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + b * h_bstride + offs, h.to(dt), mask=mask)


@triton.jit
def subpixel_rows(
    y_ptr, bias_ptr, o_ptr, H, W, O, y_bstride, o_bstride,  # phase conv output [N, H+1, W+1, 4O], output [N, 2H, 2W, O]
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """BLOCK_R output pixels of one image of `vae_forms.subpixel_conv`: pixel (2i + py, 2j + px) is
    channel block 2py + px of the phase conv's pixel (i + py, j + px), plus the conv's bias [O]
    (HAS_BIAS; added in float32 and rounded once, as torch adds it after the conv)."""
    n = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # output pixels, row-major
    cols = tl.arange(0, BLOCK_C)
    yy, xx = rows // (2 * W), rows % (2 * W)
    py, px = yy % 2, xx % 2
    src = (yy // 2 + py) * (W + 1) + (xx // 2 + px)  # the phase conv's pixel
    mask = (rows[:, None] < 4 * H * W) & (cols[None, :] < O)
    v = tl.load(y_ptr + n * y_bstride + src[:, None] * (4 * O) + ((2 * py + px) * O)[:, None] + cols[None, :], mask=mask)
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=cols < O, other=0.0)
        v = (v.to(tl.float32) + b.to(tl.float32)[None, :]).to(v.dtype)
    tl.store(o_ptr + n * o_bstride + rows[:, None] * O + cols[None, :], v, mask=mask)


@triton.jit
def softmax_rows(s_ptr, p_ptr, L, scale_log2, BLOCK: tl.constexpr):
    """One row of scores [L] (float32): p = softmax(scale · s) in p's dtype, the whole row in one tile."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(s_ptr + row * L + cols, mask=cols < L, other=float("-inf")) * scale_log2  # log2 domain
    e = tl.math.exp2(x - tl.max(x, 0))
    tl.store(p_ptr + row * L + cols, (e / tl.sum(e, 0)).to(p_ptr.dtype.element_ty), mask=cols < L)


def _blocks(x: torch.Tensor) -> tuple[tuple[int, int], int, int, int]:
    """(grid, rows per batch item, BLOCK_R, BLOCK_C) for `[B, C, T, H, W]` x: ~4,096 values a program."""
    b, c, t, h, w = x.shape
    block_c = 1 << (c - 1).bit_length()
    block_r = max(1, 4096 // block_c)
    return (triton.cdiv(t * h * w, block_r), b), t * h * w, block_r, block_c


def launch_rms_norm_silu(
    x: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    silu: bool,
    out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    tail: torch.Tensor | None = None,
    folded: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x` `[B, C, T, H, W]` with `dense_rows` -> RMSNorm(x + bias) * gamma (SiLU'd), into
    `out` if given (also `dense_rows`, same shape and dtype) or a new channels-last tensor.
    `tail` `[B, C, p, H, W]` (`dense_rows`, p <= T) also receives the last p frames.
    `folded` (instead of `out`): a `[B*T, 3C, H, W]` channels-last time-folded buffer
    (`vae_forms.time_folded_conv`) that receives each frame in the three places the conv reads it; returned."""
    b, c, t, h, w = x.shape
    if folded is not None:
        assert out is None and folded.shape == (b * t, 3 * c, h, w) and folded.dtype == x.dtype
        assert folded.is_contiguous(memory_format=torch.channels_last)
        out = folded
    elif out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    else:
        assert dense_rows(out) and out.shape == x.shape and out.dtype == x.dtype
    assert dense_rows(x)
    grid, rows, block_r, block_c = _blocks(x)
    t_start = 0
    if tail is not None:
        assert dense_rows(tail) and tail.shape[:2] == x.shape[:2] and tail.shape[3:] == x.shape[3:]
        assert tail.shape[2] <= x.shape[2] and tail.dtype == x.dtype
        t_start = rows - tail.shape[2] * x.shape[3] * x.shape[4]
    rms_norm_silu[grid](
        x, bias if bias is not None else x, gamma.reshape(-1).contiguous(), out, tail if tail is not None else out,
        rows, c, x.stride(0), t * out.stride(0) if folded is not None else out.stride(0), scale,
        t_start, t_start * c, tail.stride(0) if tail is not None else 0, h * w,
        HAS_BIAS=bias is not None, SILU=silu, TAIL=tail is not None, FOLD=folded is not None, BLOCK_R=block_r,
        BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return out


def launch_add_bias_residual(h: torch.Tensor, bias: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """`h += bias + shortcut` in place (rounded as `(h + bias) + shortcut`); all `dense_rows`."""
    assert dense_rows(h) and dense_rows(shortcut) and h.shape == shortcut.shape and h.dtype == shortcut.dtype
    grid, rows, block_r, block_c = _blocks(h)
    add_bias_residual[grid](
        h, bias, shortcut, rows, h.shape[1], h.stride(0), shortcut.stride(0), BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=4,
    )  # fmt: skip
    return h


def launch_fold_rows(x: torch.Tensor, folded: torch.Tensor, shift: int) -> torch.Tensor:
    """Copy `x` `[B, C, t, H, W]` (`dense_rows`) into the `[B*T, 3C, H, W]` channels-last
    time-folded buffer (`vae_forms.time_folded_conv`), its frames taken to start `shift` frames before the
    buffer's first: shift=2 for the history, 0 for a chunk. Returns `folded`."""
    b, c, t, h, w = x.shape
    n = folded.shape[0] // b
    assert dense_rows(x) and folded.shape == (b * n, 3 * c, h, w) and folded.dtype == x.dtype
    assert folded.is_contiguous(memory_format=torch.channels_last)
    grid, rows, block_r, block_c = _blocks(x)
    fold_rows[grid](
        x, folded, rows, c, x.stride(0), n * folded.stride(0), h * w, n * h * w, shift * h * w,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return folded


def launch_subpixel_rows(y: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`y` `[N, 4O, H+1, W+1]` channels-last (the phase conv of `vae_forms.subpixel_conv`) -> its
    phases in place in `out`, a contiguous `[N, 2H, 2W, O]`, plus `bias` `[O]` when given. Returns `out`."""
    n, o4, h1, w1 = y.shape
    o, h, w = o4 // 4, h1 - 1, w1 - 1
    assert y.is_contiguous(memory_format=torch.channels_last) and out.shape == (n, 2 * h, 2 * w, o)
    assert out.is_contiguous() and out.dtype == y.dtype
    block_c = 1 << (o - 1).bit_length()
    block_r = max(1, 4096 // block_c)
    assert bias is None or bias.shape == (o,)
    subpixel_rows[(triton.cdiv(4 * h * w, block_r), n)](
        y, bias if bias is not None else y, out, h, w, o, y.stride(0), out.stride(0), HAS_BIAS=bias is not None,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return out


# the longest row `softmax_rows` holds in one tile (a 1080p frame's latent pixels: 32,400)
SOFTMAX_MAX_COLS = 1 << 15


def launch_softmax_rows(s: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """softmax(scale · s) over the last dim of contiguous float32 scores `s` [R, L] (L at most
    `SOFTMAX_MAX_COLS`), returned in `dtype`."""
    r, n = s.shape
    assert s.is_contiguous() and s.dtype == torch.float32 and n <= SOFTMAX_MAX_COLS
    p = torch.empty(r, n, dtype=dtype, device=s.device)
    block = triton.next_power_of_2(n)
    warps = 16 if block >= 16384 else 8 if block >= 4096 else 4
    softmax_rows[(r,)](s, p, n, scale * math.log2(math.e), BLOCK=block, num_warps=warps)
    return p
