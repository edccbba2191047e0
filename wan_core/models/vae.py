"""The Wan2.1 video VAE: a causal 3-D convolutional autoencoder (8x spatial, 4x temporal).

Module and parameter names are those of `Wan2.1_VAE.pth`, so the official file loads with no
renaming (other layouts are mapped in `wan_core.loading.vae`).

Causality and streaming. Every temporal convolution pads time on the past side only, so a frame's
output depends on itself and earlier frames. A clip can therefore run through the network in short
chunks (encode: 1 frame, then 4 at a time; decode: one latent frame at a time) with a per-clip
*stream cache* that holds, for each temporal convolution, the last input frames it has seen. The
chunking bounds memory; it does not change the result.

The two temporal resamplers treat the first chunk specially, which is what makes latent frame 0 an
image latent:
- `downsample3d` passes the first chunk through and from then on runs a stride-2 convolution over
  [last frame of the previous chunk, this chunk]: video frames 1+4k..4+4k map onto latent 1+k.
- `upsample3d` passes the first chunk through; from the second chunk on, a convolution that doubles
  the channels (split into two frames) runs over the stream *without* the first chunk (its
  history starts as zeros there).

Activations are `[B, C, T, H, W]` between modules (stored channels-last on CUDA: `WanVAE`): the
checkpoint's per-frame 2-D convolutions run as 3-D convolutions with a 1-frame kernel (a view of
the same weight). Faster forms of the same sums live beside the kernels, in
`wan_core.kernels.vae_forms`, and each encode/decode call picks them once at its start: the
per-pixel passes (norms, residual adds: torch, or one Triton pass each), the time-folded causal
convs (`CausalConv3d.fold_time`) and the sub-pixel upsamplers (`Resample.use_subpixel`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import vae_forms
from ..kernels.vae_layout import CL, empty_as, is_channels_last
from .vae_config import WAN21_LATENT_MEAN, WAN21_LATENT_STD, WanVAEConfig, latent_stats_for

__all__ = ["WanVAE", "WanVAEConfig", "WAN21_LATENT_MEAN", "WAN21_LATENT_STD", "latent_to_raw", "latent_from_raw"]

# A stream cache: module -> the state it carries from one chunk of a clip to the next (the last
# input frames of a temporal conv, or a "first chunk seen" flag). One fresh dict per clip (or per
# tile of a clip); modules hold no state themselves, so one model can serve many streams.
StreamCache = dict


def _conv_per_frame(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A checkpoint 2-D conv applied to every frame of `[B, C, T, H, W]` (kernel viewed as 1xkxk)."""
    return F.conv3d(x, conv.weight.unsqueeze(2), conv.bias, stride=(1, *conv.stride), padding=(0, *conv.padding))


