"""The Wan2.1 / Wan2.2 diffusion transformer (DiT), text-to-video and image-to-video.

Module and parameter names are the official checkpoint names (`blocks.N.self_attn.q`,
`norm_k`, `ffn.0`, `modulation`, `head.head`, `img_emb.proj.N`), so official files load with no
renaming. This file is the single-GPU math only: FP8 linears, LoRA, offload, caching and
sequence parallel are layered on after build (they swap modules or wrap `forward_blocks` /
an attention module's `attn_fn`), never branched on in here. Each module has one forward; the
implementations of its pieces are functions chosen once at build time and stored on the module:
the attention backend (`attn_fn`, `set_attention`) and the float32 work between a block's
matmuls (`ops`, `set_block_ops`: plain torch, or single-pass fused ops on CUDA).

Precision follows the official code where accuracy needs it: the timestep embedding, the
modulation vectors, the norms and the head run in float32, and the residual stream between
the blocks is kept in float32 (bf16 on request, `set_residual_dtype`: ComfyUI's and LightX2V's
stream, less memory traffic); the large linears and the attention run in the model dtype.

Wan2.2 adds no module: its I2V-A14B experts are the I2V model without the CLIP branch
(`cfg.clip_branch`), and TI2V-5B may take one timestep per token (`t` [B, L]), which makes the
time embedding and every modulation per token instead of per batch row.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.attention import APPROXIMATE, AttentionFn, get_attention
from ..kernels.attention_context import video_grid
from ..kernels.block_ops import BlockOps, get_block_ops
from ..kernels.rope import apply_rope, rope_tables
from ..kernels.text_attention import attend_all_text_rows
from ..kernels.text_projected import cross_text_attention
from .config import WanConfig

__all__ = ["WanModel", "TextContext", "attend_all_text_rows", "rope_tables", "apply_rope", "sinusoidal_embedding", "FP32_PARAM_PATTERNS"]

# Parameters kept in float32 whatever the model dtype (small, and computed in float32 officially).
FP32_PARAM_PATTERNS = ("modulation", "time_embedding.", "time_projection.", "head.head.", "norm")


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[N] timesteps -> [N, dim] (cos half, then sin half), computed in float64 as the official code."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, freqs)  # [B, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, returning float32 (callers cast when they feed a linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class TextContext(NamedTuple):
    """The text tokens the blocks attend to, after the text projection: tokens [B, text_len, C]
    and each item's count of real tokens, lengths [B] int32 on the CPU; the rows from there on come
    from the zero-padding and are all equal (what `text_attention` collapses into one key)."""

    tokens: torch.Tensor
    lengths: torch.Tensor


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.attn_fn: AttentionFn = get_attention("sdpa")
        self.ops: BlockOps = get_block_ops("torch")

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [B, L, C] in the compute dtype, or the rows already quantised for FP8 linears
        (`QuantRows`, see `wan_core.kernels.block_ops`); rope: cos/sin tables [L, D/2]."""
        b, s, _ = x.shape
        n = self.num_heads
        q = self.ops.qk_norm_rope(self.q(x), self.norm_q, rope, n)  # [B, L, C] -> [B, L, H, D]: RoPE(norm_q(q))
        k = self.ops.qk_norm_rope(self.k(x), self.norm_k, rope, n)
        v = self.v(x).view(b, s, n, -1)
        return self.ops.attend(self.attn_fn, self.o, q, k, v)  # o(attn_fn(q, k, v).flatten(2)), or o of its codes


