"""Key maps for Wan's CLIP image encoder (the ViT-H/14 vision tower of open-clip xlm-roberta-large).

Users bring the vision tower in two layouts:

- Wan's `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`: the whole CLIP model in the
  official module names (`visual.*` for the image tower, `textual.*` and `log_scale` for the text
  side, which image-to-video never runs). Attention uses one fused `to_qkv` linear.
- ComfyUI's `clip_vision_h.safetensors`: transformers `CLIPVisionModelWithProjection` names
  (`vision_model.*`, `visual_projection.weight`), possibly behind a further prefix.

Both become the names of transformers' vision transformer *without* any outer prefix
(`embeddings.*`, `pre_layrnorm.*`, `encoder.layers.N.*`, `post_layernorm.*`): the module that owns
`embeddings` is `CLIPVisionModel` itself in transformers 5 and `CLIPVisionModel.vision_model` in
transformers 4, so the encoder loads these names into whichever of the two it holds.

Every tensor of the vision tower gets a name (the encoder decides what it runs); only the
projection heads are left out. The maps work on any tensors, including `meta` tensors built from a key/shape list, and only
slice or view (never copy), so memory-mapped weights stay memory-mapped. `load_image_encoder` reads a
file of either layout into a `wan_core.models.image_encoder.WanImageEncoder`.
"""

from __future__ import annotations

import os
import re

import torch

from ..models.image_encoder import ImageEncoderConfig, WanImageEncoder
from .io import CheckpointError, read_state_dict

__all__ = [
    "detect_layout",
    "wan_visual_to_transformers",
    "transformers_to_canonical",
    "convert_clip_vision",
    "load_image_encoder",
]

# official block sub-module -> transformers encoder-layer sub-module (the fused qkv is handled apart)
_WAN_BLOCK_RENAMES = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.proj": "self_attn.out_proj",
    "mlp.0": "mlp.fc1",
    "mlp.2": "mlp.fc2",
}
_WAN_BLOCK = re.compile(r"transformer\.(\d+)\.(.+)\.(weight|bias)$")

# The only `visual.*` tensor with no counterpart in CLIPVisionModel: the projection into the joint
# image-text space ([dim, embed], the transpose of transformers' `visual_projection.weight`,
# which sits outside the vision model too). Wan never projects its image features.
WAN_UNUSED = ("visual.head",)


def detect_layout(keys) -> tuple[str, str]:
    """("wan", prefix) or ("transformers", prefix) for a CLIP vision state dict's key set.

    Wan: the prefix is what stands before `visual.` (empty in the published file). transformers:
    the prefix is everything before `embeddings.`, `vision_model.` included (`vision_model.` in
    ComfyUI's file; something like `clip_vision.vision_model.` when a tool nests it; empty for a
    bare transformers-5 `CLIPVisionModel` state dict).
    """
    for key in keys:
        m = re.match(r"^(.*?)visual\.patch_embedding\.weight$", key)
        if m:
            return "wan", m.group(1)
        m = re.match(r"^(.*?vision_model\.)embeddings\.patch_embedding\.weight$", key)
        if m:
            return "transformers", m.group(1)
    # a bare transformers vision tower (no `vision_model.`), as CLIPVisionModel saves it in transformers 5
    for key in keys:
        m = re.match(r"^(.*?)embeddings\.patch_embedding\.weight$", key)
        if m:
            return "transformers", m.group(1)
    raise CheckpointError(
        "not a CLIP vision checkpoint: found neither `visual.patch_embedding.weight` (Wan's "
        "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth) nor "
        "`vision_model.embeddings.patch_embedding.weight` (ComfyUI's clip_vision_h.safetensors)"
    )


