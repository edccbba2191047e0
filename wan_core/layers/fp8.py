"""FP8 linears for the DiT's block matmuls, swapped in after the model is built.

Storage is the lightx2v "scaled_fp8_e4m3" layout: `weight` float8_e4m3fn [out, in] and
`weight_scale` float32 [out, 1] (one scale per output channel, amax(|W| over in) / 448), so that
W ≈ weight · weight_scale; the bias stays in the compute dtype. Per-tensor scales of other file
layouts are broadcast into [out, 1] when they are loaded (`wan_core.loading.fp8`).

The matmul kernel is chosen once, when the model is built (like the attention backends), never
per call:

- "scaled_mm": `torch._scaled_mm` "rowwise": each token's activations are quantised to e4m3
  with their own scale amax(|x| over in) / 448 (dynamic, per token), the weight keeps its
  per-channel scales, and the GEMM runs on FP8 tensor cores with a bfloat16 output. Needs a
  CUDA GPU of compute capability 8.9 or newer (Ada, Hopper) and a bfloat16 compute dtype; the
  CPU build of torch also implements it (slowly), which lets CI check the math.
- "scaled_mm_fast": the same with cuBLAS "fast accumulation" (no periodic promotion of the
  FP8 partial sums to float32): faster on Hopper, slightly less accurate for long K.
- "sgl": `sgl_kernel.fp8_scaled_mm` (the sgl-kernel package), same scales as "scaled_mm".
- "dequant": weight.float() · scale cast to the compute dtype, then `F.linear`; for CPUs and
  GPUs without FP8 tensor cores. Memory is still halved; the matmul itself is not faster.
- "auto": "scaled_mm_fast" on a CUDA GPU that has FP8, else "dequant": fast accumulation is
  faster with the output's cosine to bf16 unchanged (benchmarks/NOTES.md log), the same trade
  LightX2V makes (its fp8-torchao scheme); "scaled_mm" remains for the exact float32 promotion.

LightX2V's `dit_quant_scheme` names are accepted (see `LIGHTX2V_SCHEMES` for the mapping and
why); its schemes that are not per-channel e4m3 with per-token activations (int8, block-128,
nvfp4/mxfp, other vendors' kernels) are refused with the list of the supported names.

Only the linears inside the blocks are quantised (`BLOCK_LINEAR_RE`); the embeddings, norms,
modulation, head, time/text/image projections stay in higher precision (FORMATS.md "FP8 weight
layouts"), because their errors are not averaged out over 40 blocks.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.fp8_rows import (  # noqa: F401
    _AMAX_FLOOR,
    FP8_DTYPE,
    FP8_MAX,
    HAS_TRITON,
    next_pow2,
    quantize_rows,
    quantize_rows_op,
    rowwise_scaled_mm,
)
from .stack import layer_state

__all__ = [
    "Fp8KernelLayer",
    "FP8_DTYPE",
    "FP8_MAX",
    "KERNELS",
    "LIGHTX2V_SCHEMES",
    "BLOCK_LINEAR_RE",
    "is_block_linear",
    "resolve_kernel",
    "quantize_weight",
    "FP8Linear",
    "quantize_model",
    "set_fp8_kernel",
    "fp8_linear_names",
]


KERNELS = ("scaled_mm", "scaled_mm_fast", "sgl", "dequant", "auto")

# LightX2V `dit_quant_scheme` -> our kernel. All of LightX2V's "fp8-*" DiT schemes listed here
# store the same thing we do (e4m3 weights, per-output-channel float32 scales, `weight_scale`
# keys) and quantise the activations per token at run time; they differ only in which library
# runs the GEMM.
LIGHTX2V_SCHEMES: dict[str, str] = {
    "fp8": "auto",  # generic name: the best FP8 kernel this device has
    "fp8-sgl": "sgl",  # sgl_kernel.fp8_scaled_mm: the same kernel
    "fp8-torchao": "scaled_mm_fast",  # LightX2V calls torch._scaled_mm rowwise with use_fast_accum=True
    "fp8-vllm": "scaled_mm",  # vLLM's cutlass_scaled_mm: same math, different library
    "fp8-q8f": "scaled_mm",  # q8_kernels' fp8 GEMM: same math, different library
    "fp8-triton": "scaled_mm",  # LightX2V's own triton GEMM: same math
    "fp8-pertensor": "scaled_mm",  # per-tensor weight scale broadcast to per-channel; activations per token
}
_REFUSED_SCHEMES = {
    "fp8-b128-deepgemm": "128x128 block-wise weight scales (DeepGEMM)",
    "fp8-musa": "Moore Threads GPUs",
    "fp8-intel-xpu": "Intel GPUs",
}

BLOCK_LINEAR_RE = re.compile(r"^blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.([qkvo]|k_img|v_img)|ffn\.[02])$")


def is_block_linear(name: str) -> bool:
    """True for the module names FP8 applies to: blocks.N.{self_attn.q/k/v/o,
    cross_attn.q/k/v/o/k_img/v_img, ffn.0, ffn.2}."""
    return BLOCK_LINEAR_RE.match(name) is not None


# ---- kernels --------------------------------------------------------------------------------
# Every kernel: (x [M, K] compute dtype, weight e4m3 [N, K], weight_scale f32 [N, 1], bias [N] | None,
#                out_dtype) -> [M, N] out_dtype.
KernelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.dtype], torch.Tensor]


def _dequant_kernel(x, weight, weight_scale, bias, out_dtype):
    w = (weight.float() * weight_scale).to(x.dtype)  # [N, K]
    return F.linear(x, w, bias)


# Kernels that take activations already quantised per token (codes e4m3 [M, K], scale f32 [M, 1]):
# (codes, x_scale, weight, weight_scale, bias, out_dtype) -> [M, N]. A fused op before the linear
# (`wan_core.kernels.fused_ops`) hands them `QuantRows` instead of a bf16 tensor.
CodesFn = Callable[..., torch.Tensor]


def _make_scaled_mm_codes(fast_accum: bool) -> CodesFn:
    def codes_kernel(codes, x_scale, weight, weight_scale, bias, out_dtype):
        return rowwise_scaled_mm(codes, x_scale, weight, weight_scale, bias, out_dtype, fast_accum)

    return codes_kernel


def _quantizing(codes_kernel: CodesFn, name: str) -> KernelFn:
    """The kernel for bf16 activations: quantise them per token, then run `codes_kernel`."""

    def kernel(x, weight, weight_scale, bias, out_dtype):
        return codes_kernel(*quantize_rows_op(x), weight, weight_scale, bias, out_dtype)

    kernel.__name__ = name
    return kernel


def _make_sgl() -> CodesFn:
    try:
        import sgl_kernel
    except ImportError as e:
        raise ImportError(
            "FP8 kernel 'sgl' (LightX2V 'fp8-sgl') needs the sgl-kernel package: pip install sgl-kernel "
            "(or this project's [sgl] extra), or choose kernel 'scaled_mm'"
        ) from e
    if not hasattr(sgl_kernel, "fp8_scaled_mm"):
        raise ImportError("the installed sgl-kernel has no fp8_scaled_mm; upgrade it or choose kernel 'scaled_mm'")

    def codes_kernel(codes, x_scale, weight, weight_scale, bias, out_dtype):
        return sgl_kernel.fp8_scaled_mm(codes, weight.t(), x_scale, weight_scale, out_dtype, bias)

    return codes_kernel


_CPU_SCALED_MM: bool | None = None


def _cpu_has_scaled_mm() -> bool:
    """Whether this torch build runs rowwise `_scaled_mm` on the CPU (probed once)."""
    global _CPU_SCALED_MM
    if _CPU_SCALED_MM is None:
        try:
            a = torch.ones(16, 16).to(FP8_DTYPE)
            torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
            _CPU_SCALED_MM = True
        except (RuntimeError, NotImplementedError):
            _CPU_SCALED_MM = False
    return _CPU_SCALED_MM


def _has_fp8_gemm(device: torch.device) -> bool:
    if device.type == "cuda":
        return (
            torch.cuda.is_available()
            and torch.version.hip is None
            and torch.cuda.get_device_capability(device) >= (8, 9)
        )
    return device.type == "cpu" and _cpu_has_scaled_mm()


def resolve_kernel(name: str, device: str | torch.device | None = None) -> str:
    """A kernel name or LightX2V scheme -> one of "scaled_mm", "scaled_mm_fast", "sgl", "dequant".

    Checks that the device can run it (clear errors here, at build time, never mid-run).
    """
    key = name.strip().lower()
    if key in _REFUSED_SCHEMES:
        raise ValueError(f"FP8 scheme {name!r} ({_REFUSED_SCHEMES[key]}) is not supported; supported: {_supported()}")
    key = LIGHTX2V_SCHEMES.get(key, key)
    if key not in KERNELS:
        raise ValueError(
            f"unknown FP8 kernel/scheme {name!r}; supported: {_supported()} "
            "(int8, nvfp4/mxfp and block-wise schemes are not FP8 per-channel and are not supported)"
        )
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if key == "auto":
        return "scaled_mm_fast" if dev.type == "cuda" and _has_fp8_gemm(dev) else "dequant"
    if key in ("scaled_mm", "scaled_mm_fast") and dev.type != "meta" and not _has_fp8_gemm(dev):
        where = (
            f"GPU {torch.cuda.get_device_name(dev)} (capability {torch.cuda.get_device_capability(dev)})"
            if dev.type == "cuda" and torch.cuda.is_available()
            else f"device {dev}"
        )
        raise RuntimeError(
            f"FP8 kernel {key!r} needs FP8 tensor cores (CUDA compute capability 8.9+: Ada, Hopper) "
            f"and the {where} has none; use kernel 'dequant' (or 'auto')"
        )
    if key == "sgl":
        _make_sgl()  # import check now, not at the first forward
        if dev.type != "cuda":
            raise RuntimeError("FP8 kernel 'sgl' runs on CUDA GPUs only; use 'dequant' on the CPU")
    return key


def _supported() -> str:
    return ", ".join(k for k in KERNELS) + "; LightX2V schemes " + ", ".join(LIGHTX2V_SCHEMES)


def _codes_fn(name: str) -> CodesFn | None:
    """The kernel's form for pre-quantised activations; None for "dequant" (it takes bf16 only)."""
    if name in ("scaled_mm", "scaled_mm_fast"):
        return _make_scaled_mm_codes(name == "scaled_mm_fast")
    if name == "sgl":
        return _make_sgl()
    if name == "dequant":
        return None
    raise ValueError(f"unresolved FP8 kernel {name!r}")


