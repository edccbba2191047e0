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

__all__ = ["seq_to_heads", "heads_to_seq", "pipelined_attention"]


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


def pipelined_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, u: int, attn, chunks: int, valid: int) -> torch.Tensor:
    """Ulysses attention with the head split cut into `chunks` slices whose transfers overlap
    the attention of the neighbouring slice: slice c+1's inputs travel while slice c is
    attended, and slice c's output travels back while slice c+1 is attended.

    q, k, v: [B, Lc, H, D] on each rank; `valid` real tokens in the gathered U*Lc sequence
    (the padded tail is cut off before attending). Returns [B, Lc, H, D].
    """
    b, lc, h, d = q.shape
    hc = h // u // chunks  # heads per slice on each rank after the exchange

    def send_in(x: torch.Tensor, c: int):
        part = x.reshape(b, lc, u, chunks, hc, d)[:, :, :, c]  # [B, Lc, U(dest), hc, D]
        send = part.permute(2, 0, 1, 3, 4).contiguous()  # [U, B, Lc, hc, D]
        recv = torch.empty_like(send)
        return recv, dist.all_to_all_single(recv, send, group=group, async_op=True)

    def arrived(recv: torch.Tensor) -> torch.Tensor:  # [U(source chunk), B, Lc, hc, D] -> [B, U*Lc, hc, D]
        return recv.view(1, u * lc, hc, d) if b == 1 else recv.transpose(0, 1).reshape(b, u * lc, hc, d)

    out = q.new_empty(b, lc, u, chunks, hc, d)  # heads in the original order: (rank group, slice, head)
    pending_in = [send_in(t, 0) for t in (q, k, v)]
    pending_out = []
    for c in range(chunks):
        for _, work in pending_in:
            work.wait()
        qc, kc, vc = (arrived(r) for r, _ in pending_in)
        if c + 1 < chunks:
            pending_in = [send_in(t, c + 1) for t in (q, k, v)]
        if valid < qc.shape[1]:
            oc = torch.nn.functional.pad(attn(qc[:, :valid], kc[:, :valid], vc[:, :valid]), (0, 0, 0, 0, 0, qc.shape[1] - valid))
        else:
            oc = attn(qc, kc, vc)  # [B, U*Lc, hc, D]
        send = oc.reshape(b, u, lc, hc, d).transpose(0, 1).contiguous()  # [U(dest chunk), B, Lc, hc, D]
        recv = torch.empty_like(send)
        pending_out.append((c, recv, dist.all_to_all_single(recv, send, group=group, async_op=True)))
    for c, recv, work in pending_out:
        work.wait()
        out[:, :, :, c] = recv.permute(1, 2, 0, 3, 4)  # [U(source head group), B, Lc, hc, D] -> [B, Lc, U, hc, D]
    return out.view(b, lc, h, d)
