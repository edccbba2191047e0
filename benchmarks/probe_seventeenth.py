"""Seventeenth session's probe: the DiT as it was before the FFN's residual fold (each block adds its
own FFN term in a pass of its own), for bench_dit's "+nofold" variants. One-off: removed after its run."""

import torch

from wan_core.models import dit

_FOLDED = (dit.Block.forward, dit.WanModel.forward_blocks)


def _block_forward(self, x, e0, context, context_img, rope):
    dt, ops, sa, ca, ffn = context.tokens.dtype, self.ops, self.self_attn, self.cross_attn, self.ffn
    shift1, scale1, gate1, shift2, scale2, gate2 = dit.split_modulation(self.modulation.float() + e0)
    _, h = ops.add_norm_mod(x, None, None, self.norm1, scale1, shift1, dt, feeds=(sa.q, sa.k, sa.v))
    x, h = ops.add_norm_mod(x, sa(h, rope), gate1, self.norm3, None, None, dt, feeds=(ca.q,))
    x, h = ops.add_norm_mod(x, ca(h, context, context_img), None, self.norm2, scale2, shift2, dt,
                            feeds=(ffn[0], ffn[2]))
    return (x + ops.ffn(ffn, h) * gate2).to(x.dtype)


def _forward_blocks(self, x, e0, context, context_img, rope):
    for block in self.blocks:
        x = block(x, e0, context, context_img, rope)
    return x


def unfold(on: bool) -> None:
    """The pre-fold Block.forward / forward_blocks (on), or the current ones back (off)."""
    dit.Block.forward, dit.WanModel.forward_blocks = (_block_forward, _forward_blocks) if on else _FOLDED
    torch._dynamo.reset()