def _kernel_fn(name: str) -> KernelFn:
    codes = _codes_fn(name)
    return _dequant_kernel if codes is None else _quantizing(codes, name)


# ---- weights --------------------------------------------------------------------------------
def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (e4m3 codes [out, in], float32 scale [out, 1]), scale = amax(|W| over in) / 448.

    Computed in float32 and rounded to nearest (ties to even) by the e4m3 cast, as LightX2V's
    converter does; the clamp only guards the cast against values that round past 448.
    """
    w32 = w.float()
    scale = w32.abs().amax(dim=1, keepdim=True).clamp(min=_AMAX_FLOOR) / FP8_MAX  # [out, 1]
    codes = (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale


class FP8Linear(nn.Module):
    """A linear layer with e4m3 weights and per-output-channel float32 scales.

    A drop-in for `nn.Linear` inside the blocks: forward(x [..., in]) -> [..., out] in the compute
    dtype, so wrappers (the LoRA branch) can add to its output. `compute_dtype` is the dtype its
    input is expected in and its output is returned in.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device), requires_grad=False
        )
        self.weight_scale = nn.Parameter(
            torch.ones(out_features, 1, dtype=torch.float32, device=device), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.kernel = "dequant"
        self._mm: KernelFn = _dequant_kernel
        self._mm_codes: CodesFn | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> FP8Linear:
        """Quantise an `nn.Linear` (per-channel scales); the kernel stays 'dequant' until `set_kernel`."""
        cd = compute_dtype or linear.weight.dtype
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, cd, device="meta")
        codes, scale = quantize_weight(linear.weight.detach())
        m.weight = nn.Parameter(codes, requires_grad=False)
        m.weight_scale = nn.Parameter(scale, requires_grad=False)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().to(cd), requires_grad=False)
        return m

    def set_kernel(self, name: str, device: str | torch.device | None = None) -> None:
        """Choose the matmul kernel (see the module docstring); checks dims and dtype now."""
        dev = device if device is not None else self.weight.device
        key = resolve_kernel(name, dev)
        if key != "dequant":
            self._check_fp8_gemm_shapes(key)
        self.kernel = key
        self._mm = _kernel_fn(key)
        self._mm_codes = _codes_fn(key)

    @property
    def takes_codes(self) -> bool:
        """Whether forward accepts `QuantRows` (activations quantised by the op before it): a
        kernel with an FP8 GEMM, and no hooks that would need the bf16 input (LoRA, offload)."""
        return self._mm_codes is not None and not (self._forward_hooks or self._forward_pre_hooks)

    @property
    def projection_operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str] | None:
        """(weight, weight_scale, bias, kernel) for an op that runs this layer's GEMM on operands of
        its own making (`wan_core.kernels.text_projected`), or None: only the `torch._scaled_mm`
        kernels, and no hooks (a LoRA branch or offload needs the layer's own forward)."""
        if not self.takes_codes or self.kernel not in ("scaled_mm", "scaled_mm_fast"):
            return None
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        return self.weight, self.weight_scale, bias, self.kernel

    def _check_fp8_gemm_shapes(self, key: str) -> None:
        # cuBLASLt's FP8 GEMM (and torch's checks in front of it) need K and N to be multiples
        # of 16 (16-byte aligned rows of the e4m3 operands); every Wan linear is (5120, 13824,
        # 1536, 8960 all are), the token count M may be anything.
        if self.in_features % 16 or self.out_features % 16:
            raise ValueError(
                f"FP8 kernel {key!r}: torch._scaled_mm needs in_features and out_features to be multiples of 16, "
                f"this layer is {self.in_features} -> {self.out_features}; use kernel 'dequant' for it"
            )
        if self.compute_dtype != torch.bfloat16:
            raise ValueError(
                f"FP8 kernel {key!r} returns bfloat16 (rowwise scaling); the compute dtype is {self.compute_dtype}. "
                "Build the model in bfloat16 or use kernel 'dequant'"
            )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W ≈ weight · weight_scale as a dense [out, in] tensor (for merging, checks, exports)."""
        return (self.weight.float() * self.weight_scale).to(dtype or self.compute_dtype)

    def forward(self, x) -> torch.Tensor:
        """x: [..., in] in any float dtype, or `wan_core.kernels.fused_ops.QuantRows` (when `takes_codes`)."""
        lead = x.shape[:-1]
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        if isinstance(x, tuple):  # QuantRows: codes [..., in] e4m3, scale [rows, 1]
            if self._mm_codes is None:
                raise TypeError(f"FP8Linear with kernel {self.kernel!r} takes no pre-quantised input")
            codes = x.codes.reshape(-1, self.in_features)
            y = self._mm_codes(codes, x.scale, self.weight, self.weight_scale, bias, self.compute_dtype)
        else:
            x2 = x.reshape(-1, self.in_features).to(self.compute_dtype).contiguous()  # [B, L, in] -> [B*L, in]
            y = self._mm(x2, self.weight, self.weight_scale, bias, self.compute_dtype)  # [B*L, out]
        return y.reshape(*lead, self.out_features)  # [B, L, out]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"kernel={self.kernel}, compute_dtype={self.compute_dtype}"
        )


# ---- whole models ---------------------------------------------------------------------------
def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)  # works for Sequential children too ("ffn.0")


def quantize_model(
    model: nn.Module,
    kernel: str = "auto",
    compute_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Swap every block linear of a built DiT for an `FP8Linear` (per-channel scales), in place.

    The other layers are left as they are (higher precision). Each linear is quantised and its
    high-precision weight released before the next one, so peak memory grows by one layer only.
    Returns the model.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_block_linear(n)]
    if not names:
        raise ValueError("quantize_model: no block linears (blocks.N.self_attn/cross_attn/ffn) found in this model")
    for n in names:
        lin = model.get_submodule(n)
        _set_child(model, n, FP8Linear.from_linear(lin, compute_dtype))
        del lin
    set_fp8_kernel(model, kernel, device)
    return model


def set_fp8_kernel(model: nn.Module, kernel: str, device: str | torch.device | None = None) -> str:
    """Resolve `kernel` once for the model's device and store it on every FP8Linear; returns the resolved name."""
    fp8 = [m for m in model.modules() if isinstance(m, FP8Linear)]
    if not fp8:
        raise ValueError("this model has no FP8 linears (quantize_model or load_fp8_dit first)")
    if getattr(model, "dtype", None) == FP8_DTYPE:
        raise RuntimeError(
            "this model reports float8 as its compute dtype (it reads it off a block linear's weight): the DiT "
            "must take the dtype of a linear's input from its `compute_dtype` where it has one (FP8Linear)"
        )
    dev = device if device is not None else fp8[0].weight.device
    key = resolve_kernel(kernel, dev)
    for m in fp8:
        m.set_kernel(key, dev)
    layer_state(model).fp8_kernel = key
    return key


class Fp8KernelLayer:
    """The matmul kernel of a model's FP8 linears as a layer (`wan_core.layers.stack`): the loader
    swaps the linears in; this chooses how they run (another kernel: no reload)."""

    name = "fp8_kernel"

    def __init__(self, kernel: str, device: str | torch.device | None = None):
        self.kernel, self.device = kernel, device
        self.resolved = resolve_kernel(kernel, device)  # a kernel this device lacks fails here

    def needed(self, model: nn.Module) -> bool:
        return layer_state(model).fp8_kernel != self.resolved

    def apply(self, model: nn.Module) -> None:
        set_fp8_kernel(model, self.kernel, self.device)

    def remove(self, model: nn.Module) -> None:
        raise NotImplementedError("FP8 linears are part of a loaded model; load it again in high precision")


def fp8_linear_names(model: nn.Module) -> list[str]:
    """Names of the modules that are FP8Linear, in model order."""
    return [n for n, m in model.named_modules() if isinstance(m, FP8Linear)]
