"""Attention backends behind one signature.

Every backend is a function `attn(q, k, v) -> out` with q: [B, Lq, H, D], k/v: [B, Lk, H, D]
and out: [B, Lq, H, D] in q's dtype. The model resolves its backend once, when it is built
(`get_attention`), and stores the function; a backend whose package is missing is an error
then, never a silent fallback in the middle of a run.

A backend may also offer `attn.codes(q, k, v) -> (codes, row scales)`: its output as e4m3 codes
[B, Lq, H, D] with one float32 scale per row [B·Lq, 1], the input an FP8 linear takes
(`block_ops`' "fused" `attend` hands them to the output projection when it takes codes).

One backend needs more than q, k, v: `radial_attn` (block-sparse, `radial_attention`) reads the
video layout and the sampling step from `attention_context`, takes its options at build time
(`get_attention(..., radial=RadialOptions(...))`), and runs self-attention only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .radial_attention import RadialOptions

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["AttentionFn", "BACKENDS", "ALIASES", "APPROXIMATE", "get_attention", "resolve_name"]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # [B, L, H, D] -> [B, H, L, D] views; SDPA accepts the strided layout.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _pinned_sdpa(backend) -> AttentionFn:
    from torch.nn.attention import sdpa_kernel

    def attn(q, k, v):
        with sdpa_kernel([backend]):
            return _sdpa(q, k, v)

    attn.__name__ = f"sdpa_{backend.name.lower()}"
    return attn


def _flash_attn2() -> AttentionFn:
    from flash_attn import flash_attn_func

    def attn(q, k, v):
        return flash_attn_func(q, k, v)

    return attn


def _flash_attn3() -> AttentionFn:
    try:
        from flash_attn_interface import flash_attn_func
    except ImportError:  # some builds ship it under the flash_attn package
        from flash_attn.flash_attn_interface import flash_attn_func

    def attn(q, k, v):
        out = flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out

    return attn


def _flash_attn3_fp8() -> AttentionFn:
    from .fa3_fp8 import fa3_fp8_attention

    return fa3_fp8_attention


def _sage() -> AttentionFn:
    from sageattention import sageattn

    def attn(q, k, v):
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)

    return attn


def _sage_triton(qk_int8: bool) -> Callable[[], AttentionFn]:
    def make():
        from .sage_attention import sage_fp8_attention, sage_fp8_attention_codes

        def attn(q, k, v):
            return sage_fp8_attention(q, k, v, qk_int8=qk_int8)

        def codes(q, k, v):
            return sage_fp8_attention_codes(q, k, v, qk_int8=qk_int8)

        attn.__name__ = "sage_triton_int8" if qk_int8 else "sage_triton"
        attn.codes = codes  # type: ignore[attr-defined]
        return attn

    return make


def _radial() -> AttentionFn:
    from .radial_attention import make_radial

    return make_radial(None, _sdpa, "cpu")  # get_attention makes it with its options, device and dense backend


def _sdpa_factory(name: str) -> Callable[[], AttentionFn]:
    def make():
        if name == "sdpa":
            return _sdpa
        from torch.nn.attention import SDPBackend

        table = {
            "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa_flash": SDPBackend.FLASH_ATTENTION,
            "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa_math": SDPBackend.MATH,
        }
        return _pinned_sdpa(table[name])

    return make


# name -> (python package it needs or None, factory)
BACKENDS: dict[str, tuple[str | None, Callable[[], AttentionFn]]] = {
    "sdpa": (None, _sdpa_factory("sdpa")),
    "sdpa_cudnn": (None, _sdpa_factory("sdpa_cudnn")),
    "sdpa_flash": (None, _sdpa_factory("sdpa_flash")),
    "sdpa_efficient": (None, _sdpa_factory("sdpa_efficient")),
    "sdpa_math": (None, _sdpa_factory("sdpa_math")),
    "flash_attn2": ("flash_attn", _flash_attn2),
    "flash_attn3": ("flash_attn_interface", _flash_attn3),
    # FlashAttention-3's e4m3 kernel on our quantisation (kernels/fa3_fp8.py): Hopper, 8-bit
    "flash_attn3_fp8": ("flash_attn_interface", _flash_attn3_fp8),
    "sage": ("sageattention", _sage),
    # our Triton kernel (kernels/sage_attention.py): FP8 (or INT8) Q·Kᵀ and FP8 P·V
    "sage_triton": ("triton", _sage_triton(qk_int8=False)),
    "sage_triton_int8": ("triton", _sage_triton(qk_int8=True)),
    # Radial Attention (kernels/radial_attention.py): block-sparse self-attention; Triton on CUDA, torch elsewhere
    "radial_attn": (None, _radial),
}
# Backends that are not exact (8-bit, or sparse): chosen for self-attention only; cross-attention
# then stays on the exact "auto" backend unless named.
APPROXIMATE = ("sage", "sage_triton", "sage_triton_int8", "flash_attn3_fp8", "radial_attn")

# LightX2V's config names and other common spellings.
ALIASES = {
    "torch_sdpa": "sdpa",
    "torch": "sdpa",
    "cudnn": "sdpa_cudnn",
    "flash_attn": "flash_attn2",
    "flash_attn_2": "flash_attn2",
    "flash_attn_3": "flash_attn3",
    "fa3_fp8": "flash_attn3_fp8",
    "flash_attn_3_fp8": "flash_attn3_fp8",
    "sage_attn": "sage",
    "sage_attn2": "sage_triton_int8",  # SageAttention2's scheme (INT8 Q·Kᵀ, FP8 P·V), our kernel: no package needed
    "sageattention": "sage",
    "radial": "radial_attn",
}


def resolve_name(name: str, device: str | torch.device | None = None) -> str:
    """Canonical backend name. `auto` is the fastest exact attention here: FlashAttention-3 on
    Hopper when the flash_attn_3 package is installed (faster than cuDNN there, benchmarks/NOTES.md),
    else cuDNN SDPA on Hopper/Ada GPUs, plain SDPA elsewhere."""
    key = ALIASES.get(name.lower(), name.lower())
    if key == "auto":
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
            major, _ = torch.cuda.get_device_capability(dev)
            if major == 9 and importlib.util.find_spec("flash_attn_interface") is not None:
                return "flash_attn3"
            return "sdpa_cudnn" if major >= 9 else "sdpa"
        return "sdpa"
    if key not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)} (aliases: {sorted(ALIASES)})")
    return key


def get_attention(
    name: str, device: str | torch.device | None = None, radial: RadialOptions | None = None
) -> AttentionFn:
    """Resolve a backend once; a missing optional package is an ImportError naming it.

    radial: the options of `radial_attn` (None: its defaults); its dense layers and steps run the
    exact `auto` backend of `device`, or `sage_triton` with the 8-bit sparse kernel (kernel "fp8").
    """
    key = resolve_name(name, device)
    package, factory = BACKENDS[key]
    if package is not None and importlib.util.find_spec(package.split(".")[0]) is None:
        pip = {"flash_attn": "flash-attn", "flash_attn_interface": "flash-attn 3 (hopper build)", "sageattention": "sageattention"}
        raise ImportError(
            f"attention backend {name!r} needs the package {package!r}, which is not installed "
            f"(pip install {pip.get(package, package)}), or choose 'sdpa'"
        )
    if key == "flash_attn3_fp8":
        from .fa3_fp8 import available

        why = available(device if device is not None else "cpu")
        if why is not None:
            raise RuntimeError(f"attention backend {name!r} (FlashAttention-3 FP8) cannot run here: {why}; choose 'sdpa'")
    if key.startswith("sage_triton"):
        from .sage_attention import available

        why = available(device if device is not None else "cpu")
        if why is not None:
            raise RuntimeError(f"attention backend {name!r} (8-bit Triton kernel) cannot run here: {why}; choose 'sdpa'")
    if key == "radial_attn":
        from .radial_attention import RadialOptions, check_kernel, make_radial

        options = radial if radial is not None else RadialOptions()
        check_kernel(options, device)  # its own error first: the dense backend's would name sage_triton
        return make_radial(options, get_attention(options.dense_backend, device), device)
    fn = factory()
    fn.backend_name = key  # type: ignore[attr-defined]
    return fn