def _upsample2x(x: torch.Tensor, frames: int = 1) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling of H and W (and `frames`-fold of T), in one copy, any dtype.

    `x` is `[B, C, T, H, W]`; with frames=2 its channels are two groups of C/2 (`[B, 2, C/2, ...]`)
    that become two consecutive frames (the upsample3d time step). For an integer factor 2,
    "nearest" and "nearest-exact" pick the same source pixel (floor(i / 2)), so this equals the
    official `nn.Upsample(scale_factor=2, mode="nearest-exact")`. The result keeps the memory
    layout of `x` (plain or channels-last).
    """
    b, c, t, h, w = x.shape
    c //= frames
    if is_channels_last(x):
        y = x.permute(0, 2, 3, 4, 1).view(b, t, h, w, frames, c)  # storage order
        y = y.permute(0, 1, 4, 2, 3, 5)[:, :, :, :, None, :, None, :]  # [B, T, f, H, 1, W, 1, C]
        y = y.expand(b, t, frames, h, 2, w, 2, c).reshape(b, t * frames, 2 * h, 2 * w, c)
        return y.permute(0, 4, 1, 2, 3)  # [B, C, fT, 2H, 2W], channels-last strides
    y = x.view(b, frames, c, t, h, w).permute(0, 2, 3, 1, 4, 5)  # [B, C, T, f, H, W]
    y = y[:, :, :, :, :, None, :, None]  # [B, C, T, f, H, 1, W, 1]
    return y.expand(b, c, t, frames, h, 2, w, 2).reshape(b, c, t * frames, 2 * h, 2 * w)


class CausalConv3d(nn.Conv3d):
    """Conv3d whose temporal padding sits entirely in the past, streamed through a cache.

    `padding=(pt, ph, pw)` as in the official code: H and W are zero-padded by the convolution
    itself, time gets `2 * pt` frames of history in front: the last frames of the previous chunk
    from the cache, or zeros at the start of a clip.

    History and chunk are assembled in one buffer, and the RMSNorm + SiLU that precede most convs
    write their output straight into it (`norm=`), so no separate concatenation pass is needed.
    With `fold_time` on (a 3-frame kernel), the conv runs as `vae_forms.time_folded_conv`: the
    same sums as one conv2d over frames stacked with their two predecessors on the channels.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size, stride=1, padding=0):
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=(0, ph, pw))
        self.history = 2 * pt
        self.folded: torch.Tensor | None = None  # the time-folded weight while `fold_time` is on
        self.ops: vae_forms.VAEOps = vae_forms.TORCH_OPS  # the per-pixel passes, set per call by `WanVAE`

    def can_fold_time(self) -> bool:
        return self.history == 2 and self.kernel_size[0] == 3 and self.stride[0] == 1 and self.dilation[0] == 1

    def fold_time(self, on: bool) -> None:
        """Run time-folded (`vae_forms.time_folded_conv`) from now on, or not. The folded weight is
        derived from `weight` here: call again after changing the weights."""
        if on and not self.can_fold_time():
            raise ValueError(f"only a causal conv with a 3-frame kernel folds time, not {self}")
        self.folded = vae_forms.time_folded_weight(self.weight) if on else None

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None, norm: RMSNorm | None = None,
                norm_bias: torch.Tensor | None = None, bias: bool = True) -> torch.Tensor:
        """`x` `[B, C, T, H, W]` -> conv(SiLU(norm(x + norm_bias)) if `norm` else x), causal in time.

        `norm_bias` is the previous conv's bias, left out of that conv (`bias=False`) and added here
        in the norm's one pass (where `VAEOps.fused`)."""
        if not self.history:
            return self._conv(norm(x, silu=True, bias=norm_bias) if norm is not None else x, bias)
        prev = None if cache is None else cache.get(self)
        if self.folded is not None:
            b = self.bias if bias else None
            y, tail = vae_forms.time_folded_conv(
                x, prev, self.folded, b, self.stride[1:], self.padding[1:], self.ops, norm, norm_bias, cache is not None
            )
        else:
            y, tail = self._buffered(x, prev, norm, norm_bias, bias, keep_tail=cache is not None)
        if cache is not None:
            cache[self] = tail
        return y

    def _buffered(self, x, prev, norm, norm_bias, bias: bool, keep_tail: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The 3-D conv over [history, chunk] -> (output, the next chunk's history if `keep_tail`)."""
        p = self.history
        b, c, t, h, w = x.shape
        buf = empty_as((b, c, p + t, h, w), x)  # [B, C, history + T, H, W]
        if prev is None:
            buf[:, :, :p].zero_()
        else:
            buf[:, :, :p].copy_(prev)
        # the next chunk's history: the last p frames, kept apart (not a view: don't pin the whole
        # buffer); the norm writes them there itself when the chunk has p frames or more
        tail = empty_as((b, c, p, h, w), x) if keep_tail and norm is not None and t >= p else None
        if norm is None:
            buf[:, :, p:].copy_(x)
        else:
            norm(x, silu=True, out=buf[:, :, p:], bias=norm_bias, tail=tail)
        if keep_tail and tail is None:
            tail = buf[:, :, -p:].clone()
        return self._conv(buf, bias), tail

    def _conv(self, x: torch.Tensor, bias: bool) -> torch.Tensor:
        return F.conv3d(x, self.weight, self.bias if bias else None, self.stride, self.padding)


class RMSNorm(nn.Module):
    """L2 normalisation over channels times sqrt(C) and a per-channel `gamma`, computed by
    `VAEOps.norm` (`vae_forms.rms_norm`: accumulated in float32; or its one Triton pass)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))
        self.ops: vae_forms.VAEOps = vae_forms.TORCH_OPS  # set per call by `WanVAE`

    def forward(self, x: torch.Tensor, silu: bool = False, out: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                tail: torch.Tensor | None = None, folded: torch.Tensor | None = None) -> torch.Tensor:
        """`x` `[B, C, ...]` (plus a per-channel `bias` first) -> same shape, SiLU'd if `silu`
        (written into `out` when given; its last frames into `tail` too when given; into a
        time-folded conv's buffer `folded` instead: `vae_forms.rms_norm`)."""
        return self.ops.norm(x, self.gamma, self.scale, silu, out, bias, tail, folded)


class ResidualBlock(nn.Module):
    """norm-SiLU-conv3x3x3 twice, plus a 1x1x1 shortcut when the width changes.

    The `residual` indices are the checkpoint's: 0 and 3 are the norms, 2 and 6 the convs
    (1, 4 are the SiLUs, 5 the dropout of training).
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()
        self.ops: vae_forms.VAEOps = vae_forms.TORCH_OPS  # set per call by `WanVAE`

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        late = self.ops.fused(x)  # the convs' biases go into the next pass (norm2's, the residual add's)
        h = conv1(x, cache, norm=norm1, bias=not late)
        h = conv2(h, cache, norm=norm2, norm_bias=conv1.bias if late else None, bias=not late)
        return self.ops.add_residual(h, conv2.bias if late else None, self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention among the pixels of each frame (the VAE's only global op)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.ops: vae_forms.VAEOps = vae_forms.TORCH_OPS  # set per call by `WanVAE`

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        """`cache` is unused (attention stays within a frame); taken for a uniform call signature."""
        b, c, t, h, w = x.shape
        qkv = _conv_per_frame(self.to_qkv, self.norm(x))  # [B, 3C, T, H, W]
        # [B, 3C, T, H, W] -> [B*T, 1 head, HW, 3C] (a view when channels-last)
        qkv = qkv.permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, 3 * c)
        q, k, v = qkv.chunk(3, dim=-1)
        o = self.ops.attention(q, k, v)  # [B*T, 1, HW, C]
        o = F.linear(o, self.proj.weight.reshape(c, c), self.proj.bias)
        o = o.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)  # [B, C, T, H, W] (strided view)
        return torch.add(x, o, out=empty_as(x.shape, x))


class Resample(nn.Module):
    """2x spatial up/down-sampling, optionally with 2x temporal (see the module docstring).

    `resample.0` (nearest upsampling or the right/bottom zero pad) holds no weights; it is kept so
    that the conv is `resample.1` as in the checkpoint, and applied here in channels-first form.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.phases: tuple[torch.Tensor, torch.Tensor] | None = None  # see `use_subpixel`
        self.ops: vae_forms.VAEOps = vae_forms.TORCH_OPS  # set per call by `WanVAE`
        if mode.startswith("up"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def use_subpixel(self, on: bool) -> None:
        """Upsamplers: run nearest-upsample + conv in its sub-pixel form (`vae_forms.subpixel_conv`)
        on channels-last activations from now on, or not. The phase kernels are derived from the
        conv's weight here: call again after changing the weights."""
        conv = self.resample[1]
        self.phases = vae_forms.subpixel_weights(conv.weight, conv.bias) if on and self.mode.startswith("up") else None

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        if self.mode.startswith("up"):
            frames = 1
            if self.mode == "upsample3d" and self in cache:
                x, frames = self.time_conv(x, cache), 2  # [B, 2C, T, H, W]: two frames' channels
            else:
                cache[self] = True  # upsample3d: the first chunk passes through in time
            if self.phases is not None and is_channels_last(x):
                return vae_forms.subpixel_conv(x, frames, *self.phases, self.ops.gather_phases)
            return _conv_per_frame(self.resample[1], _upsample2x(x, frames))  # [B, C, fT, 2H, 2W]

        padded = empty_as((*x.shape[:3], x.shape[3] + 1, x.shape[4] + 1), x)  # zero row/column at bottom/right
        padded[..., -1, :].zero_()
        padded[..., :-1, -1].zero_()
        padded[..., :-1, :-1].copy_(x)
        x = _conv_per_frame(self.resample[1], padded)
        if self.mode == "downsample3d":
            prev = cache.get(self)
            cache[self] = x[:, :, -1:].clone()
            if prev is not None:  # the first chunk passes through in time
                x = self.time_conv(torch.cat([prev, x], dim=2))  # [B, C, 1 + T, H, W] -> T/2 frames
        return x


def _middle(middle: nn.Sequential, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
    for layer in middle:  # ResidualBlock, AttentionBlock, ResidualBlock
        x = layer(x, cache)
    return x


class EncoderStack(nn.Module):
    """conv1 -> downsamples -> middle -> head, streamed with one cache: the forward both VAEs'
    encoders share (their `__init__` build different downsample stacks)."""

    def _middle_and_head(self, out_dim: int, z_dim: int) -> None:
        self.middle = nn.Sequential(
            ResidualBlock(out_dim, out_dim), AttentionBlock(out_dim), ResidualBlock(out_dim, out_dim)
        )
        self.head = nn.Sequential(RMSNorm(out_dim), nn.SiLU(), CausalConv3d(out_dim, 2 * z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        """A video chunk -> [B, 2*z_dim, T', h, w] (mean and log-variance halves)."""
        x = self.conv1(x, cache)
        for layer in self.downsamples:
            x = layer(x, cache)
        x = _middle(self.middle, x, cache)
        return self.head[2](x, cache, norm=self.head[0])


class Encoder3d(EncoderStack):
    """[B, 3, T, H, W] chunk -> [B, 2*z_dim, T', H/8, W/8]."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self._middle_and_head(out_dim, cfg.z_dim)


class Decoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = cfg.temperal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])
        )
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous level's upsampler halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(out_dim), nn.SiLU(), CausalConv3d(out_dim, 3, 3, padding=1))

    def trunk(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        """Latent-resolution part (input conv, middle with attention): needs whole frames."""
        return _middle(self.middle, self.conv1(x, cache), cache)

    def upper(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        """Upsampling part and head: convolutions only, so it can run on spatial tiles."""
        for layer in self.upsamples:
            x = layer(x, cache)
        return self.head[2](x, cache, norm=self.head[0])

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        return self.upper(self.trunk(x, cache), cache)

    def upper_halo(self) -> int:
        """How many latent pixels beyond its own an output pixel of `upper` depends on.

        Each 3x3 conv at a level with `scale` output pixels per latent pixel reaches 1/scale latent
        pixels further; nearest 2x upsampling nests pixels exactly and adds nothing. Temporal convs
        are 1x1 in space. For Wan2.1: 6 + 1/2 + 3 + 1/4 + 3/2 + 1/8 + 7/8 = 12.25 -> 13.
        """
        reach, scale = Fraction(0), 1
        for layer in self.upsamples:
            if isinstance(layer, ResidualBlock):
                reach += Fraction(2, scale)
            else:
                scale *= 2
                reach += Fraction(1, scale)
        reach += Fraction(1, scale)  # head conv
        return math.ceil(reach)


# the modules that run per-pixel passes: `WanVAE` hands them the call's `VAEOps`
_WITH_OPS = (CausalConv3d, RMSNorm, ResidualBlock, Resample, AttentionBlock)


def _conv_forms_per_call(method):
    """An encode/decode method: the call's forms chosen and the conv weights put in its layout
    before it (`WanVAE._weights_layout`), the derived weights dropped when it ends, whatever way."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self._weights_layout(self._channels_last())
        try:
            return method(self, *args, **kwargs)
        finally:
            self._drop_conv_forms()

    return wrapper


class WanVAE(nn.Module):
    """Wan2.1 VAE. `encode`: video -> normalised latent; `decode`: normalised latent -> video.

    Build from a file with `wan_core.loading.vae.load_vae(path, dtype=..., device=...)`; the
    weights' dtype is the compute dtype (fp32 or bf16). Inputs may live on another device (e.g. a
    CPU video): they are moved chunk by chunk.

    `channels_last`: store activations as `[B, T, H, W, C]` (logical shape unchanged). cuDNN's
    bf16 3-D convolutions run natively in that layout (NCDHW costs it a transpose in and out of
    every conv), and a pixel's channels are contiguous, so the norms and residual adds on a GPU
    run as one-pass Triton kernels; the GPU forms of `vae_forms` (time-folded convs, sub-pixel
    upsamplers) build on it. None (default) picks it on CUDA and the plain layout elsewhere.
    Results are the same up to rounding; the measured speed-ups: benchmarks/NOTES.md.
    """

    def __init__(self, config: WanVAEConfig | None = None, channels_last: bool | None = None):
        super().__init__()
        self.channels_last = channels_last
        self.config = config = config or WanVAEConfig()
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def _drop_conv_forms(self) -> None:
        """Drop the weights `_weights_layout` derived for this call (time-folded, sub-pixel): made
        afresh per call, they would otherwise stay on the GPU after an offload moves the VAE away.
        The per-pixel passes go back to torch's."""
        for m in self.modules():
            if isinstance(m, CausalConv3d):
                m.folded = None
            elif isinstance(m, Resample):
                m.phases = None
            if isinstance(m, _WITH_OPS):
                m.ops = vae_forms.TORCH_OPS

    def _channels_last(self) -> bool:
        """The activation layout of a call: `channels_last`, or None: channels-last on CUDA."""
        return self.channels_last if self.channels_last is not None else self.device.type == "cuda"

    @staticmethod
    def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        """`x` in the activation layout of this call (a no-op when it already is)."""
        return x.contiguous(memory_format=CL if channels_last else torch.contiguous_format)

    def _weights_layout(self, channels_last: bool) -> None:
        """Choose this call's forms, once, for the activation layout and the VAE's device: every
        conv weight stored in the activations' layout (`vae_forms.weight_in_layout`; a walk over
        the modules per call), the device's per-pixel passes (`vae_forms.vae_ops`) handed to the modules;
        channels-last, the upsamplers in sub-pixel form (`Resample.use_subpixel`), and on CUDA the
        convs `vae_forms.folds_time_on_cuda` picks time-folded (`CausalConv3d.fold_time`). Their
        derived weights are made here (a few small kernels) and dropped after the call
        (`_conv_forms_per_call`)."""
        fold = channels_last and self.device.type == "cuda"
        ops = vae_forms.vae_ops(self.device)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                vae_forms.weight_in_layout(m, channels_last)
            if isinstance(m, CausalConv3d) and m.can_fold_time():
                m.fold_time(fold and vae_forms.folds_time_on_cuda(m.in_channels, m.out_channels))
            if isinstance(m, Resample):
                m.use_subpixel(channels_last)
            if isinstance(m, _WITH_OPS):
                m.ops = ops

    @torch.no_grad()
    @_conv_forms_per_call
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video `[B, 3, 1 + 4k, H, W]` in [-1, 1] -> latent mean `[B, 16, 1 + k, H/8, W/8]`, float32.

        Frames go through the encoder 1, then 4 at a time, with one stream cache. The result is
        normalised as the DiT expects: `(mu - mean) * (1 / std)`.
        """
        b, c, t, h, w = video.shape
        r, s, z = self.config.temporal_ratio, self.config.spatial_ratio, self.config.z_dim
        if c != 3 or (t - 1) % r or h % s or w % s:
            raise ValueError(
                f"video must be [B, 3, 1 + {r}k, H, W] with H, W multiples of {s}; got {list(video.shape)}"
            )
        device, dtype = self.device, self.dtype
        w_mu, b_mu = self.conv1.weight[:z], self.conv1.bias[:z]  # only the mean half of conv1 is needed
        out = torch.empty(b, z, 1 + (t - 1) // r, h // s, w // s, dtype=torch.float32, device=device)
        cl = self._channels_last()
        cache: StreamCache = {}
        for i in range(out.shape[2]):
            t0, t1 = (0, 1) if i == 0 else (1 + r * (i - 1), 1 + r * i)
            x = self._layout(video[:, :, t0:t1].to(device=device, dtype=dtype), cl)
            out[:, :, i : i + 1] = F.conv3d(self.encoder(x, cache), w_mu, b_mu)
        mean, std = self.config.latent_stats(device)
        inv_std = 1.0 / std
        return out.sub_(mean).mul_(inv_std)

    @torch.no_grad()
    @_conv_forms_per_call
    def decode(self, latents: torch.Tensor, tile_size: int | tuple[int, int] | None = None,
               out_device: torch.device | str | None = None, on_frames: Callable[[torch.Tensor], None] | None = None,
               keep: bool = True) -> torch.Tensor | None:
        """Normalised latent `[B, 16, T, h, w]` -> video `[B, 3, 1 + 4(T-1), 8h, 8w]` in [-1, 1], float32.

        One latent frame at a time with one stream cache. `tile_size` (latent pixels, int or
        (height, width)) bounds memory: the latent-resolution trunk (which holds the attention)
        runs on whole frames, the convolution-only upper part runs tile by tile, each tile widened
        by the upper part's receptive field (`Decoder3d.upper_halo`, 13 latent pixels for Wan2.1)
        and cropped back, so the tiled result equals the plain one (no blending, no seams) up to
        the rounding noise of differently sized convs; it costs time, the halo being recomputed
        per tile (measured: benchmarks/NOTES.md).
        `out_device` puts the video elsewhere (e.g. "cpu") as it is produced. `on_frames` is
        handed each finished chunk `[B, 3, t, 8h, 8w]` (a view of the result) as soon as it is
        decoded, e.g. to encode a video while the rest decodes (tiled: once, at the end).
        `keep=False` (untiled only) assembles no result: each chunk goes to `on_frames` on the
        VAE's device, float32, and nothing is returned (the caller converts and keeps the frames
        its own way, e.g. ComfyUI's layout on the GPU before one copy to the CPU).
        """
        b, zc, t, h, w = latents.shape
        r, s = self.config.temporal_ratio, self.config.spatial_ratio
        if zc != self.config.z_dim:
            raise ValueError(f"latents must have {self.config.z_dim} channels, got {list(latents.shape)}")
        device, dtype = self.device, self.dtype
        mean, std = self.config.latent_stats(device)
        inv_std = 1.0 / std
        cl = self._channels_last()
        x = self._layout(self.conv2((latents.to(device=device, dtype=torch.float32) / inv_std + mean).to(dtype)), cl)
        if not keep:
            if tile_size is not None or on_frames is None:
                raise ValueError("decode(keep=False) streams untiled chunks to on_frames: give on_frames, no tile_size")
            cache: StreamCache = {}
            for i in range(t):
                on_frames(self.decoder(x[:, :, i : i + 1], cache).clamp_(-1, 1).float())
            return None
        out = torch.empty(b, 3, 1 + r * (t - 1), h * s, w * s, dtype=torch.float32, device=out_device or device)

        def frames(i: int) -> slice:
            return slice(0, 1) if i == 0 else slice(1 + r * (i - 1), 1 + r * i)

        if tile_size is None:
            cache = {}
            for i in range(t):
                out[:, :, frames(i)] = self.decoder(x[:, :, i : i + 1], cache).clamp_(-1, 1)
                if on_frames is not None:
                    on_frames(out[:, :, frames(i)])
            return out

        th, tw = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
        halo = self.decoder.upper_halo()
        cache = {}
        feats = torch.cat([self.decoder.trunk(x[:, :, i : i + 1], cache) for i in range(t)], dim=2)
        for y0 in range(0, h, th):
            for x0 in range(0, w, tw):
                y1, x1 = min(y0 + th, h), min(x0 + tw, w)
                ry0, ry1, rx0, rx1 = max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo)
                tile_cache: StreamCache = {}
                for i in range(t):
                    y = self.decoder.upper(self._layout(feats[:, :, i : i + 1, ry0:ry1, rx0:rx1], cl), tile_cache)
                    core = y[:, :, :, (y0 - ry0) * s : (y1 - ry0) * s, (x0 - rx0) * s : (x1 - rx0) * s]
                    out[:, :, frames(i), y0 * s : y1 * s, x0 * s : x1 * s] = core.clamp(-1, 1)
        if on_frames is not None:
            on_frames(out)
        return out


def latent_to_raw(z: torch.Tensor) -> torch.Tensor:
    """The DiT's normalised latent [B, C, F, h, w] -> the raw VAE latent `z * std + mean` (C 16: the
    Wan2.1 VAE's statistics; C 48: the Wan2.2 VAE's, TI2V-5B).

    ComfyUI's LATENT holds raw latents (its Wan latent formats normalise on the way into a model
    and back on the way out), so the pack's nodes exchange raw latents: ComfyUI's own VAE Decode
    can read what WanSampler writes, and WanVAEDecode what a core sampler writes.
    """
    mean, std = latent_stats_for(z.shape[1], z.device)
    return z.float() * std + mean


def latent_from_raw(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `latent_to_raw`: raw VAE latent -> the normalised latent the DiT and `decode` take."""
    mean, std = latent_stats_for(x.shape[1], x.device)
    return (x.float() - mean) / std
