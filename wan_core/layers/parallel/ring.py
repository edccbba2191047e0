"""Ring attention: each rank keeps its queries and passes its K/V chunk around the ring.

After R steps every query chunk has met every K/V chunk; the partial outputs are merged with
their log-sum-exps, which is exact (softmax over the union of key sets):

    lse = log(exp(lse_a) + exp(lse_b)),  out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b

The next chunk's transfer (one packed [2, B, L, H, D] K/V buffer, isend to the next rank and
irecv from the previous one) runs while the current chunk is attended to.

Attention with its log-sum-exp ("LSE attention") comes from PyTorch's own kernels, which return
it next to the output (`torch.ops.aten._scaled_dot_product_{cudnn,flash,efficient}_attention`,
`_scaled_dot_product_flash_attention_for_cpu`), or from a float32 reference (`math`) that any
device runs. All take and return [B, L, H, D] (output) and [B, H, L] float32 (LSE).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

__all__ = ["LSE_BACKENDS", "get_lse_attention", "lse_attention_math", "merge_partial", "ring_attention"]

LseAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def lse_attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: float32 softmax attention returning (out [B, Lq, H, D] in q's dtype, lse [B, H, Lq])."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))  # [B, H, L, D]
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    lse = torch.logsumexp(s, dim=-1)  # [B, H, Lq]
    out = torch.matmul(torch.exp(s - lse[..., None]), vh)  # [B, H, Lq, D]
    return out.transpose(1, 2).to(q.dtype), lse


def _lse_cpu_flash(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False
    )
    return out.transpose(1, 2), lse.float()


def _lse_flash(q, k, v):
    res = torch.ops.aten._scaled_dot_product_flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False)
    return res[0].transpose(1, 2), res[1].float()


def _lse_cudnn(q, k, v):
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False
    )
    b, h, lq = q.shape[0], q.shape[2], q.shape[1]
    return res[0].transpose(1, 2), res[1].float().reshape(b, h, -1)[..., :lq]  # some versions add a trailing 1


def _lse_efficient(q, k, v):
    res = torch.ops.aten._scaled_dot_product_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False
    )
    return res[0].transpose(1, 2), res[1].float()[..., : q.shape[1]]  # LSE rows are padded to a multiple of 32


LSE_BACKENDS: dict[str, LseAttentionFn] = {
    "math": lse_attention_math,
    "cpu_flash": _lse_cpu_flash,
    "flash": _lse_flash,
    "cudnn": _lse_cudnn,
    "efficient": _lse_efficient,
}


def get_lse_attention(name: str = "auto", device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> LseAttentionFn:
    """Resolve the LSE attention once. 'auto': cuDNN on Hopper+ (flash before) for 16-bit CUDA
    tensors, memory-efficient for float32 CUDA, PyTorch's CPU flash kernel on the CPU."""
    dev = torch.device(device)
    key = name.lower()
    if key == "auto":
        if dev.type == "cuda":
            if dtype in (torch.float16, torch.bfloat16):
                major = torch.cuda.get_device_capability(dev)[0] if torch.cuda.is_available() else 0
                key = "cudnn" if major >= 9 else "flash"
            else:
                key = "efficient"
        else:
            key = "cpu_flash"
    if key not in LSE_BACKENDS:
        raise ValueError(f"unknown ring attention backend {name!r}; choose one of {['auto', *LSE_BACKENDS]}")
    fn = LSE_BACKENDS[key]
    return fn


def merge_partial(
    out: torch.Tensor | None, lse: torch.Tensor | None, part: torch.Tensor, part_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one chunk's (out [B, Lq, H, D], lse [B, H, Lq]) into the float32 running result."""
    part = part.float()
    if out is None:
        return part, part_lse
    new = torch.logaddexp(lse, part_lse)  # [B, H, Lq]
    w_old = torch.exp(lse - new).transpose(1, 2)[..., None]  # [B, Lq, H, 1]
    w_new = torch.exp(part_lse - new).transpose(1, 2)[..., None]
    return out * w_old + part * w_new, new


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group,
    ranks: Sequence[int],
    ring_rank: int,
    attn: LseAttentionFn,
    kv_valid: Sequence[int] | None = None,
) -> torch.Tensor:
    """Attention of local queries [B, Lq, H, D] over the K/V chunks of all ranks in `ranks`.

    `ranks` are the global ranks of the ring in sequence order (chunk j lives on ranks[j]);
    `kv_valid[j]` is how many leading tokens of chunk j are real (the rest is padding the caller
    added to make the sequence divisible): padding keys are cut off before the attention, so
    they get no weight, and a chunk of padding only is skipped.
    """
    n = len(ranks)
    kv = torch.stack([k, v]).contiguous()  # [2, B, Lk, H, D]: one buffer per transfer
    nxt, prv = ranks[(ring_rank + 1) % n], ranks[(ring_rank - 1) % n]
    out = lse = None
    for step in range(n):
        src = (ring_rank - step) % n  # whose chunk we hold now
        reqs = []
        if step < n - 1:
            recv = torch.empty_like(kv)
            ops = [dist.P2POp(dist.isend, kv, nxt, group), dist.P2POp(dist.irecv, recv, prv, group)]
            reqs = dist.batch_isend_irecv(ops)
        valid = kv.shape[2] if kv_valid is None else kv_valid[src]
        if valid > 0:
            kc, vc = kv[0, :, :valid], kv[1, :, :valid]  # [B, valid, H, D]
            part, part_lse = attn(q, kc, vc)
            out, lse = merge_partial(out, lse, part, part_lse)
        for r in reqs:
            r.wait()
        if step < n - 1:
            kv = recv
    assert out is not None, "the first ring chunk always holds real tokens"
    return out.to(q.dtype)