def wan_visual_to_transformers(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Official `visual.*` tensors -> canonical transformers names (see module docstring).

    A complete rename of the tower: what the image encoder then leaves unused (last block, final
    norm) is its own choice. Keys outside `{prefix}visual.` (text tower, `log_scale`) and
    `WAN_UNUSED` are left out. Raises `CheckpointError` on a `visual.*` key it does not know.
    """
    head = prefix + "visual."
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if not key.startswith(head):
            continue
        name = key[len(head) :]
        if "visual." + name in WAN_UNUSED:
            continue
        if name == "cls_embedding":  # [1, 1, dim] -> [dim]
            out["embeddings.class_embedding"] = t.reshape(t.shape[-1])
        elif name == "pos_embedding":  # [1, tokens, dim] -> [tokens, dim] (an nn.Embedding table)
            out["embeddings.position_embedding.weight"] = t.reshape(t.shape[-2], t.shape[-1])
        elif name == "patch_embedding.weight":  # conv [dim, 3, patch, patch], no bias (pre-norm ViT)
            out["embeddings.patch_embedding.weight"] = t
        elif name.startswith("pre_norm."):
            out["pre_layrnorm." + name[len("pre_norm.") :]] = t
        elif name.startswith("post_norm."):
            out["post_layernorm." + name[len("post_norm.") :]] = t
        else:
            m = _WAN_BLOCK.match(name)
            if m is None:
                raise CheckpointError(f"unknown key in the Wan CLIP visual tower: {key}")
            i, sub, kind = m.groups()
            layer = f"encoder.layers.{i}."
            if sub == "attn.to_qkv":
                # fused rows [q; k; v], each `dim` rows: the official forward views the output as
                # [B, L, 3, heads, head_dim], so the 3 is the outer split of the output features.
                q, k, v = t.chunk(3, dim=0)
                for part, piece in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                    out[f"{layer}self_attn.{part}.{kind}"] = piece
            elif sub in _WAN_BLOCK_RENAMES:
                out[f"{layer}{_WAN_BLOCK_RENAMES[sub]}.{kind}"] = t
            else:
                raise CheckpointError(f"unknown key in the Wan CLIP visual tower: {key}")
    return out


def transformers_to_canonical(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """transformers-named tensors -> canonical names: keep the keys under `prefix`, strip it.

    `prefix` comes from `detect_layout` and ends with `vision_model.` when the file has one, so
    `visual_projection.weight` (the CLIP embedding head) and any text tower fall outside it; for a
    bare tower the head is dropped by name. `position_ids` (an index buffer some older files carry)
    is dropped too: the model rebuilds it.
    """
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name.startswith("visual_projection.") or name.endswith("position_ids"):
            continue
        out[name] = t
    return out


def convert_clip_vision(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported CLIP vision layout -> canonical transformers names (views, no copies)."""
    layout, prefix = detect_layout(sd.keys())
    if layout == "wan":
        return wan_visual_to_transformers(sd, prefix)
    return transformers_to_canonical(sd, prefix)


def load_image_encoder(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    num_heads: int | None = None,
) -> WanImageEncoder:
    """Build on `meta`, then adopt the file's (memory-mapped) tensors: no second RAM copy.

    Accepts Wan's `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` and ComfyUI's
    `clip_vision_h.safetensors` (any key prefix); dimensions, image size included, come from
    the tensor shapes.
    """
    sd = convert_clip_vision(read_state_dict(path))
    config = ImageEncoderConfig.from_state_dict(sd, num_heads=num_heads)
    with torch.device("meta"):
        encoder = WanImageEncoder(config)
    wanted = encoder.tower.state_dict()
    # on file but never run (the encoder's docstring): the last block and the final norm
    skipped = tuple(f"encoder.layers.{i}." for i in range(config.num_layers_used, config.num_layers))
    skipped += ("post_layernorm.",)
    sd = {k: v for k, v in sd.items() if not k.startswith(skipped)}
    missing = sorted(set(wanted) - sd.keys())
    unexpected = sorted(sd.keys() - set(wanted))
    if missing or unexpected:
        raise CheckpointError(
            f"{os.fspath(path)}: CLIP vision tensors do not fit a ViT with {config}: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    for k, v in sd.items():
        expect = wanted[k].shape
        if v.shape != expect:
            raise CheckpointError(f"{os.fspath(path)}: {k} has shape {tuple(v.shape)}, expected {tuple(expect)}")
    encoder.tower.load_state_dict(sd, assign=True, strict=True)
    # the index buffer is not in any file: rebuild it where the model will live
    embeddings = encoder.tower.embeddings
    embeddings.position_ids = torch.arange(config.num_tokens, device=device).unsqueeze(0)
    return encoder.to(device=device, dtype=dtype)
