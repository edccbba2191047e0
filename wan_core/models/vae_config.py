"""The VAE's architecture as data (`WanVAEConfig`: the defaults are Wan2.1's, `from_state_dict`
reads it off a checkpoint's tensor shapes) and the latent statistics of both Wan VAEs (Wan2.1: 16
channels, Wan2.2: 48), which also tell the two latents apart by their channel count."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "WanVAEConfig", "WAN21_LATENT_MEAN", "WAN21_LATENT_STD", "WAN22_LATENT_MEAN", "WAN22_LATENT_STD", "latent_stats_for",
]  # fmt: skip

# Per-channel statistics of Wan2.1 latents: the DiT works on (mu - mean) / std.
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


# Per-channel statistics of Wan2.2 latents, as `Wan2_2_VAE.__init__` in the official
# wan/modules/vae2_2.py has them: the DiT works on (mu - mean) / std.
WAN22_LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


_STATS = {16: (WAN21_LATENT_MEAN, WAN21_LATENT_STD), 48: (WAN22_LATENT_MEAN, WAN22_LATENT_STD)}


def latent_stats_for(channels: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) float32 `[1, C, 1, 1, 1]` of a Wan latent with `channels` channels: 16 = the Wan2.1
    VAE's (Wan2.1, Wan2.2 A14B), 48 = the Wan2.2 VAE's (TI2V-5B); any other count is a ValueError."""
    if channels not in _STATS:
        raise ValueError(
            f"a Wan video latent has 16 channels (Wan2.1 VAE: Wan2.1, Wan2.2 A14B) or 48 (Wan2.2 VAE: TI2V-5B), got {channels}"
        )
    shape = (1, channels, 1, 1, 1)
    mean, std = (torch.tensor(v, dtype=torch.float32, device=device).view(shape) for v in _STATS[channels])
    return mean, std


class VAEConfigChecks:
    """What the Wan2.1 and Wan2.2 VAE configs share: field checks, temporal ratio, latent statistics."""

    def __post_init__(self):
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temperal_downsample needs one entry per level transition (len(dim_mult) - 1)")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/latents_std need {self.z_dim} values (z_dim)")

    @property
    def temporal_ratio(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    def latent_stats(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as float32 `[1, z, 1, 1, 1]`; built per call, so a meta-built model needs no buffer fix-up."""
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(self.latents_mean, dtype=torch.float32, device=device).view(shape)
        return mean, torch.tensor(self.latents_std, dtype=torch.float32, device=device).view(shape)


@dataclass(frozen=True)
class WanVAEConfig(VAEConfigChecks):
    """Architecture of the VAE; the defaults are Wan2.1's (`Wan2.1_VAE.pth`)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # per level transition of the encoder; the decoder uses the reverse (official spelling kept)
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENT_STD

    @property
    def spatial_ratio(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> WanVAEConfig:
        """Read the architecture off tensor shapes (official key names, see `loading.vae`).

        The encoder's `downsamples` list is walked in order: residual blocks (their output width
        gives `dim_mult`) separated by resamplers (a `time_conv` marks a temporal one). Latent
        statistics are Wan2.1's for z_dim 16 and the identity otherwise.
        """
        dim = sd["encoder.conv1.weight"].shape[0]
        z_dim = sd["conv2.weight"].shape[0]
        indices = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")})
        levels: list[list[int]] = [[]]
        temporal: list[bool] = []
        for i in indices:
            p = f"encoder.downsamples.{i}."
            if p + "resample.1.weight" in sd:
                temporal.append(p + "time_conv.weight" in sd)
                levels.append([])
            else:
                levels[-1].append(sd[p + "residual.2.weight"].shape[0])
        stats = {} if z_dim == 16 else {"latents_mean": (0.0,) * z_dim, "latents_std": (1.0,) * z_dim}
        return cls(
            dim=dim,
            z_dim=z_dim,
            dim_mult=tuple(level[-1] // dim for level in levels),
            num_res_blocks=len(levels[0]),
            temperal_downsample=tuple(temporal),
            **stats,
        )
