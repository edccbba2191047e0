"""The float32 work between a transformer block's matmuls, as functions chosen once per model.

`Block.forward` (`wan_core.models.dit`) is the one forward of a block. For the work around its
linears it calls the functions of a `BlockOps` stored on the block and its self-attention
(`blk.ops`, chosen by `WanModel.set_block_ops`), as its attention modules call `attn_fn`:

- `add_norm_mod(x, delta, gate, norm, scale, shift, out_dtype, feeds) -> (x, h)`: residual add
  x + delta · gate (when delta), LayerNorm `norm`, modulation h · (1 + scale) + shift (when
  scale); h goes to the linears `feeds`.
- `qk_norm_rope(u, norm, rope, heads) -> [B, L, H, D]`: q's or k's RMSNorm, then the 3-D RoPE.
- `ffn(ffn, h) -> [B, L, C]`: the feed-forward (linear, tanh GELU, linear).
- `attend(fn, o, *args) -> o's output`: an attention call `fn(*args)` ([B, L, H, D]) flattened to
  [B, L, C], through the output projection `o`.
- `cross_attend(fn, o, norm_q, q, k, v, lengths, k_img, v_img) -> o's output`: the same for the
  cross-attention, q [B, L, H, D] as the q linear wrote it (before its RMSNorm `norm_q`).

Two implementations share these signatures:

- "torch": the plain expressions, what the model computes with nothing chosen (the CPU default).
- "fused": the single-pass custom ops of `wan_core.kernels.fused_ops` (Triton on CUDA, their torch
  reference elsewhere; opaque to torch.compile). Each residual add is done by the op that also
  computes the next LayerNorm and modulation; the FFN's GELU runs in the first linear's GEMM
  epilogue (bf16). Where every linear the output feeds is an FP8 linear whose kernel takes e4m3
  codes (`takes_codes`: an FP8 GEMM and no hooks), the op hands them the rows already quantised
  (`QuantRows`, one quantisation shared by q, k and v; the FFN's hidden row is quantised by its
  GELU op). The same holds after attention: a backend with `fn.codes` (the 8-bit and the text
  kernels, `attention.py`) stores its output as e4m3 codes for an output projection that takes
  them, instead of bf16 that the projection would quantise in a pass of its own. A backend with
  `fn.projected` (the text attention, `text_projected`) computes its output projection itself
  where `o` hands it its operands (a plain linear, an FP8 linear's `projection_operands`): for a
  short prompt, the attention weights times the values already projected; it then also takes q
  before its RMSNorm: the rows' factors (a reduction over q) with the norm's weight folded into
  the keys, so the text kernels read q as the q linear wrote it and no normalised copy is written
  (a prompt too long for them goes to the exact backend, which gets q times its factors in one
  pass, `text_attention.scaled_rows`). A linear with
  hooks (a LoRA branch, offload's weight streaming) or an attention function without `codes` (a
  sequence-parallel wrapper) gets bf16 as in "torch": every feature keeps working, only the
  saving is lost. Why: benchmarks/NOTES.md.

"auto" is "fused" on a CUDA device when Triton is installed, else "torch".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import text_projected
from .fp8_rows import HAS_TRITON
from .fused_ops import QuantRows, add_norm_mod, gelu_quant, linear_gelu, rms_norm_rope
from .rope import apply_rope

__all__ = ["BlockOps", "BLOCK_OPS", "get_block_ops", "resolve_block_ops"]


@dataclass(frozen=True)
class BlockOps:
    """One implementation of a block's float32 work (signatures in the module docstring)."""

    name: str
    add_norm_mod: Callable
    qk_norm_rope: Callable
    ffn: Callable
    attend: Callable
    cross_attend: Callable


# ---- torch: the plain expressions --------------------------------------------------------------
def _torch_add_norm_mod(x, delta, gate, norm, scale, shift, out_dtype, feeds):
    if delta is not None:
        x = (x + delta * gate if gate is not None else x + delta).to(x.dtype)  # the residual keeps its dtype
    h = norm(x)
    if scale is not None:
        h = h * (1 + scale) + shift
    return x, h.to(out_dtype)


def _torch_qk_norm_rope(u, norm, rope, heads):
    b, l, _ = u.shape
    return apply_rope(norm(u).view(b, l, heads, -1), *rope)  # [B, L, C] -> [B, L, H, D]


def _torch_ffn(ffn, h):
    return ffn(h)


def _torch_attend(fn, o, *args):
    return o(fn(*args).flatten(2))  # [B, L, H, D] -> [B, L, C]


def _normed(norm_q, q):
    return norm_q(q.flatten(2)).view_as(q)  # RMSNorm over the channels: [B, L, H, D] -> [B, L, C] -> back


def _torch_cross_attend(fn, o, norm_q, q, *args):
    return _torch_attend(fn, o, _normed(norm_q, q), *args)


# ---- fused: single-pass custom ops -------------------------------------------------------------
def _takes_codes(linears) -> bool:
    return all(getattr(m, "takes_codes", False) for m in linears)


