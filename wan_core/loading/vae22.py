"""Reading a Wan2.2 VAE file: the official `Wan2.2_VAE.pth`, ComfyUI's `wan2.2_vae.safetensors`
(with or without a prefix) and diffusers' `AutoencoderKLWan` (Wan2.2 config), all mapped to the
official names `wan_core.models.vae22` uses; the key set is checked against the model's."""

from __future__ import annotations

import os
import re

import torch

from ..models.vae22 import Wan22VAE, Wan22VAEConfig
from .io import CheckpointError, read_keys, read_state_dict
from .vae import _RESNET_RENAMES, KNOWN_PREFIXES, check_vae_state_dict, outer_name

__all__ = [
    "diffusers22_to_official",
    "to_official_vae22",
    "load_vae22_state_dict",
    "vae22_config_from_state_dict",
    "load_vae22",
    "is_wan22_vae",
]

# ComfyUI tells the two VAEs apart by this key; diffusers' Wan2.2 VAE by its residual up block's
# upsampler (`upsampler`, singular; Wan2.1's is `upsamplers.0`).
_OFFICIAL_ANCHOR = "decoder.upsamples.0.upsamples.0.residual.2.weight"
_DIFFUSERS_ANCHOR = "decoder.up_blocks.0.upsampler.resample.1.weight"


def diffusers22_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers `AutoencoderKLWan` state dict of the Wan2.2 config to the official names.

    encoder.down_blocks.I.{resnets.J, downsampler} -> encoder.downsamples.I.downsamples.{J, n}
    decoder.up_blocks.I.{resnets.J, upsampler} -> decoder.upsamples.I.upsamples.{J, n}
    (n = the level's number of residual blocks); the rest as for the Wan2.1 VAE.
    """
    n_resnets: dict[tuple[str, int], int] = {}
    for k in sd:
        if m := re.match(r"(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.resnets\.(\d+)\.", k):
            key = (m.group(1), int(m.group(2)))
            n_resnets[key] = max(n_resnets.get(key, 0), int(m.group(3)) + 1)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] in ("encoder", "decoder") and parts[1] in ("mid_block", "down_blocks", "up_blocks"):
            side, group = parts[0], parts[1]
            if group == "mid_block":  # resnets.0, attentions.0, resnets.1 -> middle.0, .1, .2
                n = int(parts[3])
                head, rest = f"{side}.middle.{2 * n if parts[2] == 'resnets' else 2 * n + 1}", parts[4:]
            else:
                inner = "downsamples" if group == "down_blocks" else "upsamples"
                level = int(parts[2])
                if parts[3] == "resnets":
                    pos, rest = int(parts[4]), parts[5:]
                else:  # downsampler / upsampler
                    pos, rest = n_resnets[(f"{side}.{group}", level)], parts[4:]
                head = f"{side}.{inner}.{level}.{inner}.{pos}"
            if rest[0] in _RESNET_RENAMES:
                rest = [_RESNET_RENAMES[rest[0]], *rest[1:]]
            out[".".join([head, *rest])] = v
        else:
            out[outer_name(parts)] = v
    return out


def to_official_vae22(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout (prefix stripped, diffusers renamed) -> official Wan2.2 VAE names."""
    for prefix in ("", *KNOWN_PREFIXES):
        if prefix + _OFFICIAL_ANCHOR in sd:
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if prefix + _DIFFUSERS_ANCHOR in sd:
            return diffusers22_to_official({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)})
    if any(k.endswith("decoder.upsamples.0.residual.2.weight") or k.endswith("decoder.up_blocks.0.upsamplers.0.resample.1.weight")
           for k in sd):
        raise CheckpointError("this is a Wan2.1 VAE (16 latent channels); the Wan2.2 VAE (48 channels) is expected")
    raise CheckpointError(
        f"not a Wan2.2 VAE: expected a tensor such as {_OFFICIAL_ANCHOR} (official/ComfyUI) or {_DIFFUSERS_ANCHOR} "
        f"(diffusers), optionally behind one of the prefixes {', '.join(KNOWN_PREFIXES)}; found {len(sd)} tensors"
    )


def load_vae22_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a Wan2.2 VAE file in any supported layout; keys come back in the official names."""
    sd = read_state_dict(path)
    try:
        return to_official_vae22(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{os.fspath(path)}: {e}") from e


def vae22_config_from_state_dict(sd: dict) -> Wan22VAEConfig:
    """The architecture read off official-named tensors (or name -> shape lists), for files of another
    width than `Wan2.2_VAE.pth` (the tiny models): encoder/decoder widths from the convs around the
    latent, the patch from the first conv's input (3p²), each encoder level's residual count and
    temporal resampler (`time_conv`) from `encoder.downsamples.N.downsamples.M`. The latent statistics
    are the official ones for z 48 and the identity otherwise."""

    def shape(k: str) -> list[int]:
        v = sd[k]
        return list(v.shape) if isinstance(v, torch.Tensor) else list(v)

    try:
        dim, in_ch = shape("encoder.conv1.weight")[:2]
        z_dim = shape("conv2.weight")[0]
        levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples."))
        widths, temporal, res_blocks = [], [], 0
        for n in range(levels):
            p = f"encoder.downsamples.{n}.downsamples."
            blocks = sorted({int(k[len(p) :].split(".")[0]) for k in sd if k.startswith(p)})
            res = [m for m in blocks if f"{p}{m}.residual.2.weight" in sd]
            widths.append(shape(f"{p}{res[-1]}.residual.2.weight")[0])
            res_blocks = len(res)
            if n < levels - 1:
                temporal.append(any(f"{p}{m}.time_conv.weight" in sd for m in blocks))
        dim_mult = tuple(w // dim for w in widths)
        dec_dim = shape("decoder.conv1.weight")[0] // dim_mult[-1]
        patch = round((in_ch / 3) ** 0.5)
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"cannot read the Wan2.2 VAE architecture off the tensors ({e!r})") from e
    stats = {} if z_dim == 48 else {"latents_mean": (0.0,) * z_dim, "latents_std": (1.0,) * z_dim}
    return Wan22VAEConfig(dim=dim, dec_dim=dec_dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=res_blocks,
                          temperal_downsample=tuple(temporal), patch_size=patch, **stats)  # fmt: skip


def load_vae22(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    config: Wan22VAEConfig | None = None,
) -> Wan22VAE:
    """Build on the meta device (the architecture read off the file's shapes unless `config` is
    given: the official one for `Wan2.2_VAE.pth`), check the file's keys and shapes against it,
    and assign the weights."""
    sd = load_vae22_state_dict(path)
    if config is None:
        config = vae22_config_from_state_dict(sd)
    with torch.device("meta"):
        model = Wan22VAE(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_vae_state_dict(sd, expected, source=os.fspath(path), what="Wan2.2 VAE")
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def is_wan22_vae(path: str | os.PathLike) -> bool:
    """Whether a VAE file (any layout, any prefix) is the Wan2.2 VAE (z 48) rather than Wan2.1's
    (a safetensors file is told by its header alone)."""
    return any(k.endswith((_OFFICIAL_ANCHOR, _DIFFUSERS_ANCHOR)) for k in read_keys(path))
