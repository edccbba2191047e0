"""Key maps for the Wan2.1 VAE.

Users bring the VAE in three layouts; all become the official names of `Wan2.1_VAE.pth`, which
are the module names of `wan_core.models.vae.WanVAE`:

- official `Wan2.1_VAE.pth` (a pickled state dict): used as is;
- ComfyUI `wan_2.1_vae.safetensors`: the same names, sometimes behind a prefix such as `vae.` or
  `first_stage_model.` (a VAE saved inside a bigger checkpoint); the prefix is stripped and
  tensors of other models in the same file are ignored;
- diffusers `AutoencoderKLWan` (`vae/diffusion_pytorch_model.safetensors`): renamed below.

diffusers <-> official, derived from the two module structures (Wan2.1, non-residual blocks):

    quant_conv / post_quant_conv               conv1 / conv2
    {encoder,decoder}.conv_in                   {encoder,decoder}.conv1
    {encoder,decoder}.norm_out / conv_out       {encoder,decoder}.head.0 / head.2
    *.mid_block.resnets.0 / attentions.0 / resnets.1     *.middle.0 / middle.1 / middle.2
    encoder.down_blocks.N                       encoder.downsamples.N  (same flat list)
    decoder.up_blocks.I.resnets.J               decoder.upsamples.(offset(I) + J)
    decoder.up_blocks.I.upsamplers.0            decoder.upsamples.(offset(I) + resnets in I)
    residual block: norm1, conv1, norm2, conv2, conv_shortcut -> residual.0, residual.2, residual.3,
                    residual.6, shortcut

where offset(I) counts the entries of the decoder's flat `upsamples` list before level I (its
residual blocks plus its upsampler). Resamplers (`resample.1`, `time_conv`) and attention blocks
(`norm`, `to_qkv`, `proj`) have the same inner names in both. The maps only rename: tensors stay
the same objects, so memory-mapped weights stay memory-mapped. `load_vae` reads a file of any of
these layouts into a `wan_core.models.vae.WanVAE`.
"""

from __future__ import annotations

import os
import re

import torch

from ..models.vae import WanVAE
from ..models.vae_config import WanVAEConfig
from .io import CheckpointError, read_state_dict

__all__ = [
    "KNOWN_PREFIXES",
    "detect_vae_layout",
    "diffusers_to_official",
    "to_official_vae",
    "load_vae_state_dict",
    "check_vae_state_dict",
    "load_vae",
]

# Prefixes a VAE's keys may carry in files made by other tools (longest first).
KNOWN_PREFIXES = ("first_stage_model.", "model.vae.", "vae.", "model.")

# Tensors every Wan2.1 VAE file has, per layout (after prefix stripping).
_OFFICIAL_ANCHORS = (
    "encoder.conv1.weight",
    "decoder.conv1.weight",
    "conv2.weight",
    "decoder.middle.0.residual.0.gamma",
)
_DIFFUSERS_ANCHORS = ("encoder.conv_in.weight", "decoder.conv_in.weight", "post_quant_conv.weight")

_RESNET_RENAMES = {
    "norm1": "residual.0",
    "conv1": "residual.2",
    "norm2": "residual.3",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}
