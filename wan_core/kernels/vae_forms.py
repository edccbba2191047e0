"""The VAE's faster forms of the same sums as `models.vae`, and the table of its per-pixel passes.

A VAE call picks these once, at its start (`WanVAE` then hands them to its modules): the model is
built on the CPU or the meta device and moved between stages by offload, so its device and
activation layout are only known per encode/decode call.

- `VAEOps`: the per-pixel passes: RMSNorm (+ the previous conv's bias, + SiLU, written straight
  into a causal conv's buffer), a residual block's end (+ the conv's bias), the copies into a
  time-folded buffer, the sub-pixel phase gather (+ the conv's bias); and the mid-block's
  attention (head dim 384: on CUDA as GEMMs, `attention_gemm`). `TORCH_OPS` anywhere; `TRITON_OPS` on CUDA
  (`vae_ops`): one Triton pass each (`vae_kernels`) over activations in the layout the kernels
  index (channels-last rows, `dense_rows`), the torch pass for any other.
- Time-folded causal convs (`time_folded_conv`): cuDNN runs 3-D convs with few channels far
  below its 2-D speed, so a 3-frame causal conv runs as one conv2d over frames stacked with their
  two predecessors on the channels. `folds_time_on_cuda` picks the convs where that pays.
- Sub-pixel upsamplers (`subpixel_conv`): nearest 2x upsampling then a 3x3 conv, computed at the
  source resolution with the four output phases' 2x2 kernels.
- Conv weights stored in the activations' layout (`weight_in_layout`).

Both conv forms take the same sums as the plain form, in another order. Why each pays, with the
measured figures: benchmarks/NOTES.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fp8_rows import HAS_TRITON
from .vae_layout import CL, dense_rows, empty_as

__all__ = [
    "VAEOps", "TORCH_OPS", "TRITON_OPS", "vae_ops", "rms_norm", "add_residual", "fold_in", "attention", "attention_gemm",
    "attention_cuda", "GEMM_SCORES", "FOLD_TIME_CHANNELS",
    "FOLD_MIN_OUT", "folds_time_on_cuda", "time_folded_weight", "time_folded_conv", "phase_kernels",
    "subpixel_weights", "subpixel_conv", "weight_in_layout",
]


# ---- per-pixel passes: torch ---------------------------------------------------------------------
def rms_norm(
    x: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    silu: bool = False,
    out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    tail: torch.Tensor | None = None,
    folded: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x` `[B, C, ...]` (plus a per-channel `bias` first) -> x / ||x|| * scale * gamma over the
    channels (then SiLU, in place), the norm accumulated in float32 whatever the dtype (bf16 sums
    of squares over 384 channels lose too much). Written into `out` when given, its last frames
    into `tail` too when given; with `folded` (a `[B*T, 3C, H, W]` time-folded buffer, see
    `time_folded_conv`) each frame goes to its three places there, and `folded` is returned."""
    if bias is not None:
        x = x + bias.view(-1, *(1,) * (x.dim() - 2))
    inv = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
    inv = inv.clamp_min_(1e-12).reciprocal_().mul_(scale)  # [B, 1, ...]
    y = torch.mul(x, inv.to(x.dtype), out=out)
    y.mul_(gamma.view(-1, *(1,) * (x.dim() - 2)))
    y = F.silu(y, inplace=True) if silu else y
    if folded is not None:
        fold_in(y, folded, 0)
    if tail is not None:
        tail.copy_(y[:, :, -tail.shape[2] :])
    return folded if folded is not None else y


def add_residual(h: torch.Tensor, bias: torch.Tensor | None, shortcut: torch.Tensor) -> torch.Tensor:
    """`h` (+ a per-channel `bias`) + `shortcut`, in place."""
    if bias is not None:
        h = h.add_(bias.view(-1, *(1,) * (h.dim() - 2)))
    return h.add_(shortcut)


def _slots(folded: torch.Tensor, b: int, c: int) -> torch.Tensor:
    """The time-folded buffer `[B*T, 3C, H, W]` seen as `[B, 3, C, T, H, W]` (slot, then frame)."""
    return folded.unflatten(0, (b, -1)).transpose(1, 2).unflatten(1, (3, c))


def fold_in(src: torch.Tensor, folded: torch.Tensor, shift: int) -> None:
    """Copy frames `src` `[B, C, n, H, W]` into the time-folded buffer `[B*T, 3C, H, W]`, the first
    of them `shift` frames before the buffer's first (2: the history; 0: the chunk). Frame f lands
    in slot i of output frame f - shift + 2 - i, where that frame exists."""
    b, c, n = src.shape[:3]
    slots = _slots(folded, b, c)
    t = slots.shape[3]
    for i in range(3):
        j0 = 2 - i - shift  # output frame of src frame 0
        f0, f1 = max(0, -j0), min(n, t - j0)
        if f1 > f0:
            slots[:, i, :, f0 + j0 : f1 + j0].copy_(src[:, :, f0:f1])


