"""Ulysses all-to-all: trade a sequence split for a head split around the self-attention.

Before the attention each of the U ranks holds all H heads of its chunk of Lc tokens; after one
all-to-all it holds H/U heads of all U*Lc tokens (its Ulysses group's chunks, in rank order,
which is sequence order), so any single-GPU attention kernel runs unchanged on it. A second
all-to-all brings the output back to the sequence split. Q, K and V travel in one call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["seq_to_heads", "heads_to_seq"]


def seq_to_heads(x: torch.Tensor, group, u: int) -> torch.Tensor:
    """[N, B, Lc, H, D] (N stacked tensors, e.g. q/k/v) -> [N, B, U*Lc, H/U, D]."""
    n, b, lc, h, d = x.shape
    send = x.view(n, b, lc, u, h // u, d).permute(3, 0, 1, 2, 4, 5).contiguous()  # [U(dest), N, B, Lc, H/U, D]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv: [U(source = sequence chunk), N, B, Lc, H/U, D]
    return recv.permute(1, 2, 0, 3, 4, 5).reshape(n, b, u * lc, h // u, d)


def heads_to_seq(x: torch.Tensor, group, u: int) -> torch.Tensor:
    """[B, U*Lc, H/U, D] -> [B, Lc, H, D] (the inverse of `seq_to_heads` for one tensor)."""
    b, l, hu, d = x.shape
    send = x.view(b, u, l // u, hu, d).permute(1, 0, 2, 3, 4).contiguous()  # [U(dest = chunk), B, Lc, H/U, D]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv: [U(source = head group), B, Lc, H/U, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, l // u, u * hu, d)
