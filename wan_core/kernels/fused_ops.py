"""Single-pass ops for the float32 work between a block's matmuls (the "fused" `wan_core.kernels.block_ops`).

- `add_norm_mod`: residual add (optionally gated) + LayerNorm (optionally affine) + modulation,
  output bf16, or e4m3 codes with one scale per token (`QuantRows`) for FP8 linears.
- `gelu_quant`: tanh GELU of the FFN's hidden layer + its e4m3 codes for the second FP8 linear.
- `rms_norm_rope`: q or k's RMSNorm over all heads' channels and its 3-D RoPE, one pass.
- `linear_gelu`: the FFN's first bf16 linear with the GELU in the GEMM's epilogue (cuBLASLt),
  so the 13,824-wide hidden layer is written once instead of written, read and written again.

Each is a custom op: opaque to torch.compile (inductor would otherwise re-derive its looped
reductions), with a CUDA implementation (the Triton kernels of `fused_kernels`, cuBLASLt) and a
torch implementation of the same math for other devices, which is also the tests' reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .fp8_rows import FP8_DTYPE, HAS_TRITON, next_pow2, quantize_rows
from .rope import apply_rope

__all__ = [
    "QuantRows",
    "add_norm_mod",
    "gelu_quant",
    "linear_gelu",
    "rms_norm_rope",
    "reference_add_norm_mod",
    "reference_gelu_quant",
    "reference_rms_norm_rope",
]


class QuantRows(NamedTuple):
    """Activations [B, L, K] as e4m3 codes and one float32 scale per token (x ≈ codes · scale):
    what an FP8 linear quantises its input to, produced by the op before it instead."""

    codes: torch.Tensor  # [B, L, K] float8_e4m3fn
    scale: torch.Tensor  # [B * L, 1] float32

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


def _use_triton(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and HAS_TRITON


def _rows(v: torch.Tensor | None, b: int, c: int) -> torch.Tensor | None:
    """A per-batch-item vector ([B, 1, C] or [B, C]) as a contiguous [B, C] float32 tensor."""
    return None if v is None else v.reshape(b, c).float().contiguous()


# ---- add + norm + modulate ----------------------------------------------------------------------
def reference_add_norm_mod(x, delta, gate, weight, bias, scale, shift, eps: float, quant: bool, out_dtype):
    """The op's math in torch (the "torch" block ops' expressions). x [B, L, C] float32; delta
    [B, L, C] or None; gate/scale/shift [B, C] float32 or None; weight/bias [C] or None.
    Returns (new residual or an empty tensor when no delta, h [B, L, C] out_dtype or e4m3 codes,
    row scales [B*L, 1] or an empty tensor)."""
    b, _, c = x.shape
    x = x.contiguous()  # outputs are contiguous whatever x's strides (as the fake op says)
    x_new = x.new_empty(0)
    if delta is not None:
        d = delta * gate[:, None, :] if gate is not None else delta
        x = x_new = (x + d).to(x.dtype).contiguous()  # the residual keeps its dtype
    y = F.layer_norm(x.float(), (c,), None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if scale is not None:
        y = y * (1 + scale[:, None, :]) + shift[:, None, :]
    if not quant:
        return x_new, y.to(out_dtype), x.new_empty(0)
    codes, rs = quantize_rows(y.to(torch.bfloat16).reshape(-1, c))
    return x_new, codes.view(x.shape), rs


def _launch_add_norm_mod(x, delta, gate, weight, bias, scale, shift, eps: float, quant: bool, out_dtype):
    from . import fused_kernels

    b, l, c = x.shape
    x = x.contiguous()
    x_new = x.new_empty(x.shape) if delta is not None else x.new_empty(0)
    h = torch.empty(x.shape, dtype=FP8_DTYPE if quant else out_dtype, device=x.device)
    rs = torch.empty(b * l, 1, dtype=torch.float32, device=x.device) if quant else x.new_empty(0)
    dummy = x  # pointer for absent inputs (never read: their constexpr flag is off)
    block = next_pow2(c)
    kernel, opts = _pick(fused_kernels.add_norm_mod, fused_kernels.add_norm_mod_tuned, x)
    kernel[(b * l,)](
        x, delta.contiguous() if delta is not None else dummy, gate if gate is not None else dummy,
        weight.float().contiguous() if weight is not None else dummy, bias.float().contiguous() if bias is not None else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        x_new if delta is not None else dummy, h, rs if quant else dummy,
        l, c, eps, c,
        HAS_RES=delta is not None, HAS_GATE=gate is not None, AFFINE=weight is not None, MODULATE=scale is not None,
        QUANT=quant, BLOCK_C=block, **opts,
    )
    return x_new, h, rs


def _pick(plain, tuned, t: torch.Tensor):
    """The autotuned kernel on a GPU; the plain one (8 warps) in Triton's interpreter (tests)."""
    return (tuned, {}) if t.device.type == "cuda" else (plain, {"num_warps": 8})


