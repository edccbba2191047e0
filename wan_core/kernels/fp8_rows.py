"""Per-token (per-row) e4m3 quantisation of activations, as the FP8 linears and the fused block ops
need it: the torch math (`quantize_rows`) and the one-pass Triton kernel behind the custom op
`wan_core::quantize_rows` (`quantize_rows_op`); and the rowwise-scaled FP8 GEMM that takes such
rows (`rowwise_scaled_mm`), shared by the FP8 linears and the ops that run a projection themselves."""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["FP8_DTYPE", "FP8_MAX", "HAS_TRITON", "next_pow2", "quantize_rows", "quantize_rows_op", "launch_quant_rows",
           "head_rows_codes", "row_scales", "rowwise_scaled_mm"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
_AMAX_FLOOR = 1e-12  # keeps the scale of an all-zero row/token finite (its codes are 0 anyway)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) dynamic e4m3 quantisation: x [M, K] -> (codes e4m3 [M, K], scale f32 [M, 1]).

    The multiplier 448/amax is rounded to x's dtype first and the returned scale is its exact
    inverse, so codes · scale reproduces x up to the e4m3 rounding alone. |x · mult| stays
    below 450 (448 times two roundings of 2^-9), which the e4m3 cast rounds to 448: no clamp pass.
    """
    amax = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True, dtype=torch.float32)  # [M, 1], one pass
    mult = (FP8_MAX / amax.clamp(min=_AMAX_FLOOR)).to(x.dtype)
    codes = (x * mult).to(FP8_DTYPE)
    return codes, mult.float().reciprocal()


HAS_TRITON = importlib.util.find_spec("triton") is not None  # the fused Triton ops run on CUDA when True


def next_pow2(n: int) -> int:
    """The Triton block covering a row of n elements (a whole row per program)."""
    return 1 << (n - 1).bit_length()


def launch_quant_rows(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] bf16 (contiguous) -> (codes [M, K] e4m3, scales [M, 1]) by the Triton kernel, of
    gelu_tanh(x) when `gelu` (fused_ops.gelu_quant)."""
    from . import fused_kernels

    m, k = x.shape
    codes = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block = next_pow2(k)
    if x.device.type == "cuda":  # autotuned warps per row
        fused_kernels.quant_rows_tuned[(m,)](x, codes, scale, k, GELU=gelu, BLOCK_K=block)
    else:  # Triton's interpreter (tests)
        fused_kernels.quant_rows[(m,)](x, codes, scale, k, GELU=gelu, BLOCK_K=block)
    return codes, scale


@torch.library.custom_op("wan_core::quantize_rows", mutates_args=())
def quantize_rows_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` as one op: on CUDA (bf16) a Triton kernel holding each row in registers, one
    read and one write, where inductor's code for it reads each row twice (amax, then scale)."""
    x = x.contiguous()
    if x.is_cuda and x.dtype == torch.bfloat16 and HAS_TRITON:
        return launch_quant_rows(x)
    return quantize_rows(x)


@quantize_rows_op.register_fake
def _(x):
    return torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device), x.new_empty(x.shape[0], 1, dtype=torch.float32)


def head_rows_codes(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention output [B, L, H, D] -> (e4m3 codes [B, L, H, D], scales [B·L, 1]), one scale per
    token over all heads (`quantize_rows_op`): the `codes` of a backend path whose kernel stores bf16."""
    b, l, h, d = out.shape
    codes, scale = quantize_rows_op(out.reshape(b * l, h * d))
    return codes.view(b, l, h, d), scale


def row_scales(mult: torch.Tensor, rows: int) -> torch.Tensor:
    """One e4m3 multiplier per batch item [B] -> each row's scale [B·rows, 1] (its inverse), the
    form `QuantRows` carries: for an attention kernel that stores codes under one bound per item."""
    return (1.0 / mult).repeat_interleave(rows)[:, None].contiguous()


def rowwise_scaled_mm(codes, x_scale, weight, weight_scale, bias, out_dtype, fast_accum: bool, out=None) -> torch.Tensor:
    """codes e4m3 [M, K] (rows · x_scale [M, 1]) times weight e4m3 [N, K] (rows · weight_scale [N, 1]),
    transposed, plus bias [N]: [M, N] out_dtype (written into `out` when given), through
    `torch._scaled_mm` "rowwise" (with cuBLAS fast accumulation when `fast_accum`)."""
    # mat2 must be column-major [K, N]: the transpose of the row-major [N, K] weight is.
    return torch._scaled_mm(codes, weight.t(), scale_a=x_scale, scale_b=weight_scale.t(), bias=bias,
                            out_dtype=out_dtype, use_fast_accum=fast_accum, out=out)
