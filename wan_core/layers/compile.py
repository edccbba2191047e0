"""Speed options applied to a built model.

Regional compilation: each transformer block is compiled on its own (all 40 share one graph,
so the compile cost is paid once, about 17 s on an H100). Inductor fuses the float32 work
around the matmuls (norms, modulation, RoPE, gates, residual adds), which in eager mode costs
about 0.8 s of a 3.5 s 480p forward (benchmarks/RESULTS.md). Before compiling, the blocks are
swapped to `FusedBlock` (wan_core.layers.fused_block): the LayerNorms with their residual adds,
modulations and FP8 activation quantisations run as single-pass ops, which inductor's looped
reductions are not.
"""

from __future__ import annotations

import torch

__all__ = ["compile_blocks", "should_compile"]


def should_compile(option: bool | str, device) -> bool:
    """'auto' compiles on CUDA only (on the CPU the compile time is not worth it)."""
    if isinstance(option, str):
        if option != "auto":
            raise ValueError(f"compile must be True, False or 'auto', got {option!r}")
        return torch.device(device).type == "cuda"
    return bool(option)


def compile_blocks(model, mode: str | None = None, fuse: bool = True) -> None:
    """Compile every block of `model.blocks` in place (module.compile keeps names and state dict),
    after swapping them to `FusedBlock` unless `fuse` is False."""
    if fuse:
        from .fused_block import fuse_blocks

        fuse_blocks(model)
    for block in model.blocks:
        block.compile(mode=mode, dynamic=False)
