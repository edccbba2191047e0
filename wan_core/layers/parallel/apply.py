"""Sequence parallel layered onto a built WanModel, through its two seams.

- `forward_blocks` is wrapped: the video tokens [B, L, C], the RoPE tables [L, D/2] and a per-token
  time projection e0 [B, L, 6, C] (Wan2.2 TI2V; a per-row [B, 6, C] is shared) are padded to Lp
  (a multiple of the degree P), cut into P chunks the same way, the block stack runs on this
  rank's chunk, and the chunks are all-gathered (and the padding dropped) after the last block;
  the head then runs on the whole sequence, with its per-token time embedding as it is.
  Everything inside a block is per-token (norms, modulation, linears, FFN, RoPE with the chunk's
  own table rows) or attends to the full text/image context every rank has (cross-attention),
  except the self-attention.
- each block's `self_attn.attn_fn` is wrapped: Ulysses all-to-all to a head split, then ring
  attention over the ring group (or, without a ring, the model's own attention backend), then the
  all-to-all back. A backend that needs the whole sequence in one call (`whole_sequence`:
  radial_attn, whose mask is the same for every head) runs under Ulysses, and is refused with a ring.

Padding never reaches a softmax: every chunk's count of real tokens is known, and the keys
beyond it are cut off before attending (with Ulysses alone the padded tail of the gathered
sequence is dropped for queries and keys alike). Padded query rows carry harmless values and are
dropped at the gather.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..stack import SequenceParallelState, layer_state
from .group import ParallelGroups
from .ring import get_lse_attention, ring_attention
from .ulysses import heads_to_seq, pipelined_attention, seq_to_heads

__all__ = [
    "enable_sequence_parallel", "disable_sequence_parallel", "sequence_parallel_groups", "SequenceParallelLayer",
    "SequenceParallelState", "SequenceParallelAttention", "split_layout",
]  # fmt: skip


@dataclass
class _SeqState:
    """Sizes of the current forward, shared by the wrapped blocks."""

    length: int = 0  # real tokens L
    chunk: int = 0  # tokens per rank Lc = Lp / P


def split_layout(length: int, degree: int) -> tuple[int, list[int]]:
    """Tokens per rank and the count of real tokens in each rank's chunk (padding at the end)."""
    chunk = -(-length // degree)
    return chunk, [max(0, min(chunk, length - i * chunk)) for i in range(degree)]


class SequenceParallelAttention:
    """Self-attention on a sequence chunk: q, k, v [B, Lc, H, D] -> [B, Lc, H, D]."""

    def __init__(self, inner, groups: ParallelGroups, state: _SeqState, lse_attn):
        self.inner = inner  # the model's own backend, used when there is no ring
        self.groups = groups
        self.state = state
        self.lse_attn = lse_attn
        self.backend_name = f"sp[{getattr(inner, 'backend_name', getattr(inner, '__name__', '?'))}]"
        # Compiled blocks run this eagerly (a graph break): the collectives and the ring's
        # point-to-point transfers stay outside the graph. torch.compiler.disable costs a
        # 3-second import of dynamo, paid only where something may be compiled already.
        self._attend_fn = torch.compiler.disable(self._attend) if "torch._dynamo" in sys.modules else self._attend

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._attend_fn(q, k, v)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        g, pc = self.groups, self.groups.config
        u, r = pc.ulysses, pc.ring
        chunks = pc.ulysses_chunks
        if u > 1 and r == 1 and chunks > 1 and (q.shape[2] // u) % chunks == 0:
            valid = min(u * self.state.chunk, self.state.length)
            return pipelined_attention(q, k, v, g.ulysses_group, u, self.inner, chunks, valid)
        if u > 1:
            q, k, v = (seq_to_heads(t, g.ulysses_group, u) for t in (q, k, v))  # 3 x [B, U*Lc, H/U, D]
        # Real tokens in each ring position's span of U*Lc tokens (contiguous in the sequence).
        span = u * self.state.chunk
        valid = [max(0, min(span, self.state.length - j * span)) for j in range(r)]
        if r > 1:
            out = ring_attention(q, k, v, g.ring_group, g.ring_ranks, g.ring_rank, self.lse_attn, valid)
        else:
            n = valid[0]
            if n < q.shape[1]:  # padded tail: attend over real tokens only, zeros for the padded rows
                out = self.inner(q[:, :n], k[:, :n], v[:, :n])
                out = F.pad(out, (0, 0, 0, 0, 0, q.shape[1] - n))
            else:
                out = self.inner(q, k, v)
        if u > 1:
            out = heads_to_seq(out, g.ulysses_group, u)
        return out


class _ForwardBlocks:
    """Replacement for `model.forward_blocks`: split, run the original stack, gather."""

    def __init__(self, original, groups: ParallelGroups, state: _SeqState):
        self.original = original
        self.groups = groups
        self.state = state

    def __call__(self, x, e0, context, context_img, rope):
        g = self.groups
        p = g.config.sp
        b, length, c = x.shape
        chunk, _ = split_layout(length, p)
        pad = chunk * p - length
        cos, sin = rope
        if pad:
            x = F.pad(x, (0, 0, 0, pad))  # [B, Lp, C]
            cos = torch.cat([cos, cos.new_ones(pad, cos.shape[1])])  # identity rotation on padding
            sin = torch.cat([sin, sin.new_zeros(pad, sin.shape[1])])
        per_token = e0.dim() == 4  # [B, L, 6, C]: one modulation per token (Wan2.2 TI2V), split like x
        if pad and per_token:
            e0 = F.pad(e0, (0, 0, 0, 0, 0, pad))  # [B, Lp, 6, C]; zero rows for the padded tokens
        self.state.length, self.state.chunk = length, chunk
        lo, hi = g.sp_rank * chunk, (g.sp_rank + 1) * chunk
        if per_token:
            e0 = e0[:, lo:hi].contiguous()  # [B, Lc, 6, C]
        out = self.original(x[:, lo:hi].contiguous(), e0, context, context_img, (cos[lo:hi], sin[lo:hi]))
        parts = [torch.empty_like(out) for _ in range(p)]
        dist.all_gather(parts, out.contiguous(), group=g.sp_group)  # P x [B, Lc, C], in sequence order
        return torch.cat(parts, dim=1)[:, :length]


class SequenceParallelLayer:
    """Sequence parallel as a layer (`wan_core.layers.stack`): a per-run layer, after the weight
    layers (it wraps the attention backends the blocks hold, compiled or not) and inside the cache."""

    name = "sequence_parallel"

    def __init__(self, groups: ParallelGroups, ring_attention_backend: str | None = None):
        self.groups, self.ring_attention_backend = groups, ring_attention_backend

    def needed(self, model) -> bool:
        st = layer_state(model).sequence_parallel
        if self.groups.config.sp == 1:
            return st is not None
        return st is None or st.groups is not self.groups

    def apply(self, model) -> None:
        self.remove(model)
        pc = self.groups.config
        if pc.sp == 1:
            return
        pc.validate(num_heads=model.cfg.num_heads)
        fns = [blk.self_attn.attn_fn for blk in model.blocks]
        whole = sorted({fn.backend_name for fn in fns if getattr(fn, "whole_sequence", False)})
        if pc.ring > 1 and whole:  # ring steps attend chunk by chunk with their own LSE attention
            raise ValueError(
                f"attention backend {whole[0]!r} needs every token of the video in one call, but ring attention "
                f"(ring degree {pc.ring}) splits the sequence: use Ulysses only (seq_p_attn_type 'ulysses'), or "
                "an exact backend with ring"
            )
        # Where the blocks compute: an offloaded DiT keeps its weights in host memory between
        # forwards, so its handle, not its first parameter, names the device.
        handle = layer_state(model).offload
        dev = handle.device if handle is not None else next(model.parameters()).device
        lse = get_lse_attention(self.ring_attention_backend or pc.ring_attention, dev, model.dtype)
        state = _SeqState()
        originals = []
        # One wrapper per distinct backend, shared by the blocks: compiled blocks guard on the
        # objects they call, so 40 distinct wrappers would mean 40 recompilations.
        wrappers: dict[int, SequenceParallelAttention] = {}
        for blk in model.blocks:
            fn = blk.self_attn.attn_fn
            originals.append(fn)
            if id(fn) not in wrappers:
                wrappers[id(fn)] = SequenceParallelAttention(fn, self.groups, state, lse)
            blk.self_attn.attn_fn = wrappers[id(fn)]
        own = model.__dict__.get("forward_blocks")
        model.forward_blocks = _ForwardBlocks(model.forward_blocks, self.groups, state)
        layer_state(model).sequence_parallel = SequenceParallelState(self.groups, originals, own)

    @staticmethod
    def remove(model) -> None:
        st = layer_state(model)
        saved, st.sequence_parallel = st.sequence_parallel, None
        if saved is None:
            return
        for blk, fn in zip(model.blocks, saved.attn_fns):
            blk.self_attn.attn_fn = fn
        if saved.forward_blocks is not None:
            model.forward_blocks = saved.forward_blocks
        else:
            del model.forward_blocks


def enable_sequence_parallel(model, groups: ParallelGroups, ring_attention_backend: str | None = None):
    """Make `model` run its block stack split over the sequence-parallel group (in place).

    Call after the model is built, its attention backend chosen (`set_attention`) and its
    blocks compiled, if they are; calling again with other groups re-wraps. A degree of 1 leaves
    the model as it is. Returns the model.
    """
    SequenceParallelLayer(groups, ring_attention_backend).apply(model)
    return model


def disable_sequence_parallel(model):
    """Undo `enable_sequence_parallel` (no-op when it is not enabled)."""
    SequenceParallelLayer.remove(model)
    return model


def sequence_parallel_groups(model) -> ParallelGroups | None:
    """The groups `model` is split over, or None when sequence parallel is off."""
    st = layer_state(model).sequence_parallel
    return st.groups if st is not None else None