def gather_phases(y: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """The sub-pixel conv's `y` `[N, 4O, H+1, W+1]` (channels-last) -> its phases in place in `out`
    `[N, 2H, 2W, O]`: output pixel (2i + py, 2j + px), channel c is y[n, (2py + px) O + c, i + py,
    j + px]; one strided copy, then the conv's `bias` `[O]` added when given."""
    n, o = y.shape[0], y.shape[1] // 4
    h, w = out.shape[1] // 2, out.shape[2] // 2
    s_n, _, s_h, s_w = y.stride()
    phases = y.as_strided((n, h, 2, w, 2, o), (s_n, s_h, s_h + 2 * o, s_w, s_w + o, 1))
    out.view(n, h, 2, w, 2, o).copy_(phases)
    if bias is not None:
        out.add_(bias)


# ---- per-pixel passes: Triton (`vae_kernels`), where the tensors have the layout it indexes --------
def _never(x: torch.Tensor) -> bool:
    return False


def rms_norm_triton(x, gamma, scale, silu=False, out=None, bias=None, tail=None, folded=None) -> torch.Tensor:
    """`rms_norm` as one pass (`vae_kernels.rms_norm_silu`) on `dense_rows` tensors; else `rms_norm`."""
    if dense_rows(x) and (out is None or dense_rows(out)) and (tail is None or dense_rows(tail)):
        from . import vae_kernels

        return vae_kernels.launch_rms_norm_silu(x, gamma, scale, silu, out, bias, tail, folded=folded)
    return rms_norm(x, gamma, scale, silu, out, bias, tail, folded)


def add_residual_triton(h: torch.Tensor, bias: torch.Tensor | None, shortcut: torch.Tensor) -> torch.Tensor:
    """`add_residual` as one pass (`vae_kernels.add_bias_residual`) on `dense_rows` tensors."""
    if bias is not None and dense_rows(h) and dense_rows(shortcut) and shortcut.dtype == h.dtype:
        from . import vae_kernels

        return vae_kernels.launch_add_bias_residual(h, bias, shortcut)
    return add_residual(h, bias, shortcut)


def fold_in_triton(src: torch.Tensor, folded: torch.Tensor, shift: int) -> None:
    """`fold_in` as one pass (`vae_kernels.fold_rows`) from a `dense_rows` `src`."""
    if dense_rows(src):
        from . import vae_kernels

        vae_kernels.launch_fold_rows(src, folded, shift)
    else:
        fold_in(src, folded, shift)


def gather_phases_triton(y: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """`gather_phases` as one row copy, the bias added on the way (`vae_kernels.subpixel_rows`)."""
    from . import vae_kernels

    vae_kernels.launch_subpixel_rows(y, out, bias)


# ---- the mid-block's single-head attention ---------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of q, k, v `[N, 1, L, D]` (one head): SDPA."""
    return F.scaled_dot_product_attention(q, k, v)


# the most float32 scores `attention_gemm` holds at once (256 MiB): a block of query rows at a time
GEMM_SCORES = 1 << 26


def _softmax(s: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """softmax(scale · s) of float32 scores [R, L] in `dtype`: one Triton pass on CUDA (the
    scores read once, the weights written once in 16 bits), torch's three elsewhere."""
    if s.is_cuda and HAS_TRITON:
        from . import vae_kernels

        if s.shape[-1] <= vae_kernels.SOFTMAX_MAX_COLS:
            return vae_kernels.launch_softmax_rows(s, scale, dtype)
    return torch.softmax(s * scale, dim=-1).to(dtype)


def attention_gemm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`attention` as two GEMMs per block of query rows: float32 scores (the GEMM's accumulator,
    stored as it is), their softmax in float32 (one pass on CUDA, `_softmax`), the weights in q's
    dtype times v. Why: SDPA's fused kernels stop at head dim 256 and the VAE's is 384, which
    leaves the memory-efficient kernel; at the VAE's lowest resolution the scores fit in memory a
    few query blocks per image (`GEMM_SCORES`), and cuBLAS runs the two products at its GEMM rate."""
    n, _, length, d = q.shape
    out = torch.empty(n, 1, length, d, dtype=q.dtype, device=q.device)
    rows = max(1, GEMM_SCORES // length)
    cuda = q.device.type == "cuda"  # (the CPU's mm has no float32 output for bf16 inputs: float32 operands)
    for i in range(n):
        kt = k[i, 0].t() if cuda else k[i, 0].t().float()  # [D, L]
        for r in range(0, length, rows):
            qi = q[i, 0, r : r + rows]  # [rows, D]
            s = torch.mm(qi, kt, out_dtype=torch.float32) if cuda else torch.mm(qi.float(), kt)  # [rows, L]
            p = _softmax(s, d**-0.5, q.dtype)
            torch.mm(p, v[i, 0], out=out[i, 0, r : r + rows])
    return out


# torch.mm's float32 output for 16-bit inputs (`out_dtype`, newer torch builds)
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`attention` on CUDA: `attention_gemm` above head dim 256 (where SDPA has no fused kernel)."""
    return attention_gemm(q, k, v) if q.shape[-1] > 256 and _MM_OUT_DTYPE else attention(q, k, v)


NormFn = Callable[..., torch.Tensor]  # the signature of `rms_norm`


@dataclass(frozen=True)
class VAEOps:
    """The per-pixel passes one VAE call runs with (the same math, the same rounding)."""

    name: str
    # whether activation x goes through the one-pass kernels (they index its layout). Where it
    # does, a conv's bias is added by the pass after it (the next norm, the residual add): torch
    # adds it after cuDNN as a separate broadcast pass, the kernels for free
    fused: Callable[[torch.Tensor], bool]
    norm: NormFn
    add_residual: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
    fold_in: Callable[[torch.Tensor, torch.Tensor, int], None]
    gather_phases: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None]
    attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


TORCH_OPS = VAEOps("torch", _never, rms_norm, add_residual, fold_in, gather_phases, attention)
TRITON_OPS = VAEOps("triton", dense_rows, rms_norm_triton, add_residual_triton, fold_in_triton, gather_phases_triton,
                    attention_cuda)  # fmt: skip


def vae_ops(device: torch.device) -> VAEOps:
    """The per-pixel passes for a VAE on `device`: Triton's on CUDA when Triton is installed
    (they take the channels-last activations, the default there), else torch's."""
    return TRITON_OPS if device.type == "cuda" and HAS_TRITON else TORCH_OPS


# ---- time-folded causal convs --------------------------------------------------------------------
# 3x3x3 causal convs with these input channel counts (the full-resolution 96-channel ones and the
# encoder's first, on the video) and at least FOLD_MIN_OUT outputs run time-folded on CUDA: the
# rule the H100 measurements picked (benchmarks/NOTES.md).
FOLD_TIME_CHANNELS = frozenset({3, *range(64, 97)})
FOLD_MIN_OUT = 64


def folds_time_on_cuda(in_channels: int, out_channels: int) -> bool:
    """Whether a foldable causal conv of these widths runs time-folded on CUDA (the rule above)."""
    return in_channels in FOLD_TIME_CHANNELS and out_channels >= FOLD_MIN_OUT


def time_folded_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3-frame conv kernel `[O, C, 3, kh, kw]` -> the time-folded conv2d's `[O, 3C, kh, kw]`
    (channels-last): time tap i meets channel slot i."""
    w = weight.detach()
    return w.transpose(1, 2).flatten(1, 2).contiguous(memory_format=torch.channels_last)  # [O, 3, C, kh, kw] -> [O, 3C, kh, kw]


def time_folded_conv(
    x: torch.Tensor,
    prev: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    ops: VAEOps,
    norm: Callable[..., torch.Tensor] | None = None,
    norm_bias: torch.Tensor | None = None,
    keep_tail: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A causal 3-frame conv as one conv2d: output frame j's input channels are frames j, j + 1,
    j + 2 of [history (2 frames), chunk] side by side (`[B*T, 3C, H, W]`), and `weight` is the
    kernel with its time taps laid along the input channels (`time_folded_weight`).

    `x` `[B, C, T, H, W]`, `prev` the history `[B, C, 2, H, W]` (None: zeros, a clip's start).
    `norm`: the RMSNorm module before the conv (called `norm(x, silu=True, bias=norm_bias, ...)`,
    its arguments those of `rms_norm` after gamma and scale). Where the kernels take `x` and
    `prev` (`ops.fused`) it writes each frame into its three places in its one pass; otherwise
    the frames are normed, then copied in (`ops.fold_in`, or `fold_in`).
    -> (`[B, O, T, H, W]`, the next chunk's history `[B, C, 2, H, W]` if `keep_tail`, else None).
    """
    b, c, t, h, w = x.shape
    folded = torch.empty(b * t, 3 * c, h, w, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if prev is None:  # the start of a clip: zeros in the past
        prev = empty_as((b, c, 2, h, w), x).zero_()
    kernels = ops.fused(x) and ops.fused(prev)
    fold = ops.fold_in if kernels else fold_in
    fold(prev, folded, 2)
    tail = empty_as((b, c, 2, h, w), x) if keep_tail else None  # the next chunk's history
    if norm is not None and kernels:  # the norm writes the chunk's three places (and the tail) itself
        norm(x, silu=True, bias=norm_bias, tail=tail if t >= 2 else None, folded=folded)
    else:
        y = norm(x, silu=True, bias=norm_bias) if norm is not None else x
        fold(y, folded, 0)
        if tail is not None and t >= 2:
            tail.copy_(y[:, :, -2:])
    if tail is not None and t == 1:  # a 1-frame chunk: the history's last frame, then the chunk's
        tail[:, :, :1].copy_(prev[:, :, 1:])
        tail[:, :, 1:].copy_(_slots(folded, b, c)[:, 2, :, :1])
    y = F.conv2d(folded, weight, bias, stride, padding)
    return y.unflatten(0, (b, t)).transpose(1, 2), tail  # [B*T, O, H, W] -> [B, O, T, H, W], same storage


# ---- sub-pixel upsamplers ------------------------------------------------------------------------
# Nearest 2x upsampling then a 3x3 conv (padding 1), seen from one output phase (py, px) = (row,
# column) parity: the three kernel rows fall on two source rows, i-1 and i for even output rows
# (taps 0 | 1 + 2), i and i+1 for odd ones (taps 0 + 1 | 2); columns likewise.
_PHASE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))  # [parity, source tap, kernel tap]


def phase_kernels(w: torch.Tensor) -> torch.Tensor:
    """3x3 kernel `[O, C, 3, 3]` -> the four phases' 2x2 kernels on the source image, stacked as
    `[4O, C, 2, 2]` (phase 2*py + px first)."""
    taps = torch.tensor(_PHASE_TAPS, dtype=w.dtype, device=w.device)  # [2, 2, 3]
    k = torch.einsum("pak,qbl,ockl->pqocab", taps, taps, w)  # [py, px, O, C, 2, 2]
    return k.flatten(0, 2)


def subpixel_weights(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An upsampler's 3x3 conv -> (its `phase_kernels`, derived in float32, channels-last; its bias
    `[O]`), what `subpixel_conv` takes."""
    w = phase_kernels(weight.detach().float()).to(weight.dtype)
    return w.contiguous(memory_format=torch.channels_last), bias.detach()


def subpixel_conv(
    x: torch.Tensor,
    frames: int,
    phase_w: torch.Tensor,
    bias: torch.Tensor,
    gather: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None],
) -> torch.Tensor:
    """`conv3x3(nearest_upsample_2x(x))` per frame, computed at the source resolution: one 2x2
    conv with the four phases' kernels (`subpixel_weights`: 4/9 of the multiply-adds, no
    upsampled copy of the input), then one pass that puts each phase's pixels in place and adds
    the bias (`gather`, `VAEOps.gather_phases`: the Triton gather adds it on the way, where the
    conv would add it in a broadcast pass of its own).

    `x` `[B, f*C, T, H, W]` channels-last, its channels f groups that become f consecutive frames
    (as `models.vae._upsample2x` does) -> `[B, O, f*T, 2H, 2W]` channels-last."""
    b, fc, t, h, w = x.shape
    c = fc // frames
    rows = x.permute(0, 2, 3, 4, 1)  # [B, T, H, W, fC], the storage order
    if frames == 1:
        src = rows.reshape(b * t, h, w, c)  # a view
    else:  # the frame groups interleaved in time: one copy at the source resolution
        src = rows.reshape(b, t, h, w, frames, c).permute(0, 1, 4, 2, 3, 5).reshape(b * t * frames, h, w, c)
    y = F.conv2d(src.permute(0, 3, 1, 2), phase_w, None, padding=1)  # [N, 4O, H+1, W+1]
    y = y.contiguous(memory_format=torch.channels_last)  # (cuDNN's layout already; the CPU's may differ)
    n, o = y.shape[0], y.shape[1] // 4
    out = torch.empty(b, frames * t, 2 * h, 2 * w, o, dtype=x.dtype, device=x.device)
    gather(y, out.view(n, 2 * h, 2 * w, o), bias)
    return out.permute(0, 4, 1, 2, 3)  # [B, O, fT, 2H, 2W]


# ---- conv weights in the activations' layout -----------------------------------------------------
def weight_in_layout(conv: nn.Conv2d | nn.Conv3d, channels_last: bool) -> None:
    """Store `conv`'s weight channels-last (or plain) to match the activations: torch hands cuDNN
    the weight in the input's layout and copies it into that layout on every call otherwise.
    Values are unchanged; a weight already in the layout is left alone."""
    w = conv.weight
    fmt = (CL if w.dim() == 5 else torch.channels_last) if channels_last else torch.contiguous_format
    if not w.is_contiguous(memory_format=fmt):
        w.data = w.data.contiguous(memory_format=fmt)
