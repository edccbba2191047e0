"""Regional torch.compile of the DiT blocks, as a layer (`wan_core.layers.stack`).

Each transformer block is compiled on its own: all blocks share one graph, so the compile cost is
paid once, and inductor fuses the float32 work around the matmuls (norms, modulation, RoPE,
gates, residual adds); see benchmarks/NOTES.md for what it buys. Where the model's block ops are
the fused ones (`WanModel.set_block_ops`), that work stays single-pass custom ops, opaque to inductor.
"""

from __future__ import annotations

import torch

from .stack import layer_state

__all__ = ["compile_blocks", "should_compile", "CompileLayer"]


def should_compile(option: bool | str, device) -> bool:
    """'auto' compiles on CUDA only (on the CPU the compile time is not worth it)."""
    if isinstance(option, str):
        if option != "auto":
            raise ValueError(f"compile must be True, False or 'auto', got {option!r}")
        return torch.device(device).type == "cuda"
    return bool(option)


def compile_blocks(model, mode: str | None = None) -> None:
    """Compile every block of `model.blocks` in place (module.compile keeps names and state dict)."""
    for block in model.blocks:
        block.compile(mode=mode, dynamic=False)
    layer_state(model).compile = True


def allow_hook_guards() -> None:
    """Let torch.compile guard on module hooks, so a LoRA branch added to (or removed from) a block
    that already ran compiled makes it recompile instead of being silently left out.

    By default dynamo skips these guards (`skip_nnmodule_hook_guards=True`, for speed): a forward
    hook registered after a block's first compiled call never runs. The flag is process-wide and
    only adds guards; it must be set before the blocks are first traced, which is why the compile
    layer sets it when it compiles.
    """
    import torch._dynamo

    torch._dynamo.config.skip_nnmodule_hook_guards = False


class CompileLayer:
    """Regional compile (after the FP8 swap, before LoRAs: their branches are hooks the guards see)."""

    name = "compile"

    def __init__(self, mode: str | None = None):
        self.mode = mode

    def needed(self, model) -> bool:
        return not layer_state(model).compile

    def apply(self, model) -> None:
        allow_hook_guards()
        if self.mode is None:
            compile_blocks(model)
        else:
            compile_blocks(model, self.mode)
        layer_state(model).compile = True

    def remove(self, model) -> None:
        raise NotImplementedError("a compiled model stays compiled; build the model again without the compile layer")
