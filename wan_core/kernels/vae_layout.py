"""Memory layouts of the VAE's `[B, C, T, H, W]` activations, as the VAE model, its conv forms
(`vae_forms`) and its Triton passes (`vae_kernels`) all need to tell them apart."""

from __future__ import annotations

import torch

__all__ = ["CL", "is_channels_last", "dense_rows", "empty_as"]

CL = torch.channels_last_3d  # `[B, C, T, H, W]` stored as `[B, T, H, W, C]`


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a `[B, C, T, H, W]` tensor stored as `[B, T, H, W, C]` (and not also plain contiguous)."""
    return x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=CL)


def dense_rows(t: torch.Tensor) -> bool:
    """True when `[B, C, T, H, W]` `t` stores each batch item as T*H*W dense rows of C channels
    (channels-last, or a time slice of a channels-last buffer): the layout `vae_kernels` indexes."""
    if t.dim() != 5:
        return False
    _, c, _, h, w = t.shape
    return t.stride(1) == 1 and t.stride(4) == c and t.stride(3) == w * c and t.stride(2) == h * w * c


def empty_as(shape, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of `shape` with the dtype, device and memory layout of `like`."""
    fmt = CL if is_channels_last(like) else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)