class CrossAttention(SelfAttention):
    """Attention from the video tokens to the text tokens, plus (I2V) to the 257 CLIP tokens.

    The same projections as self-attention (so the same checkpoint names); the two branches share
    the query and the output projection, and their results are summed. No RoPE here. Both
    branches run in `text_attn_fn(q, k, v, lengths, k_img, v_img)`: with an exact backend
    (`set_attention`) the padding collapsed into one key and, on CUDA, both branches in one kernel
    (`text_attention`), else `attn_fn` over every padded row and over the image keys. The fused
    block ops may compute the output projection with it (`BlockOps.cross_attend`): for a short
    prompt, the attention weights times the values already projected (`text_projected`), the
    same sums, with q's RMSNorm folded in (each row's factor on its scores, the norm's weight in
    the keys); so `norm_q` is applied by the block ops, not here.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float, image: bool):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.text_attn_fn = cross_text_attention
        if image:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: TextContext, context_img: torch.Tensor | None) -> torch.Tensor:
        b, n = x.shape[0], self.num_heads
        q = self.q(x).view(b, -1, n, self.q.out_features // n)  # [B, L, H, D], before norm_q (applied by cross_attend)
        k = self.norm_k(self.k(context.tokens)).view(b, -1, n, q.shape[-1])  # [B, Lt, H, D]
        v = self.v(context.tokens).view(b, -1, n, q.shape[-1])
        k_img = v_img = None
        if context_img is not None:
            k_img = self.norm_k_img(self.k_img(context_img)).view(b, -1, n, q.shape[-1])  # [B, 257, H, D]
            v_img = self.v_img(context_img).view(b, -1, n, q.shape[-1])
        return self.ops.cross_attend(self.text_attn_fn, self.o, self.norm_q, q, k, v, context.lengths, k_img, v_img)


class Block(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim, eps = cfg.dim, cfg.eps
        self.norm1 = LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, eps)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.qk_norm, eps, image=cfg.clip_branch)
        self.norm2 = LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.ops: BlockOps = get_block_ops("torch")

    def forward(self, x, e0, context, context_img, rope):
        """x: [B, L, C] float32 residual stream; e0: float32 time projection, [B, 6, C] (one
        timestep per row) or [B, L, 6, C] (one per token, Wan2.2 TI2V).

        The linears' input dtype is the context's (the text projection is never quantized, so this
        stays bf16/fp32 when FP8 linears are swapped in). `self.ops` computes each residual add
        with the LayerNorm and modulation after it; `feeds` names the linears h goes to.
        """
        dt, ops, sa, ca, ffn = context.tokens.dtype, self.ops, self.self_attn, self.cross_attn, self.ffn
        if e0.dim() == 3:
            mods = (self.modulation.float() + e0).unsqueeze(2).unbind(1)  # 6 x [B, 1, C]
        else:
            mods = (self.modulation.float().unsqueeze(0) + e0).unbind(2)  # [1, 1, 6, C] + [B, L, 6, C] -> 6 x [B, L, C]
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        # h = (norm1(x) * (1 + scale1) + shift1).to(dt)
        _, h = ops.add_norm_mod(x, None, None, self.norm1, scale1, shift1, dt, feeds=(sa.q, sa.k, sa.v))
        # x = x + self_attn(h) * gate1;  h = norm3(x).to(dt)
        x, h = ops.add_norm_mod(x, sa(h, rope), gate1, self.norm3, None, None, dt, feeds=(ca.q,))
        # x = x + cross_attn(h);  h = (norm2(x) * (1 + scale2) + shift2).to(dt)
        x, h = ops.add_norm_mod(x, ca(h, context, context_img), None, self.norm2, scale2, shift2, dt,
                                feeds=(ffn[0], ffn[2]))
        return (x + ops.ffn(ffn, h) * gate2).to(x.dtype)  # the residual stream keeps its dtype


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x: [B, L, C]; e: [B, C] (one timestep per row) or [B, L, C] (per token)."""
        if e.dim() == 2:
            shift, scale = (self.modulation.float() + e[:, None, :].float()).unbind(1)  # 2 x [B, C]
            shift, scale = shift[:, None], scale[:, None]  # [B, 1, C]
        else:
            shift, scale = (self.modulation.float().unsqueeze(0) + e.float().unsqueeze(2)).unbind(2)  # 2 x [B, L, C]
        h = self.norm(x) * (1 + scale) + shift
        return F.linear(h, self.head.weight.float(), self.head.bias.float())


