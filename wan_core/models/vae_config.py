"""The VAE's architecture as data (`WanVAEConfig`: the defaults are Wan2.1's, `from_state_dict`
reads it off a checkpoint's tensor shapes) and the Wan2.1 latent statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["WanVAEConfig", "WAN21_LATENT_MEAN", "WAN21_LATENT_STD"]

# Per-channel statistics of Wan2.1 latents: the DiT works on (mu - mean) / std.
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


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
