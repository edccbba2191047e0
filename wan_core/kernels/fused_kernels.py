"""Triton kernels of `wan_core.kernels.fused_ops`: the float32 work between a block's matmuls, one pass each.

Why hand-written: inductor compiles a LayerNorm over 5,120 channels (and the FP8 activation
quantisation after it, whose amax needs the normalised row) as a looped reduction that reads the
float32 residual row two or three times. Here one program holds a whole token row in registers
(5,120 floats, 8,192 lanes with the tail masked) and reads and writes each tensor once: residual
add (with its gate), LayerNorm (with or without affine), modulation (·(1 + scale) + shift) and
either a bf16 output or the row quantised to e4m3 with its scale. The GELU kernel does the same
for the FFN's hidden row (13,824 channels): tanh GELU, then the e4m3 row for the second linear.

Rounding follows the plain torch code (the "torch" block ops) exactly where it rounds: the normalised row is rounded
to bf16 before its amax is taken, the multiplier 448/amax is rounded to bf16, and the product is
rounded to bf16 before the e4m3 cast (`wan_core.kernels.fp8_rows.quantize_rows` on a bf16 tensor).
"""

import triton
import triton.language as tl

__all__ = [
    "add_norm_mod",
    "rms_norm_rope",
    "quant_rows",
    "add_norm_mod_tuned",
    "rms_norm_rope_tuned",
    "quant_rows_tuned",
]
# 448 (the largest finite e4m3 value) and the amax floor of fp8_rows.quantize_rows are written as
# literals in the kernels: Triton's compiler refuses non-constexpr globals, its interpreter constexpr ones


@triton.jit
def _quant_store(y, codes_ptr, rs_ptr, row, offs, mask):
    """Round y (float32 row) to bf16, quantise it to e4m3 with one scale per row, store both."""
    yb = y.to(tl.bfloat16).to(tl.float32)
    amax = tl.max(tl.where(mask, tl.abs(yb), 0.0), 0)
    # FP8_MAX / max(amax, floor), divided as torch divides (a plain / is an approximate reciprocal)
    mult = tl.math.div_rn(448.0, tl.maximum(amax, 1e-12)).to(tl.bfloat16).to(tl.float32)
    codes = (yb * mult).to(tl.bfloat16).to(tl.float32).to(tl.float8e4nv)
    tl.store(codes_ptr + offs, codes, mask=mask)
    tl.store(rs_ptr + row, tl.math.div_rn(1.0, mult))


@triton.jit
def add_norm_mod(
    x_ptr, d_ptr, g_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr,  # inputs (unused ones are dummies)
    xo_ptr, h_ptr, rs_ptr,  # outputs: new residual, normalised row (bf16 or e4m3), row scale
    L, C, eps, mod_stride,  # rows per batch item, channels, LayerNorm eps, batch stride of g/sc/sh
    HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, AFFINE: tl.constexpr, MODULATE: tl.constexpr,
    QUANT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One token row: x (+ d · g) -> LayerNorm -> (· w + b) -> (· (1 + sc) + sh) -> bf16 or e4m3."""
    row = tl.program_id(0).to(tl.int64)
    mod = (row // L) * mod_stride  # the batch item's modulation vectors
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    x = tl.load(x_ptr + row * C + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        d = tl.load(d_ptr + row * C + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            d = d * tl.load(g_ptr + mod + offs, mask=mask, other=0.0)
        x = (x + d).to(xo_ptr.dtype.element_ty)  # rounded to the residual's dtype (float32 or bf16) before the norm
        tl.store(xo_ptr + row * C + offs, x, mask=mask)
        x = x.to(tl.float32)
    mean = tl.sum(x, 0) / C
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / C + eps)
    y = xc * rstd
    if AFFINE:
        y = y * tl.load(w_ptr + offs, mask=mask, other=0.0) + tl.load(b_ptr + offs, mask=mask, other=0.0)
    if MODULATE:
        y = y * (1.0 + tl.load(sc_ptr + mod + offs, mask=mask, other=0.0)) + tl.load(sh_ptr + mod + offs, mask=mask,
                                                                                    other=0.0)
    if QUANT:
        _quant_store(y, h_ptr + row * C, rs_ptr, row, offs, mask)
    else:
        tl.store(h_ptr + row * C + offs, y.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rms_norm_rope(x_ptr, w_ptr, cos_ptr, sin_ptr, o_ptr, L, C, eps, HALF_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """One token row of q or k: RMSNorm over all heads' channels (rounded to bf16, as the unfused
    RMSNorm returns), then the rotation of each head's adjacent channel pairs by the row's angles."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, 2 * BLOCK_P)
    mask = offs < C
    x = tl.load(x_ptr + row * C + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / C + eps)
    y = (x * rstd * tl.load(w_ptr + offs, mask=mask, other=0.0)).to(tl.bfloat16).to(tl.float32)
    y0, y1 = tl.split(tl.reshape(y, [BLOCK_P, 2]))  # the even and odd channels of each pair
    p = tl.arange(0, BLOCK_P)
    ang = (row % L) * HALF_D + p % HALF_D  # the pair's angle in the [L, D/2] tables
    pmask = p < C // 2
    c = tl.load(cos_ptr + ang, mask=pmask, other=0.0)
    s = tl.load(sin_ptr + ang, mask=pmask, other=0.0)
    out = tl.interleave(y0 * c - y1 * s, y0 * s + y1 * c)
    tl.store(o_ptr + row * C + offs, out.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def quant_rows(x_ptr, codes_ptr, rs_ptr, K, GELU: tl.constexpr, BLOCK_K: tl.constexpr):
    """One bf16 row of an FP8 linear's input -> e4m3 codes and its scale (fp8_rows.quantize_rows).
    GELU: the row is the FFN's hidden layer before its tanh GELU, applied first (rounded to bf16,
    as nn.GELU on bf16 returns)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * K + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2/pi) (x + 0.044715 x^3)
        tanh = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * z))  # exact at both ends: exp -> inf gives 1, exp -> 0 gives -1
        x = 0.5 * x * (1.0 + tanh)
    _quant_store(x, codes_ptr + row * K, rs_ptr, row, offs, mask)


def _tuned(fn, key, warps):
    """`fn` autotuned over the number of warps per row (GPU only; the interpreter runs `fn`)."""
    return triton.autotune([triton.Config({}, num_warps=w) for w in warps], key=key)(fn)


add_norm_mod_tuned = _tuned(add_norm_mod, ["C", "HAS_RES", "AFFINE", "MODULATE", "QUANT"], (4, 8, 16))
rms_norm_rope_tuned = _tuned(rms_norm_rope, ["C", "HALF_D"], (4, 8, 16))
quant_rows_tuned = _tuned(quant_rows, ["K", "GELU"], (4, 8, 16, 32))
