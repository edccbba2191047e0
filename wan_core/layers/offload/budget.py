"""How much device memory a run needs, how many blocks fit a VRAM budget, and what to say on OOM.

The budget counts what PyTorch allocates (`torch.cuda.max_memory_allocated`): the weights the
offload puts on the device plus the activations of one DiT forward. The CUDA context (about
0.5 GiB) and the caching allocator's slack come on top, so a budget should sit 1-2 GiB under
the card's size (`OOM_HEADROOM_GIB`).

Activation estimate (`activation_bytes`): tokens x max(32 dim, 10 dim + 4 ffn_dim) bytes, plus a
fixed ACT_FIXED_BYTES. A block's largest live set in eager bf16 is either in the self-attention
(the float32 residual stream, 4 bytes per token-channel; the bf16 normed input, 2; q/k/v, 6; the
float32 RoPE temporaries of q and k, about 12; the attention output and its projection, 4: about
28) or in the FFN (stream and input, 6, plus two bf16 hidden tensors of ffn_dim, 4 ffn_dim; with
the float32 gate product, about 10 dim + 4 ffn_dim). The 32 covers the measured eager peaks of
the 14B and 1.3B DiTs with a margin (benchmarks/NOTES.md, benchmarks/RESULTS.md); compiled blocks
need less. `tokens` counts every sequence in the
batch (CFG batched as batch 2 is twice the tokens); the fixed part covers the RoPE tables, the
text context, the time embedding and the sampler's latents at these sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .pack import TensorGroup, module_tensors

__all__ = [
    "GiB",
    "ACT_BYTES_PER_TOKEN_CHANNEL",
    "ACT_FIXED_BYTES",
    "OOM_HEADROOM_GIB",
    "tokens_for",
    "activation_bytes",
    "weight_sizes",
    "OffloadPlan",
    "plan_block_offload",
    "explain_oom",
]

GiB = 2**30
ACT_BYTES_PER_TOKEN_CHANNEL = 32
ACT_FIXED_BYTES = 256 * 2**20
OOM_HEADROOM_GIB = 1.5


def tokens_for(frames: int, height: int, width: int, batch: int = 1, patch=(1, 2, 2), vae_stride=(4, 8, 8)) -> int:
    """Tokens of one DiT forward for a video size: 81 frames at 480x832 -> 21 x 30 x 52 = 32,760."""
    f = (frames - 1) // vae_stride[0] + 1
    h, w = height // vae_stride[1], width // vae_stride[2]
    return batch * (f // patch[0]) * (h // patch[1]) * (w // patch[2])


def activation_bytes(model_or_cfg, tokens: int) -> int:
    """Estimated peak activation memory of one DiT forward over `tokens` tokens (see the module doc).

    model_or_cfg: the DiT (its `cfg`) or a `WanConfig`.
    """
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    if not hasattr(cfg, "dim") or not hasattr(cfg, "ffn_dim"):
        raise ValueError("the activation estimate needs a Wan DiT or its WanConfig (dim, ffn_dim)")
    per_token = max(ACT_BYTES_PER_TOKEN_CHANNEL * cfg.dim, 10 * cfg.dim + 4 * cfg.ffn_dim)
    return per_token * int(tokens) + ACT_FIXED_BYTES


def weight_sizes(model: nn.Module) -> tuple[int, list[int]]:
    """(non-block bytes, [bytes of each block]) as the offload packs them (FP8 at 1 byte, LoRA included)."""
    rest = TensorGroup(module_tensors(model, skip_prefix="blocks."), "rest").nbytes
    return rest, [TensorGroup(module_tensors(b), "block").nbytes for b in model.blocks]


@dataclass(frozen=True)
class OffloadPlan:
    """What a budget allows for one token count. All sizes in bytes."""

    resident_blocks: int
    slots: int
    num_blocks: int
    rest_bytes: int
    block_bytes: int  # the largest block
    weight_bytes: int  # weights on the device during a forward (rest, resident blocks, ring)
    activation_bytes: int
    budget_bytes: int
    min_bytes: int  # what block offload needs with no resident block
    tokens: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def describe(self) -> str:
        return (
            f"{self.resident_blocks} of {self.num_blocks} blocks resident + {self.slots} streaming slots: "
            f"weights {self.weight_bytes / GiB:.2f} GiB + activations {self.activation_bytes / GiB:.2f} GiB "
            f"({self.tokens} tokens) = {self.total_bytes / GiB:.2f} GiB of a {self.budget_bytes / GiB:.2f} GiB budget"
        )


def plan_block_offload(
    model: nn.Module, vram_budget_gb: float, tokens: int, prefetch: int = 1, sizes: tuple[int, list[int]] | None = None
) -> OffloadPlan:
    """The most resident blocks (the first ones) such that weights + activations <= budget.

    With every block resident no ring is needed; otherwise `prefetch + 1` slots of the largest
    streamed block. If not even zero resident blocks fit, the plan has `fits == False` (and
    `min_bytes` says what would).
    """
    rest, blocks = sizes if sizes is not None else weight_sizes(model)
    act = activation_bytes(model, tokens)
    budget = int(vram_budget_gb * GiB)
    n = len(blocks)

    def weights(r: int) -> tuple[int, int]:
        streamed = blocks[r:]
        slots = min(prefetch + 1, len(streamed))
        return rest + sum(blocks[:r]) + slots * max(streamed, default=0), slots

    min_w, _ = weights(0)
    chosen = 0
    for r in range(n, -1, -1):
        if weights(r)[0] + act <= budget:
            chosen = r
            break
    w, slots = weights(chosen)
    return OffloadPlan(chosen, slots, n, rest, max(blocks), w, act, budget, min_w + act, int(tokens))


def explain_oom(
    exc: BaseException, model: nn.Module, tokens: int, total_gb: float | None = None
) -> torch.OutOfMemoryError:
    """A CUDA out-of-memory error, re-worded: what the run needed, and the offload settings that fit.

    `total_gb`: the card's memory (default: read from the model's CUDA device, else the current
    one). Returns the new error for the caller to `raise ... from exc`.
    """
    rest, blocks = weight_sizes(model)
    act = activation_bytes(model, tokens)
    full = rest + sum(blocks)
    if total_gb is None and torch.cuda.is_available():
        total_gb = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
    from ..stack import layer_state

    handle = layer_state(model).offload
    now = (
        f"offload_granularity={handle.granularity!r}"
        + (f" with {handle.resident_blocks} resident blocks" if handle.granularity == "block" else "")
        if handle is not None
        else "no DiT offload"
    )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lines = [
        f"CUDA out of memory in the Wan DiT ({now}) at {tokens} tokens: the DiT weights are "
        f"{full / GiB:.1f} GiB ({len(blocks)} blocks of {max(blocks) / GiB:.2f} GiB) and one forward needs about "
        f"{act / GiB:.1f} GiB of activations.",
    ]
    if total_gb is None:
        lines.append(
            "Set cpu_offload=true, offload_granularity='block' and vram_budget_gb to your card's memory minus 1.5."
        )
    else:
        usable = math.floor((total_gb - OOM_HEADROOM_GIB) * 2) / 2  # half-GiB steps under the card's size
        plan = plan_block_offload(model, usable, tokens, sizes=(rest, blocks))
        if plan.fits:
            lines.append(
                f"To fit this {total_gb:.1f} GiB card: cpu_offload=true, offload_granularity='block', "
                f"vram_budget_gb={usable:g} (keeps {plan.resident_blocks} of {plan.num_blocks} blocks on the GPU, "
                f"about {plan.total_bytes / GiB:.1f} GiB; the smallest block-offload budget at this size is "
                f"{math.ceil(plan.min_bytes / GiB * 2) / 2:g} GiB)."
            )
            if full + act <= usable * GiB:
                lines.append(
                    "The DiT alone fits: offload_granularity='model' (and t5/clip/vae_cpu_offload) keep the other "
                    "models off the GPU while it runs."
                )
        else:
            lines.append(
                f"Even block offload with no resident block needs about {plan.min_bytes / GiB:.1f} GiB at {tokens} tokens, "
                f"more than this {total_gb:.1f} GiB card allows: lower the resolution or the frame count, or use FP8 "
                "DiT weights (half the block size)."
            )
    lines.append(f"(original error: {first})")
    return torch.OutOfMemoryError("\n".join(lines))
