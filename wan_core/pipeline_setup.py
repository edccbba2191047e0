"""Choices `WanPipeline.create_generator` makes while setting a run up: which FP8 kernel and
attention backends a config's names come down to on this machine, which config.json a DiT
given as one file takes its architecture from, and the residual stream LightX2V's environment asks for."""

from __future__ import annotations

import os
import warnings

import torch

from .loading.discover import model_config_json
from .spec import residual_name

__all__ = ["sync", "fp8_choice", "attention_choice", "arch_config", "residual_choice"]



def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def fp8_choice(scheme: str | None, device: str) -> str:
    """`dit_quant_scheme` -> what ModelSpec.fp8 gets. Like an attention backend named in a config, a
    scheme is a preference: one this machine cannot run (sgl-kernel missing, no FP8 tensor cores, a
    CPU) falls back to 'auto' with a warning ('auto' = torch._scaled_mm, fast accumulation, on Ada/Hopper; the
    dequantizing kernel elsewhere); names wan_core does not support at all are errors."""
    from .layers.fp8 import resolve_kernel

    name = scheme or "fp8"
    try:
        resolve_kernel(name, device)
        return name
    except (ImportError, RuntimeError) as e:
        fallback = resolve_kernel("auto", device)
        warnings.warn(f"dit_quant_scheme={name!r} cannot run here ({e}); using FP8 kernel {fallback!r}", stacklevel=3)
        return "auto"


def attention_choice(name: str | None, fallback: str | None, device: str, key: str) -> str | None:
    """A backend named in a config is a preference: if it cannot run here (package missing, a GPU
    kernel on a CPU, a sparse attention wan_core does not have, or a self-attention-only backend
    named for cross-attention), warn and use `fallback`."""
    from .kernels.attention import get_attention, resolve_name

    if name is None:
        return fallback
    try:
        if key != "self_attn_1_type" and resolve_name(name, device) == "radial_attn":
            raise ValueError("radial_attn is a self-attention backend (it needs the video layout)")
        get_attention(name, device)
        return name
    except (ImportError, ValueError, RuntimeError) as e:
        instead = repr(fallback) if fallback is not None else "the self-attention's backend (exact SDPA if that is 8-bit)"
        warnings.warn(f"config {key}={name!r} cannot run here ({e}); using {instead}", stacklevel=3)
        return fallback


def arch_config(model_path: str | None, dit, expert: str | None = None) -> str | None:
    """config.json of a DiT given as one file: model_path's (a Wan2.2 expert's: its folder's), as LightX2V reads it."""
    if not (isinstance(dit, str) and os.path.isfile(dit)):
        return None
    return model_config_json(model_path, expert) if expert else model_config_json(model_path)


def residual_choice(environ=os.environ) -> str:
    """The residual stream's dtype from LightX2V's SENSITIVE_LAYER_DTYPE: FP32 -> float32, BF16 ->
    bfloat16; None or unset -> 'auto' (LightX2V's None runs every sensitive layer in bf16; here bf16
    residuals with FP8 linears, float32 with bf16 ones, the official model's numbers)."""
    raw = environ.get("SENSITIVE_LAYER_DTYPE", "None")
    if raw.strip().lower() in ("none", "auto"):
        return "auto"
    try:
        return residual_name(raw.strip())  # LightX2V's spellings (FP32, bf16, torch.float32) are ours too
    except ValueError:
        raise ValueError(f"SENSITIVE_LAYER_DTYPE={raw!r}: LightX2V's values are FP32, BF16 or None") from None