class ImageProjection(nn.Module):
    """CLIP tokens [B, 257, 1280] -> context tokens [B, 257, dim] (`img_emb.proj.{0..4}`)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim), LayerNorm(out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm_in, lin1, act, lin2, norm_out = self.proj
        dt = lin1.weight.dtype
        return norm_out(lin2(act(lin1(norm_in(x).to(dt))))).to(dt)


class WanModel(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        if cfg.clip_branch:
            self.img_emb = ImageProjection(cfg.image_dim, cfg.dim)
        self._rope_cache: dict = {}
        self.residual_dtype = torch.float32  # the residual stream's dtype between the blocks (set_residual_dtype)

    # ---- build-time choices -------------------------------------------------------------
    def set_attention(self, self_attn: str = "auto", cross_attn: str | None = None, device=None, radial=None) -> None:
        """Resolve the attention backends once and store them on the attention modules.

        Cross-attention follows self-attention unless named, except that an approximate (8-bit or
        sparse) self-attention leaves cross-attention on the exact "auto" backend: with 512 text keys it is
        a small part of the attention time (benchmarks/NOTES.md), so 8 bits would buy nothing there but error.
        With an exact cross-attention backend the text branch collapses the prompt's padding into one
        key (`text_attention`: the same softmax over n + 1 keys instead of 512); a named approximate
        one attends to every padded row.
        A backend with `for_layer` (radial_attn, whose options `radial` are) gives block i the
        function `for_layer(i)` (its first `dense_layers` blocks: dense attention).
        """
        dev = device if device is not None else self.patch_embedding.weight.device
        fn_self = get_attention(self_attn, dev, radial=radial)
        if cross_attn is None:
            cross_attn = "auto" if fn_self.backend_name in APPROXIMATE else self_attn
        fn_cross = get_attention(cross_attn, dev)
        if getattr(fn_cross, "whole_sequence", False):
            raise ValueError(f"attention backend {cross_attn!r} is for self-attention over the video tokens; "
                             "cross-attention needs an exact backend (e.g. 'auto')")  # fmt: skip
        fn_text = attend_all_text_rows(fn_cross) if fn_cross.backend_name in APPROXIMATE else cross_text_attention
        for i, blk in enumerate(self.blocks):
            blk.self_attn.attn_fn = fn_self.for_layer(i) if hasattr(fn_self, "for_layer") else fn_self
            blk.cross_attn.attn_fn, blk.cross_attn.text_attn_fn = fn_cross, fn_text

    def set_block_ops(self, ops: str | BlockOps = "auto", device=None) -> None:
        """Choose once how the blocks compute their float32 work between the matmuls
        (`wan_core.kernels.block_ops`: 'torch', 'fused', or 'auto': fused on CUDA with Triton)."""
        dev = device if device is not None else self.patch_embedding.weight.device
        chosen = ops if isinstance(ops, BlockOps) else get_block_ops(ops, dev)
        for blk in self.blocks:
            blk.ops = blk.self_attn.ops = blk.cross_attn.ops = chosen

    def set_residual_dtype(self, dtype: torch.dtype) -> None:
        """The residual stream's dtype: float32 (the official model's) or bfloat16 (ComfyUI's and
        LightX2V's; half the memory traffic of the add + norm passes between the matmuls)."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the residual stream is float32 or bfloat16, not {dtype}")
        self.residual_dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (of the linears' inputs): the text projection's, which is never quantized."""
        return self.text_embedding[0].weight.dtype

    # ---- pieces of the forward ----------------------------------------------------------
    def rope(self, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid, str(device))
        if key not in self._rope_cache:
            self._rope_cache = {key: rope_tables(grid, self.cfg.head_dim, device)}
        return self._rope_cache[key]

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps (0..1000) -> time embedding e and projection e0, float32.

        t [B] -> e [B, C], e0 [B, 6, C]; t [B, L] (per token) -> e [B, L, C], e0 [B, L, 6, C],
        every token embedded on its own, as the official Wan2.2 model does.
        """
        te = sinusoidal_embedding(self.cfg.freq_dim, t.reshape(-1)).float()  # [N, freq_dim], N = B or B*L
        te = te.unflatten(0, t.shape)  # [B, freq_dim] or [B, L, freq_dim]
        lin1, act, lin2 = self.time_embedding
        e = F.linear(act(F.linear(te, lin1.weight.float(), lin1.bias.float())), lin2.weight.float(), lin2.bias.float())
        proj = self.time_projection[1]
        e0 = F.linear(F.silu(e), proj.weight.float(), proj.bias.float()).unflatten(-1, (6, self.cfg.dim))
        return e, e0

    def embed_context(self, context, clip_fea: torch.Tensor | None) -> tuple[TextContext, torch.Tensor | None]:
        """Text [B, Lt<=text_len, text_dim] (or a list of [Li, text_dim]) -> (`TextContext`: tokens
        [B, text_len, C] and the lengths Li (Lt for a tensor), image tokens or None).

        Text is zero-padded to `text_len` before the projection, as the official model does, so
        the padding positions are attended to (all with the same key and value, from the
        projection's biases).
        """
        dt = self.dtype
        if isinstance(context, torch.Tensor) and context.dim() == 2:
            context = [context]
        rows = []
        for u in context:
            if u.shape[0] > self.cfg.text_len:
                raise ValueError(f"text context has {u.shape[0]} tokens, more than text_len {self.cfg.text_len}")
            rows.append(torch.cat([u, u.new_zeros(self.cfg.text_len - u.shape[0], u.shape[1])]))
        ctx = self.text_embedding(torch.stack(rows).to(dt))
        lengths = torch.tensor([u.shape[0] for u in context], dtype=torch.int32)  # on the CPU: the host picks the kernel
        ctx_img = None
        if self.cfg.clip_branch:
            if clip_fea is None:
                raise ValueError("this is an image-to-video model: clip_fea (CLIP image tokens) is required")
            ctx_img = self.img_emb(clip_fea)
        return TextContext(ctx, lengths), ctx_img

    def embed_video(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Latent [B, C, F, H, W] (+ I2V condition y [B, 20, F, H, W]) -> tokens [B, L, C] float32, grid."""
        if self.cfg.is_i2v:
            if y is None:
                raise ValueError("this is an image-to-video model: y (mask + first-frame latent) is required")
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        elif y is not None:
            raise ValueError("y (image condition) was given to a text-to-video model")
        if x.shape[1] != self.cfg.in_dim:
            raise ValueError(f"the model expects {self.cfg.in_dim} input channels, got {x.shape[1]}")
        pt, ph, pw = self.cfg.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent size {tuple(x.shape[2:])} is not a multiple of the patch size {self.cfg.patch_size}")
        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))  # [B, C, F, H/2, W/2]
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2).to(self.residual_dtype).contiguous(), grid  # [B, L, C], rows contiguous

    def forward_blocks(self, x, e0, context, context_img, rope) -> torch.Tensor:
        """The block stack on tokens [B, L, C]; the seam where sequence parallel and caching attach."""
        for block in self.blocks:
            x = block(x, e0, context, context_img, rope)
        return x

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        b = x.shape[0]
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        x = x.view(b, f, h, w, pt, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, c, F, pt, H, ph, W, pw]
        return x.reshape(b, c, f * pt, h * ph, w * pw)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow velocity for a noisy latent.

        x: [B, out_dim, F, H, W] latent; t: [B] (or scalar) timestep in 0..1000, or [B, L'] one per
        token (Wan2.2 TI2V; token order f, h, w; L' >= L tokens, extra trailing entries, the
        official padding up to seq_len, are ignored; a batch of 1 is broadcast); context:
        [B, Lt, 4096] T5 features (Lt <= text_len, zero-padded here) or a list of [Li, 4096];
        Wan2.1 I2V: clip_fea [B, 257, 1280]; I2V: y [B, 20, F, H, W]. Returns float32, x's shape.
        """
        t = torch.as_tensor(t, device=x.device)
        tokens, grid = self.embed_video(x, y)
        if t.dim() == 2:
            n = tokens.shape[1]
            if t.shape[1] < n:
                raise ValueError(f"per-token timesteps: t has {t.shape[1]} entries per row, the latent makes {n} tokens")
            t = t[:, :n].expand(x.shape[0], n)  # [B, L]
        else:
            t = t.reshape(-1)
            if t.numel() == 1 and x.shape[0] > 1:
                t = t.expand(x.shape[0])
        e, e0 = self.embed_time(t)
        ctx, ctx_img = self.embed_context(context, clip_fea)
        with video_grid(grid):  # the token layout, for a backend that needs it (radial_attn)
            tokens = self.forward_blocks(tokens, e0, ctx, ctx_img, self.rope(grid, x.device))
        return self.unpatchify(self.head(tokens, e), grid)