_TOP_RENAMES = {
    "quant_conv": "conv1",
    "post_quant_conv": "conv2",
    "conv_in": "conv1",
    "norm_out": "head.0",
    "conv_out": "head.2",
}


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the tensors of the VAE (behind a known prefix, or none) without that prefix."""
    for prefix in ("", *KNOWN_PREFIXES):
        if any(prefix + a in sd for a in _OFFICIAL_ANCHORS + _DIFFUSERS_ANCHORS):
            if not prefix:
                return sd
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def detect_vae_layout(keys) -> str:
    """ "official" or "diffusers" for a prefix-free key set; CheckpointError for anything else."""
    keys = set(keys)
    if {"decoder.upsamples.0.upsamples.0.residual.2.weight", "decoder.up_blocks.0.upsampler.resample.1.weight"} & keys:
        raise CheckpointError("this is a Wan2.2 VAE (48 latent channels); the Wan2.1 VAE (16 channels) is expected")
    if all(a in keys for a in _OFFICIAL_ANCHORS):
        return "official"
    if all(a in keys for a in _DIFFUSERS_ANCHORS):
        return "diffusers"
    sample = ", ".join(sorted(keys)[:5])
    raise CheckpointError(
        "not a Wan2.1 VAE: expected tensors such as "
        f"{', '.join(_OFFICIAL_ANCHORS[:2])} (official/ComfyUI) or {_DIFFUSERS_ANCHORS[0]} (diffusers), "
        f"optionally behind one of the prefixes {', '.join(KNOWN_PREFIXES)}; found {len(keys)} tensors"
        + (f" such as {sample}" if sample else "")
    )


def diffusers_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers `AutoencoderKLWan` state dict (Wan2.1 layout) to the official names."""
    # decoder.up_blocks.I.{resnets.J, upsamplers.0} -> position in the flat `upsamples` list
    n_resnets: dict[int, int] = {}
    has_upsampler: set[int] = set()
    for k in sd:
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", k):
            i = int(m.group(1))
            n_resnets[i] = max(n_resnets.get(i, 0), int(m.group(2)) + 1)
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", k):
            has_upsampler.add(int(m.group(1)))
    offset, total = {}, 0
    for i in sorted(n_resnets):
        offset[i], total = total, total + n_resnets[i] + (i in has_upsampler)

    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] in ("encoder", "decoder") and parts[1] in ("mid_block", "down_blocks", "up_blocks"):
            side, group = parts[0], parts[1]
            if group == "mid_block":  # resnets.0, attentions.0, resnets.1 -> middle.0, .1, .2
                n = int(parts[3])
                pos = 2 * n if parts[2] == "resnets" else 2 * n + 1
                head, rest = f"{side}.middle.{pos}", parts[4:]
            elif group == "down_blocks":
                head, rest = f"{side}.downsamples.{parts[2]}", parts[3:]
            elif parts[3] == "resnets":
                head, rest = f"{side}.upsamples.{offset[int(parts[2])] + int(parts[4])}", parts[5:]
            else:  # upsamplers.0
                i = int(parts[2])
                head, rest = f"{side}.upsamples.{offset[i] + n_resnets[i]}", parts[5:]
            if rest[0] in _RESNET_RENAMES:
                rest = [_RESNET_RENAMES[rest[0]], *rest[1:]]
            out[".".join([head, *rest])] = v
        else:
            out[outer_name(parts)] = v
    return out


def outer_name(parts: list[str]) -> str:
    """The official name of a diffusers VAE key outside the block groups (conv_in/out, norm_out,
    quant convs); any other key is kept as it is, for the completeness check to report.
    Both VAE generations name these alike."""
    if parts[0] in ("encoder", "decoder") and parts[1] in _TOP_RENAMES:
        return ".".join([parts[0], _TOP_RENAMES[parts[1]], *parts[2:]])
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return ".".join([_TOP_RENAMES[parts[0]], *parts[1:]])
    return ".".join(parts)


def to_official_vae(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout (prefix stripped, diffusers renamed) -> official Wan2.1 VAE names."""
    sd = _strip_prefix(sd)
    return diffusers_to_official(sd) if detect_vae_layout(sd) == "diffusers" else dict(sd)


def load_vae_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a Wan2.1 VAE file in any supported layout; keys come back in the official names."""
    sd = read_state_dict(path)
    try:
        return to_official_vae(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{os.fspath(path)}: {e}") from e


def check_vae_state_dict(sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str = "",
                         what: str = "Wan2.1 VAE") -> None:
    """CheckpointError unless `sd` has exactly the `expected` names with the expected shapes."""
    where = f"{source}: " if source else ""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:4])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:4])})")
    if wrong:
        shown = ", ".join(f"{k} {list(sd[k].shape)} vs {list(expected[k])}" for k in wrong[:3])
        problems.append(f"{len(wrong)} tensors of the wrong shape (e.g. {shown})")
    if problems:
        raise CheckpointError(f"{where}not the expected {what} ({len(expected)} tensors): " + "; ".join(problems))


def load_vae(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    config: WanVAEConfig | None = None,
) -> WanVAE:
    """Build on the meta device and assign the (memory-mapped) weights of `path`.

    Accepts every layout `load_vae_state_dict` knows (official `.pth`, ComfyUI safetensors with or
    without prefix, diffusers `AutoencoderKLWan`). The architecture is read off the tensor shapes
    unless `config` is given. Tensors already in `dtype` on the CPU stay memory-mapped.
    """
    sd = load_vae_state_dict(path)
    if config is None:
        try:
            config = WanVAEConfig.from_state_dict(sd)
        except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
            raise CheckpointError(f"{os.fspath(path)}: cannot read the VAE architecture off the tensors ({e!r})") from e
    with torch.device("meta"):
        model = WanVAE(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_vae_state_dict(sd, expected, source=os.fspath(path))
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)
