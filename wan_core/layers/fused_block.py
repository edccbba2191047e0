"""A transformer block whose float32 work runs as single-pass fused ops, swapped in after build.

`Block.forward` (dit.py) is the math; this is the same math, cut differently: each residual
add is done by the op that also computes the next LayerNorm and modulation, and the result goes
to the next linears as bf16, or, where those are FP8 linears, already quantised to e4m3 per token
(one quantisation shared by q, k and v instead of one per linear). The FFN's GELU is computed in
the first linear's GEMM epilogue (bf16), or by the op that quantises the hidden row (FP8). In
self-attention (`FusedSelfAttention`), q's and k's RMSNorm and RoPE are one pass each.

Measured reason (benchmarks/NOTES.md): in a compiled 480p forward inductor's looped LayerNorm
reductions and quantisations cost 0.17 s (bf16) to 0.35 s (FP8) of GPU time, two to three
times what one read and one write of each tensor costs.

A linear with hooks (a LoRA branch, offload's weight streaming) or one whose kernel takes bf16
only is fed bf16 as in the unfused block: every feature keeps working, only the saving is lost.
`fuse_blocks` swaps the class of each block (names, parameters and state dict are unchanged);
`unfuse_blocks` swaps it back.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels.fused_ops import add_norm_mod, gelu_quant, linear_gelu, rms_norm_rope
from ..models.dit import Block, LayerNorm, RMSNorm, SelfAttention
from .fp8 import FP8Linear

__all__ = ["FusedBlock", "FusedSelfAttention", "fuse_blocks", "unfuse_blocks"]


def _takes_codes(*linears: nn.Module) -> bool:
    return all(isinstance(m, FP8Linear) and m.takes_codes for m in linears)


def _plain(m: nn.Module) -> bool:
    """An nn.Linear whose weight can be used directly (no hooks, bias present)."""
    return type(m) is nn.Linear and m.bias is not None and not (m._forward_hooks or m._forward_pre_hooks)


class FusedSelfAttention(SelfAttention):
    def forward(self, x, rope):
        if not isinstance(self.norm_q, RMSNorm):  # a model without q/k norms: nothing to fuse
            return super().forward(x, rope)
        b, s, _ = x.shape
        n = self.num_heads
        q = rms_norm_rope(self.q(x), self.norm_q, rope, n).view(b, s, n, -1)  # [B, L, C] -> [B, L, H, D]
        k = rms_norm_rope(self.k(x), self.norm_k, rope, n).view(b, s, n, -1)
        v = self.v(x).view(b, s, n, -1)
        return self.o(self.attn_fn(q, k, v).flatten(2))  # [B, L, H*D] -> [B, L, C]


class FusedBlock(Block):
    def forward(self, x, e0, context, context_img, rope):
        dt = context.dtype
        sa, ca = self.self_attn, self.cross_attn
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).unbind(1)  # 6 x [B, C]
        quant = dt == torch.bfloat16 and _takes_codes(sa.q, sa.k, sa.v)
        _, h = add_norm_mod(x, norm=self.norm1, scale=scale1, shift=shift1, quant=quant, out_dtype=dt)
        attn = sa(h, rope)  # h: [B, L, C] bf16, or QuantRows
        if isinstance(self.norm3, LayerNorm):
            quant = dt == torch.bfloat16 and _takes_codes(ca.q)
            x, h = add_norm_mod(x, attn, gate1, norm=self.norm3, quant=quant, out_dtype=dt)
        else:
            x = x + attn * gate1[:, None]
            h = x.to(dt)
        cross = ca(h, context, context_img)
        f0, _, f2 = self.ffn
        quant = dt == torch.bfloat16 and _takes_codes(f0, f2)
        x, h = add_norm_mod(x, cross, norm=self.norm2, scale=scale2, shift=shift2, quant=quant, out_dtype=dt)
        if quant:
            y = f2(gelu_quant(f0(h)))
        elif _plain(f0):
            y = f2(linear_gelu(h, f0))
        else:
            y = self.ffn(h)
        return x + y * gate2[:, None]


def fuse_blocks(model: nn.Module, qk_rope: bool = True) -> nn.Module:
    """Use `FusedBlock.forward` for every block of `model` (before compiling them), and
    `FusedSelfAttention.forward` for their self-attention unless `qk_rope` is False. Returns the model."""
    for blk in model.blocks:
        if type(blk) is Block:
            blk.__class__ = FusedBlock
        if qk_rope and type(blk.self_attn) is SelfAttention:
            blk.self_attn.__class__ = FusedSelfAttention
    return model


def unfuse_blocks(model: nn.Module) -> nn.Module:
    for blk in model.blocks:
        if type(blk) is FusedBlock:
            blk.__class__ = Block
        if type(blk.self_attn) is FusedSelfAttention:
            blk.self_attn.__class__ = SelfAttention
    return model