def _plain(m: nn.Module) -> bool:
    """An nn.Linear whose weight can be used directly (no hooks, bias present)."""
    return type(m) is nn.Linear and m.bias is not None and not (m._forward_hooks or m._forward_pre_hooks)


def _per_token(v) -> bool:
    """A modulation vector with one row per token ([B, L, C], Wan2.2 per-token timesteps)."""
    return v is not None and v.dim() == 3 and v.shape[1] != 1


def _fused_add_norm_mod(x, delta, gate, norm, scale, shift, out_dtype, feeds):
    # The fused op takes one modulation row per batch item: no norm there (a model without the
    # cross-attention norm) or per-token modulation -> the plain ops.
    if not isinstance(norm, nn.LayerNorm) or _per_token(gate) or _per_token(scale):
        return _torch_add_norm_mod(x, delta, gate, norm, scale, shift, out_dtype, feeds)
    quant = out_dtype == torch.bfloat16 and _takes_codes(feeds)
    return add_norm_mod(x, delta, gate, norm=norm, scale=scale, shift=shift, quant=quant, out_dtype=out_dtype)


def _fused_qk_norm_rope(u, norm, rope, heads):
    if isinstance(norm, nn.Identity):  # a model without q/k norms: nothing to fuse
        return _torch_qk_norm_rope(u, norm, rope, heads)
    b, l, _ = u.shape
    return rms_norm_rope(u, norm, rope, heads).view(b, l, heads, -1)  # [B, L, C] -> [B, L, H, D]


def _fused_ffn(ffn, h):
    f0, _, f2 = ffn
    if isinstance(h, QuantRows):  # add_norm_mod found that both linears take codes
        return f2(gelu_quant(f0(h)))
    if _plain(f0):
        return f2(linear_gelu(h, f0))
    return ffn(h)


def _projection_operands(o: nn.Module) -> tuple | None:
    """(weight, weight_scale, bias, mm) of an output projection whose GEMM an attention op may run
    itself (`text_projected.MM_KINDS`), or None."""
    if _plain(o):
        return o.weight, None, o.bias, "linear"
    return getattr(o, "projection_operands", None)


def _fused_attend(fn, o, *args):
    projected = getattr(fn, "projected", None)
    if projected is not None and (operands := _projection_operands(o)) is not None:
        return projected(*args, *operands)
    codes = getattr(fn, "codes", None)
    if codes is None or not _takes_codes((o,)):
        return _torch_attend(fn, o, *args)
    out, scale = codes(*args)
    return o(QuantRows(out.flatten(2), scale))  # codes [B, L, H, D] -> [B, L, C]


def _fused_cross_attend(fn, o, norm_q, q, k, v, lengths, k_img, v_img):
    projected = getattr(fn, "projected", None)
    operands = _projection_operands(o) if projected is not None else None
    # (PROJECTED_MAX_KEYS 0 turns the projected form off, and the fold with it: the plain path's numbers)
    if operands is None or isinstance(norm_q, nn.Identity) or text_projected.PROJECTED_MAX_KEYS == 0:
        return _fused_attend(fn, o, _normed(norm_q, q), k, v, lengths, k_img, v_img)
    # RMSNorm(q)·k = r (q · (γ ⊙ k)): each row's factor r here (inductor: one reduction reading q),
    # the weight γ [H, D] into the keys (a few hundred rows)
    r = torch.rsqrt(q.float().square().mean(dim=(2, 3)) + norm_q.eps)  # [B, L]
    g = norm_q.weight.float().view(q.shape[2:])
    k = (k.float() * g).to(k.dtype)
    if k_img is not None:
        k_img = (k_img.float() * g).to(k_img.dtype)
    return projected(q, k, v, lengths, k_img, v_img, *operands, q_scale=r)


BLOCK_OPS: dict[str, BlockOps] = {
    "torch": BlockOps("torch", _torch_add_norm_mod, _torch_qk_norm_rope, _torch_ffn, _torch_attend, _torch_cross_attend),
    "fused": BlockOps("fused", _fused_add_norm_mod, _fused_qk_norm_rope, _fused_ffn, _fused_attend, _fused_cross_attend),
}


def resolve_block_ops(name: str = "auto", device: str | torch.device | None = None) -> str:
    """'auto' -> 'fused' on CUDA with Triton installed, else 'torch'; other names are checked."""
    if name == "auto":
        dev = torch.device(device if device is not None else "cpu")
        return "fused" if dev.type == "cuda" and HAS_TRITON else "torch"
    if name not in BLOCK_OPS:
        raise ValueError(f"unknown block ops {name!r}; choose one of {['auto', *BLOCK_OPS]}")
    return name


def get_block_ops(name: str = "auto", device: str | torch.device | None = None) -> BlockOps:
    """The `BlockOps` named (see `resolve_block_ops` for 'auto')."""
    return BLOCK_OPS[resolve_block_ops(name, device)]
