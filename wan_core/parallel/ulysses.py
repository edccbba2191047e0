"""Ulysses all-to-all: trade a sequence split for a head split around the self-attention.

Before the attention each of the U ranks holds all H heads of its chunk of Lc tokens; after one
all-to-all per tensor it holds H/U heads of all U*Lc tokens (its Ulysses group's chunks, in rank
order, which is sequence order), so any single-GPU attention kernel runs unchanged on it. A
second all-to-all brings the output back to the sequence split.

Layouts are chosen so that, at batch 1, the only copies are the one that packs the send buffer
on the way in and the one that unpacks the output on the way out: the received buffer
[U, 1, Lc, H/U, D] already is [1, U*Lc, H/U, D] in memory.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["seq_to_heads", "heads_to_seq"]


def seq_to_heads(x: torch.Tensor, group, u: int) -> torch.Tensor:
    """[B, Lc, H, D] -> [B, U*Lc, H/U, D]."""
    b, lc, h, d = x.shape
    send = x.reshape(b, lc, u, h // u, d).permute(2, 0, 1, 3, 4).contiguous()  # [U(dest = head group), B, Lc, H/U, D]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv: [U(source = sequence chunk), B, Lc, H/U, D]
    if b == 1:
        return recv.view(1, u * lc, h // u, d)
    return recv.transpose(0, 1).reshape(b, u * lc, h // u, d)


def heads_to_seq(x: torch.Tensor, group, u: int) -> torch.Tensor:
    """[B, U*Lc, H/U, D] -> [B, Lc, H, D] (the inverse of `seq_to_heads`)."""
    b, l, hu, d = x.shape
    send = x.reshape(b, u, l // u, hu, d).transpose(0, 1).contiguous()  # [U(dest = chunk), B, Lc, H/U, D]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv: [U(source = head group), B, Lc, H/U, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, l // u, u * hu, d)
