"""The Wan2.2 video VAE (TI2V-5B): 48 latent channels, 16x spatial and 4x temporal compression.

Module and parameter names are those of `Wan2.2_VAE.pth` (official `wan/modules/vae2_2.py`).
What differs from the Wan2.1 VAE (`vae.py`, whose blocks are reused where the math is the same):
- a 2x2 patchify folds pixels into channels before the encoder (3 -> 12) and the inverse ends the
  decoder, so the three 2x resampling levels give 16x in space;
- each encoder level is one block `downsamples.N` (its residual blocks and resampler in
  `downsamples.N.downsamples.M`) plus a parameter-free shortcut that averages the level's input
  down to its output shape (`avg_down`); each decoder level likewise `upsamples.N.upsamples.M` plus
  a parameter-free shortcut that repeats its input up (`dup_up`);
- the decoder has its own width (`dec_dim`), and its upsamplers keep the channel count.

Streaming is the Wan2.1 VAE's: causal convs with a per-clip stream cache (encode: 1 frame, then 4
at a time; decode: one latent frame at a time). Torch forms only: no channels-last, no fused passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vae import AttentionBlock, CausalConv3d, EncoderStack, Resample, ResidualBlock, RMSNorm, StreamCache, _middle
from .vae_config import WAN22_LATENT_MEAN, WAN22_LATENT_STD, VAEConfigChecks

__all__ = ["Wan22VAE", "Wan22VAEConfig", "WAN22_LATENT_MEAN", "WAN22_LATENT_STD", "patchify", "unpatchify"]


@dataclass(frozen=True)
class Wan22VAEConfig(VAEConfigChecks):
    """Architecture of the Wan2.2 VAE; the defaults are `Wan2.2_VAE.pth`'s."""

    dim: int = 160  # encoder base width
    dec_dim: int = 256  # decoder base width
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # official spelling kept
    patch_size: int = 2
    latents_mean: tuple[float, ...] = WAN22_LATENT_MEAN
    latents_std: tuple[float, ...] = WAN22_LATENT_STD

    @property
    def spatial_ratio(self) -> int:
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """`[B, C, T, H, W]` -> `[B, C*p*p, T, H/p, W/p]`, channel c*p*p + q*p + r for the pixel at
    row offset r, column offset q (the official order: column offset before row offset)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)  # [B, C, q, r, T, h, w]
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify`: `[B, C*p*p, T, h, w]` -> `[B, C, T, h*p, w*p]`."""
    b, cp, t, h, w = x.shape
    x = x.reshape(b, cp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)  # [B, C, T, h, r, w, q]
    return x.reshape(b, cp // (p * p), t, h * p, w * p)


def avg_down(x: torch.Tensor, out_dim: int, ft: int, fs: int) -> torch.Tensor:
    """Parameter-free shortcut of an encoder level: fold `ft` frames and `fs`x`fs` pixels into the
    channels, then average groups of consecutive channels down to `out_dim`.

    A chunk whose frame count is not a multiple of `ft` (the 1-frame first chunk) gets zero frames
    in front, as the official code pads it.
    """
    b, c, t, h, w = x.shape
    pad = -t % ft
    if pad:
        x = F.pad(x, (0, 0, 0, 0, pad, 0))
        t += pad
    x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)  # [B, C, ft, fs, fs, T', h, w]
    x = x.reshape(b, out_dim, c * ft * fs * fs // out_dim, t // ft, h // fs, w // fs)  # [B, out, group, T', h, w]
    return x.mean(dim=2)


def dup_up(x: torch.Tensor, out_dim: int, ft: int, fs: int, first_chunk: bool) -> torch.Tensor:
    """Parameter-free shortcut of a decoder level: repeat each channel, then unfold groups of
    channels into `ft` frames and `fs`x`fs` pixels. On the first chunk the first `ft - 1` frames are
    dropped (the temporal upsampler passes that chunk through in time)."""
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(out_dim * ft * fs * fs // c, dim=1)  # [B, out*ft*fs*fs, T, h, w]
    x = x.reshape(b, out_dim, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)  # [B, out, T, ft, h, fs, w, fs]
    x = x.reshape(b, out_dim, t * ft, h * fs, w * fs)
    return x[:, :, ft - 1 :] if first_chunk else x


class UpResample(Resample):
    """The Wan2.1 upsampler with a conv that keeps the width (Wan2.2's `upsample_out_dim=dim`)."""

    def __init__(self, dim: int, mode: str):
        super().__init__(dim, mode)
        self.resample[1] = nn.Conv2d(dim, dim, 3, padding=1)


class DownBlock(nn.Module):
    """One encoder level: residual blocks (+ a resampler) plus the `avg_down` shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, 2 if temporal else 1, 2 if down else 1
        layers: list[nn.Module] = []
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if down:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        h = x
        for layer in self.downsamples:
            h = layer(h, cache)
        return h + avg_down(x, self.out_dim, self.ft, self.fs)


class UpBlock(nn.Module):
    """One decoder level: residual blocks (+ an upsampler) plus, when it upsamples, the `dup_up`
    shortcut. Its first call on a stream is the first chunk (remembered in the cache)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.out_dim, self.ft, self.up = out_dim, 2 if temporal else 1, up
        layers: list[nn.Module] = []
        for _ in range(num_res_blocks + 1):
            layers.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if up:
            layers.append(UpResample(out_dim, "upsample3d" if temporal else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        first = self not in cache
        cache[self] = True
        h = x
        for layer in self.upsamples:
            h = layer(h, cache)
        return h + dup_up(x, self.out_dim, self.ft, 2, first) if self.up else h


class Encoder3d22(EncoderStack):
    """[B, 3p², T, H/p, W/p] chunk (patchified) -> [B, 2*z_dim, T', H/16, W/16]."""

    def __init__(self, cfg: Wan22VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(3 * cfg.patch_size**2, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*(
            DownBlock(i_d, o_d, cfg.num_res_blocks, i != last and cfg.temperal_downsample[i], i != last)
            for i, (i_d, o_d) in enumerate(zip(dims[:-1], dims[1:]))
        ))
        self._middle_and_head(dims[-1], cfg.z_dim)


class Decoder3d22(nn.Module):
    def __init__(self, cfg: Wan22VAEConfig):
        super().__init__()
        dims = [cfg.dec_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_up = cfg.temperal_downsample[::-1]
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])
        )
        self.upsamples = nn.Sequential(*(
            UpBlock(i_d, o_d, cfg.num_res_blocks, i != last and temporal_up[i], i != last)
            for i, (i_d, o_d) in enumerate(zip(dims[:-1], dims[1:]))
        ))
        out_dim = dims[-1]
        self.head = nn.Sequential(RMSNorm(out_dim), nn.SiLU(), CausalConv3d(out_dim, 3 * cfg.patch_size**2, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        """[B, z_dim, 1, h, w] latent frame -> [B, 3p², t, 8h, 8w] (t = 1 on the first chunk, else 4)."""
        x = _middle(self.middle, self.conv1(x, cache), cache)
        for layer in self.upsamples:
            x = layer(x, cache)
        return self.head[2](x, cache, norm=self.head[0])


class Wan22VAE(nn.Module):
    """Wan2.2 VAE. `encode`: video -> normalised latent; `decode`: normalised latent -> video.

    The weights' dtype is the compute dtype; inputs may live on another device (moved chunk by
    chunk). Same contract as `WanVAE.encode` / `decode` (untiled), with 48 channels and 16x space.
    """

    def __init__(self, config: Wan22VAEConfig | None = None):
        super().__init__()
        self.config = config = config or Wan22VAEConfig()
        self.encoder = Encoder3d22(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d22(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video `[B, 3, 1 + 4k, H, W]` in [-1, 1] -> latent mean `[B, 48, 1 + k, H/16, W/16]`,
        float32, normalised as the DiT expects: `(mu - mean) * (1 / std)`."""
        b, c, t, h, w = video.shape
        r, s, z, p = self.config.temporal_ratio, self.config.spatial_ratio, self.config.z_dim, self.config.patch_size
        if c != 3 or (t - 1) % r or h % s or w % s:
            raise ValueError(
                f"video must be [B, 3, 1 + {r}k, H, W] with H, W multiples of {s}; got {list(video.shape)}"
            )
        device, dtype = self.device, self.dtype
        w_mu, b_mu = self.conv1.weight[:z], self.conv1.bias[:z]  # only the mean half of conv1 is needed
        out = torch.empty(b, z, 1 + (t - 1) // r, h // s, w // s, dtype=torch.float32, device=device)
        cache: StreamCache = {}
        for i in range(out.shape[2]):
            t0, t1 = (0, 1) if i == 0 else (1 + r * (i - 1), 1 + r * i)
            x = patchify(video[:, :, t0:t1].to(device=device, dtype=dtype), p)  # [B, 3p², t, H/p, W/p]
            out[:, :, i : i + 1] = F.conv3d(self.encoder(x, cache), w_mu, b_mu)
        mean, std = self.config.latent_stats(device)
        return out.sub_(mean).mul_(1.0 / std)

    @torch.no_grad()
    def decode(
        self,
        latents: torch.Tensor,
        tile_size: int | None = None,
        out_device: torch.device | str | None = None,
        on_frames=None,
        keep: bool = True,
    ) -> torch.Tensor | None:
        """Normalised latent `[B, 48, T, h, w]` -> video `[B, 3, 1 + 4(T-1), 16h, 16w]` in [-1, 1],
        float32; one latent frame at a time with one stream cache.

        on_frames: handed each decoded chunk `[B, 3, t, H, W]` on the VAE's device as it is made;
        keep=False returns None instead of the whole video (the caller keeps what it needs).
        Same signature as `WanVAE.decode`; tile_size (tiling) is refused: whole frames only.
        """
        b, zc, t, h, w = latents.shape
        r, s, p = self.config.temporal_ratio, self.config.spatial_ratio, self.config.patch_size
        if zc != self.config.z_dim:
            raise ValueError(f"latents must have {self.config.z_dim} channels, got {list(latents.shape)}")
        if tile_size is not None:
            raise ValueError("tiled decoding (use_tiling_vae) is not available for the Wan2.2 VAE; decode whole frames")
        device, dtype = self.device, self.dtype
        mean, std = self.config.latent_stats(device)
        inv_std = 1.0 / std  # the official code stores 1/std and divides by it
        x = self.conv2((latents.to(device=device, dtype=torch.float32) / inv_std + mean).to(dtype))
        out = None
        if keep:
            out = torch.empty(b, 3, 1 + r * (t - 1), h * s, w * s, dtype=torch.float32, device=out_device or device)
        cache: StreamCache = {}
        for i in range(t):
            frames = slice(0, 1) if i == 0 else slice(1 + r * (i - 1), 1 + r * i)
            chunk = unpatchify(self.decoder(x[:, :, i : i + 1], cache), p).clamp_(-1, 1).float()
            if on_frames is not None:
                on_frames(chunk)
            if out is not None:
                out[:, :, frames] = chunk
        return out
