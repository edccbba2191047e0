"""CPU offload of the DiT (by model or by block, with prefetch) and of the other models, by hooks.

    handle = enable_offload(model, granularity="block", vram_budget_gb=14)  # after FP8 / LoRA / compile (layers.stack)
    with handle.loaded():            # the denoising loop; device memory released after
        for step in ...: model(...)
    with offload_component(vae):     # the VAE on the GPU for its stage only
        video = vae.decode(latent)
    except torch.OutOfMemoryError as e: raise explain_oom(e, model, tokens) from e

Granularities (LightX2V's `offload_granularity`): "model" moves the whole DiT for the loop;
"block" streams blocks through a ring of device slots (see `handles.py`); "phase" (LightX2V
splits a block into its attention / FFN phases) runs as "block": our unit of copy is one
contiguous block buffer, and prefetching the next block already hides the copy behind the
current block's compute, so a finer unit would only add synchronisation points.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..stack import layer_state
from .budget import (
    ACT_BYTES_PER_TOKEN_CHANNEL,
    ACT_FIXED_BYTES,
    GiB,
    OffloadPlan,
    activation_bytes,
    explain_oom,
    plan_block_offload,
    tokens_for,
    weight_sizes,
)
from .handles import BlockOffload, ModelOffload, OffloadHandle, offload_component
from .host import packed_host_bytes, release_host_cache, trim_host_memory

__all__ = [
    "enable_offload",
    "OffloadHandle",
    "BlockOffload",
    "ModelOffload",
    "OffloadOptions",
    "OffloadLayer",
    "offload_handle",
    "dit_loaded",
    "OffloadPlan",
    "offload_component",
    "explain_oom",
    "plan_block_offload",
    "activation_bytes",
    "weight_sizes",
    "tokens_for",
    "GRANULARITIES",
    "OFFLOAD_GRANULARITIES",
    "ACT_BYTES_PER_TOKEN_CHANNEL",
    "ACT_FIXED_BYTES",
    "GiB",
    "packed_host_bytes",
    "release_host_cache",
    "trim_host_memory",
]

GRANULARITIES = ("model", "block", "phase")
OFFLOAD_GRANULARITIES = ("model", "block")  # what "phase" becomes


def enable_offload(
    model: nn.Module,
    granularity: str = "block",
    resident_blocks: int | None = None,
    vram_budget_gb: float | None = None,
    tokens: int | None = None,
    prefetch: int = 1,
    device: str | torch.device = "cuda",
) -> OffloadHandle:
    """Keep the DiT's weights in pinned host memory and bring them to `device` as the forward needs them.

    Call it last, after FP8 (`quantize_model`), LoRA and `compile_blocks`: it packs the tensors the
    blocks hold at that point (a parameter replaced later while unloaded is repacked at the next
    load; a change in the module structure is an error). The model's weights may be anywhere
    (host, or the device: they move to the host block by block); nothing is put on the device
    until the first forward or `handle.load()`.

    granularity: "model" | "block" | "phase" (runs as "block", see the package doc).
    resident_blocks: block offload only; the first N blocks stay on the device (default 0: every
        block streams, the least memory). Exclusive with `vram_budget_gb`.
    vram_budget_gb: "use at most X GiB" (what torch allocates: weights + activations, see
        `budget.py`): the number of resident blocks is chosen from the measured block sizes and
        the activation estimate for `tokens`; without `tokens`, for the token count of the
        forward's input (re-planned at the next load for another video size, at once for a
        larger one). A budget below what block
        offload needs with no resident block raises ValueError. With granularity "model", the
        budget is checked (the whole DiT must fit) when `tokens` is given.
    prefetch: blocks copied ahead of the running one (ring of prefetch + 1 slots).
    device: where the DiT computes; "cpu" runs the same mechanism with a second CPU placement
        (for tests).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"offload_granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "model":
        if resident_blocks is not None:
            raise ValueError("resident_blocks applies to offload_granularity='block' only")
        if vram_budget_gb is not None and tokens is not None:
            rest, blocks = weight_sizes(model)
            need = rest + sum(blocks) + activation_bytes(model, tokens)
            if need > vram_budget_gb * GiB:
                raise ValueError(
                    f"model offload puts the whole DiT on the GPU: {need / GiB:.1f} GiB at {tokens} tokens, over the "
                    f"{vram_budget_gb:g} GiB budget; use offload_granularity='block'"
                )
        return ModelOffload(model, device)
    if resident_blocks is not None and vram_budget_gb is not None:
        raise ValueError("give resident_blocks or vram_budget_gb, not both")
    sizes = weight_sizes(model) if vram_budget_gb is not None else None

    def plan(n_tokens: int) -> OffloadPlan:
        p = plan_block_offload(model, vram_budget_gb, n_tokens, prefetch=prefetch, sizes=sizes)
        if not p.fits:
            raise ValueError(
                f"vram_budget_gb={vram_budget_gb:g} is too small for block offload at {n_tokens} tokens: it needs at "
                f"least {p.min_bytes / GiB:.2f} GiB (non-block weights {p.rest_bytes / GiB:.2f}, {p.slots} block slots "
                f"of {p.block_bytes / GiB:.2f}, activations {p.activation_bytes / GiB:.2f}); raise the budget or lower "
                "the resolution / frame count"
            )
        return p

    first = 0 if resident_blocks is None else resident_blocks
    if vram_budget_gb is not None and tokens is not None:
        first = plan(tokens).resident_blocks
    planner = plan if vram_budget_gb is not None else None
    return BlockOffload(model, device, resident_blocks=first, prefetch=prefetch, planner=planner, tokens=tokens)