@torch.library.custom_op("wan_core::add_norm_mod", mutates_args=())
def _add_norm_mod_op(x: torch.Tensor, delta: torch.Tensor | None, gate: torch.Tensor | None, weight: torch.Tensor | None,
                     bias: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None, eps: float,
                     quant: bool, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = _launch_add_norm_mod if _use_triton(x) else reference_add_norm_mod
    return fn(x, delta, gate, weight, bias, scale, shift, eps, quant, out_dtype)


@_add_norm_mod_op.register_fake
def _(x, delta, gate, weight, bias, scale, shift, eps, quant, out_dtype):
    b, l, _ = x.shape
    x_new = x.new_empty(x.shape) if delta is not None else x.new_empty(0)
    h = torch.empty(x.shape, dtype=FP8_DTYPE if quant else out_dtype, device=x.device)
    rs = torch.empty(b * l, 1, dtype=torch.float32, device=x.device) if quant else x.new_empty(0)  # fp32 whatever x's dtype
    return x_new, h, rs


def add_norm_mod(x: torch.Tensor, delta: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                 norm: torch.nn.Module | None = None, scale: torch.Tensor | None = None,
                 shift: torch.Tensor | None = None, eps: float = 1e-6, quant: bool = False,
                 out_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor | QuantRows]:
    """x (+ delta · gate) -> LayerNorm (`norm`'s affine weights, if any) -> · (1 + scale) + shift.

    x: [B, L, C] float32 residual stream; delta [B, L, C] (any float dtype); gate, scale, shift:
    [B, 1, C] or [B, C]. Returns (the new residual, x itself when there is no delta; h: [B, L, C]
    in out_dtype, or `QuantRows` when quant).
    """
    b, _, c = x.shape
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    eps = getattr(norm, "eps", eps)
    x_new, h, rs = _add_norm_mod_op(x, delta, _rows(gate, b, c), weight, bias, _rows(scale, b, c), _rows(shift, b, c),
                                    eps, quant, out_dtype)
    return (x_new if delta is not None else x), (QuantRows(h, rs) if quant else h)


# ---- GELU ------------------------------------------------------------------------------------------
def reference_gelu_quant(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u [..., N] bf16 -> (e4m3 codes [..., N] of gelu_tanh(u) rounded to bf16, scales [rows, 1])."""
    y = F.gelu(u, approximate="tanh").to(torch.bfloat16)
    codes, rs = quantize_rows(y.reshape(-1, u.shape[-1]))
    return codes.view(u.shape), rs


def _launch_gelu_quant(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .fp8_rows import launch_quant_rows

    n = u.shape[-1]
    codes, rs = launch_quant_rows(u.reshape(-1, n).contiguous(), gelu=True)
    return codes.view(u.shape), rs


@torch.library.custom_op("wan_core::gelu_quant", mutates_args=())
def _gelu_quant_op(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (_launch_gelu_quant if _use_triton(u) else reference_gelu_quant)(u)


@_gelu_quant_op.register_fake
def _(u):
    return torch.empty(u.shape, dtype=FP8_DTYPE, device=u.device), u.new_empty(u.numel() // u.shape[-1], 1,
                                                                               dtype=torch.float32)


def gelu_quant(u: torch.Tensor) -> QuantRows:
    """tanh GELU of u [B, L, N] (bf16), quantised per token for an FP8 linear."""
    return QuantRows(*_gelu_quant_op(u))


# ---- RMSNorm + RoPE -------------------------------------------------------------------------------
def reference_rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                            heads: int) -> torch.Tensor:
    """The "torch" block ops' expressions: RMSNorm (float32, rounded to x's dtype), then `apply_rope`."""
    b, l, c = x.shape
    y = F.rms_norm(x.float(), (c,), weight.float(), eps).to(x.dtype).contiguous()
    return apply_rope(y.view(b, l, heads, c // heads), cos, sin).view(b, l, c)


def _launch_rms_norm_rope(x, weight, cos, sin, eps: float, heads: int):
    from . import fused_kernels

    b, l, c = x.shape
    x = x.contiguous()
    out = x.new_empty(x.shape)
    pairs = next_pow2(c // 2)
    kernel, opts = _pick(fused_kernels.rms_norm_rope, fused_kernels.rms_norm_rope_tuned, x)
    kernel[(b * l,)](x, weight.float().contiguous(), cos.contiguous(), sin.contiguous(), out, l, c, eps,
                     HALF_D=c // heads // 2, BLOCK_P=pairs, **opts)
    return out


@torch.library.custom_op("wan_core::rms_norm_rope", mutates_args=())
def _rms_norm_rope_op(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                      heads: int) -> torch.Tensor:
    return (_launch_rms_norm_rope if _use_triton(x) else reference_rms_norm_rope)(x, weight, cos, sin, eps, heads)


@_rms_norm_rope_op.register_fake
def _(x, weight, cos, sin, eps, heads):
    return x.new_empty(x.shape)


def rms_norm_rope(x: torch.Tensor, norm: torch.nn.Module, rope: tuple[torch.Tensor, torch.Tensor],
                  heads: int) -> torch.Tensor:
    """RoPE(RMSNorm(x)) for q or k [B, L, C] (C = heads · D), with `norm`'s weight and eps;
    rope: the float32 cos/sin tables [L, D/2]. Returns [B, L, C] in x's dtype."""
    return _rms_norm_rope_op(x, norm.weight, rope[0], rope[1], norm.eps, heads)


# ---- linear + GELU in one GEMM ------------------------------------------------------------------------
@torch.library.custom_op("wan_core::linear_gelu", mutates_args=())
def _linear_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # [B*L, K]
    if x.device.type == "cuda":
        # cuBLASLt's GELU epilogue is the tanh form (Wan's): applied to the float32 accumulator plus bias
        y = torch._addmm_activation(bias, x2, weight.t(), use_gelu=True)
    else:  # the CPU build's _addmm_activation applies the erf GELU: not Wan's
        y = F.gelu(torch.addmm(bias, x2, weight.t()), approximate="tanh")
    return y.view(*x.shape[:-1], weight.shape[0])


@_linear_gelu_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear_gelu(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """gelu_tanh(linear(x)) for x [B, L, K]: one GEMM writing the activated output."""
    return _linear_gelu_op(x, linear.weight, linear.bias)
