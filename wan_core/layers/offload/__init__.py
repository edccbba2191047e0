"""CPU offload of the DiT (by model or by block, with prefetch) and of the other models, by hooks.

    handle = enable_offload(model, granularity="block", vram_budget_gb=14)  # after FP8 / LoRA / compile
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

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

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

__all__ = [
    "enable_offload",
    "OffloadHandle",
    "BlockOffload",
    "ModelOffload",
    "OffloadOptions",
    "OffloadPlan",
    "offload_component",
    "explain_oom",
    "plan_block_offload",
    "activation_bytes",
    "weight_sizes",
    "tokens_for",
    "GRANULARITIES",
    "ACT_BYTES_PER_TOKEN_CHANNEL",
    "ACT_FIXED_BYTES",
    "GiB",
]

GRANULARITIES = ("model", "block", "phase")


def _input_tokens(model: nn.Module, args: tuple, kwargs: dict) -> int | None:
    """Tokens of a DiT forward from its latent input x [B, C, F, H, W] (patch size from the config)."""
    x = args[0] if args else kwargs.get("x")
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        return None
    pt, ph, pw = model.cfg.patch_size
    b, _, f, h, w = x.shape
    return b * (f // pt) * (h // ph) * (w // pw)


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
    handle = BlockOffload(model, device, resident_blocks=first, prefetch=prefetch)
    handle.budget_gb = vram_budget_gb
    if vram_budget_gb is not None:
        planned: dict[str, Any] = {"tokens": tokens}

        def follow_input(args, kwargs):
            # Re-plan when unloaded (free: nothing to move) or when the input grew (needed to stay
            # within the budget); a smaller input while loaded runs within the current plan, so
            # alternating sizes inside one loop do not reload the resident blocks.
            n = _input_tokens(model, args, kwargs)
            known = planned["tokens"] is not None
            if n is None or n == planned["tokens"] or (known and handle.is_loaded and n < planned["tokens"]):
                return
            handle.plan = plan(n)
            planned["tokens"] = n
            handle.set_resident_blocks(handle.plan.resident_blocks)

        if tokens is not None:
            handle.plan = plan(tokens)
        handle.tokens_hook = follow_input
    return handle


@dataclass(frozen=True)
class OffloadOptions:
    """Offload settings in LightX2V's vocabulary (its config keys), plus ours.

    LightX2V keys: `cpu_offload`, `offload_granularity` ("block" by default, as in LightX2V),
    `t5_cpu_offload` / `text_encoder_cpu_offload`, `clip_cpu_offload`, `vae_cpu_offload` (each
    defaults to `cpu_offload`). Ours: `vram_budget_gb`, `offload_resident_blocks`,
    `offload_prefetch`. One difference: LightX2V's `t5_cpu_offload` runs T5 on the CPU; here the
    component is kept in host memory and moved to the GPU for its stage (`offload_component`).
    """

    cpu_offload: bool = False
    granularity: str = "block"
    vram_budget_gb: float | None = None
    resident_blocks: int | None = None
    prefetch: int = 1
    text_encoder: bool = False
    image_encoder: bool = False
    vae: bool = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> OffloadOptions:
        on = bool(cfg.get("cpu_offload", False))
        gran = cfg.get("offload_granularity") or "block"
        if gran not in GRANULARITIES:
            raise ValueError(f"offload_granularity must be one of {GRANULARITIES}, got {gran!r}")
        budget = cfg.get("vram_budget_gb")
        resident = cfg.get("offload_resident_blocks")
        return cls(
            cpu_offload=on,
            granularity="block" if gran == "phase" else gran,
            vram_budget_gb=float(budget) if budget else None,
            resident_blocks=int(resident) if resident is not None else None,
            prefetch=int(cfg.get("offload_prefetch", 1)),
            text_encoder=bool(cfg.get("t5_cpu_offload", cfg.get("text_encoder_cpu_offload", on))),
            image_encoder=bool(cfg.get("clip_cpu_offload", on)),
            vae=bool(cfg.get("vae_cpu_offload", on)),
        )

    def apply(
        self, model: nn.Module, tokens: int | None = None, device: str | torch.device = "cuda"
    ) -> OffloadHandle | None:
        """`enable_offload` with these settings, or None when `cpu_offload` is off."""
        if not self.cpu_offload:
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