@dataclass(frozen=True)
class OffloadOptions:
    """CPU offload settings: the one description the ComfyUI node, the CLI / config keys and
    `ModelSpec.offload` share, checked here once.

    granularity: CPU offload of the DiT: None (resident), "model" (all of it on the GPU for the
        denoising loop only) or "block" (blocks streamed through the GPU); "phase" (LightX2V)
        runs as "block" (see the package doc), "none" / "" mean None.
    vram_budget_gb: block offload, "use at most X GiB" (weights + activations): the number of
        resident blocks is chosen per video size (0 / None: no budget).
    resident_blocks: block offload, blocks kept on the GPU for good (None: every block streams);
        exclusive with the budget.
    prefetch: blocks copied ahead of the running one.
    text_encoder / image_encoder / vae: keep T5 / CLIP / the VAE in host memory, on the GPU only
        for their stage (independent of the DiT's granularity, as LightX2V's flags are).
    """

    granularity: str | None = None
    vram_budget_gb: float | None = None
    resident_blocks: int | None = None
    prefetch: int = 1
    text_encoder: bool = False
    image_encoder: bool = False
    vae: bool = False

    def __post_init__(self):
        gran = self.granularity
        gran = None if gran in (None, "none", "") else ("block" if gran == "phase" else gran)
        if gran is not None and gran not in OFFLOAD_GRANULARITIES:
            raise ValueError(f"offload_granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        object.__setattr__(self, "granularity", gran)
        budget = float(self.vram_budget_gb) if self.vram_budget_gb else None
        object.__setattr__(self, "vram_budget_gb", budget)
        if self.resident_blocks is not None:
            object.__setattr__(self, "resident_blocks", int(self.resident_blocks))
        object.__setattr__(self, "prefetch", int(self.prefetch))
        for name in ("text_encoder", "image_encoder", "vae"):
            object.__setattr__(self, name, bool(getattr(self, name)))
        if budget is not None and self.resident_blocks is not None:
            raise ValueError("give vram_budget_gb or offload_resident_blocks, not both")
        if budget is not None and budget < 0:
            raise ValueError(f"vram_budget_gb must be positive, got {budget}")
        if budget is not None and gran is None:
            raise ValueError("vram_budget_gb needs CPU offload of the DiT (cpu_offload=true, granularity 'block')")
        if budget is not None and gran != "block":
            raise ValueError(
                f"vram_budget_gb applies to granularity 'block' (it picks the blocks kept on the GPU), got granularity "
                f"{gran!r}; set the budget to 0 or the granularity to block"
            )
        if self.resident_blocks is not None and (self.resident_blocks < 0 or gran != "block"):
            raise ValueError(
                f"offload_resident_blocks={self.resident_blocks} needs offload_granularity 'block' and a count >= 0 "
                "(blocks kept on the GPU for good; 0: every block streams)"
            )
        if self.prefetch < 1:
            raise ValueError(f"offload_prefetch must be >= 1 (blocks copied ahead of the running one), got {self.prefetch}")

    @property
    def cpu_offload(self) -> bool:
        """Whether the DiT is offloaded (LightX2V's `cpu_offload`)."""
        return self.granularity is not None

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> OffloadOptions:
        """From LightX2V config keys: `cpu_offload`, `offload_granularity` ("block" by default, as in
        LightX2V), `t5_cpu_offload` / `text_encoder_cpu_offload`, `clip_cpu_offload`, `vae_cpu_offload`
        (each defaults to `cpu_offload`); ours: `vram_budget_gb`, `offload_resident_blocks`,
        `offload_prefetch`. One difference: LightX2V's `t5_cpu_offload` runs T5 on the CPU; here the
        component is kept in host memory and moved to the GPU for its stage (`offload_component`).
        A budget or resident count without `cpu_offload` is dropped with a warning."""
        on = bool(cfg.get("cpu_offload", False))
        gran = cfg.get("offload_granularity") or "block"
        if gran not in GRANULARITIES:
            raise ValueError(f"offload_granularity must be one of {GRANULARITIES}, got {gran!r}")
        budget, resident = cfg.get("vram_budget_gb"), cfg.get("offload_resident_blocks")
        if not on and (budget or resident is not None):
            warnings.warn("vram_budget_gb / offload_resident_blocks have no effect without cpu_offload=true", stacklevel=3)
        return cls(
            granularity=gran if on else None,
            vram_budget_gb=budget if on else None,
            resident_blocks=resident if on else None,
            prefetch=cfg.get("offload_prefetch", 1),
            text_encoder=cfg.get("t5_cpu_offload", cfg.get("text_encoder_cpu_offload", on)),
            image_encoder=cfg.get("clip_cpu_offload", on),
            vae=cfg.get("vae_cpu_offload", on),
        )

    def apply(
        self, model: nn.Module, tokens: int | None = None, device: str | torch.device = "cuda"
    ) -> OffloadHandle | None:
        """`enable_offload` of the DiT with these settings, or None when it stays resident."""
        if self.granularity is None:
            return None
        return enable_offload(
            model,
            self.granularity,
            resident_blocks=self.resident_blocks,
            vram_budget_gb=self.vram_budget_gb,
            tokens=tokens,
            prefetch=self.prefetch,
            device=device,
        )


class OffloadLayer:
    """The DiT's offload as a layer (`wan_core.layers.stack`): last of the weight layers.

    The options are part of a cached model's identity (another granularity or budget is another
    model), so `needed` only compares presence: attached when the options offload the DiT.
    """

    name = "offload"

    def __init__(self, options: OffloadOptions | None, device: str | torch.device):
        self.options, self.device = options, device

    def needed(self, model: nn.Module) -> bool:
        want = self.options is not None and self.options.cpu_offload
        return want != (layer_state(model).offload is not None)

    def apply(self, model: nn.Module) -> None:
        self.remove(model)
        o = self.options
        if o is not None and o.cpu_offload:
            enable_offload(model, o.granularity, resident_blocks=o.resident_blocks, vram_budget_gb=o.vram_budget_gb,
                           prefetch=o.prefetch, device=self.device)  # fmt: skip

    def remove(self, model: nn.Module) -> None:
        """Weights back in host memory as plain tensors, hooks gone."""
        handle = layer_state(model).offload
        if handle is not None:
            handle.remove()


def offload_handle(module: nn.Module) -> OffloadHandle | None:
    """The `OffloadHandle` attached to a module (the DiT, T5, CLIP, the VAE), or None when resident."""
    return layer_state(module).offload if isinstance(module, nn.Module) else None


@contextlib.contextmanager
def dit_loaded(model: nn.Module, x: torch.Tensor | None = None) -> Iterator[nn.Module]:
    """The DiT's weights on its device inside (an offloaded DiT: `handle.loaded()`; a resident one:
    nothing to do). Wrap the denoising loop in it, so the GPU is free for the VAE after.

    x: the latent [B, C, F, H, W] the loop will feed; with a VRAM budget the resident blocks are
    planned for its token count before loading (once loaded, the plan can no longer change).
    """
    handle = offload_handle(model)
    if handle is None:
        yield model
        return
    if isinstance(handle, BlockOffload) and x is not None and not handle.is_loaded:
        handle.plan_for(x)  # a budget too small for this size fails here
    with handle.loaded():
        yield model
