"""Wan2.1 image-to-video's CLIP image encoder: the ViT-H/14 vision tower of open-clip xlm-roberta-large.

What the official code computes (wan/modules/clip.py, `CLIPModel.visual` with `use_31_block=True`):
images in [-1, 1] are resized to the model's square input size (bicubic, align_corners=False),
mapped to [0, 1] and normalised with the OpenAI CLIP mean/std; the tower adds the class token and
position embeddings, applies its pre-norm, and runs all blocks but the last. That output — every
token (class + 16 x 16 patches = 257 at 224 px), width 1280, with no final norm and no projection —
is what the DiT's `img_emb` consumes.

The tower is transformers' `CLIPVisionModel`, which has the same architecture (pre-norm blocks,
exact-erf GELU, LayerNorm eps 1e-5, class token first, conv patch embedding without bias), built
with one block fewer than the checkpoint holds and with its final norm removed: the block and
norm Wan never reads are neither loaded nor run. Files are read by
`wan_core.loading.clip.load_image_encoder`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError

__all__ = ["ImageEncoderConfig", "WanImageEncoder", "preprocess_images", "CLIP_MEAN", "CLIP_STD"]

# OpenAI CLIP normalisation, used by the official transforms for this (non-SigLIP) model.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Head width of open-clip ViT-H/14 (1280 / 16). Shapes do not say how many heads a layer has, so
# the head count is dim / 80 unless the caller names it.
_HEAD_DIM = 80


@dataclass(frozen=True)
class ImageEncoderConfig:
    """Architecture of the vision tower; `from_state_dict` reads it off tensor shapes."""

    dim: int = 1280
    ffn_dim: int = 5120
    num_heads: int = 16
    num_layers: int = 32  # blocks in the checkpoint
    num_layers_used: int = 31  # blocks Wan runs (official `use_31_block=True`: all but the last)
    image_size: int = 224
    patch_size: int = 14
    eps: float = 1e-5

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], num_heads: int | None = None) -> ImageEncoderConfig:
        """Dimensions from canonical-named tensors (output of `loading.clip.convert_clip_vision`)."""
        try:
            dim, _, patch, _ = sd["embeddings.patch_embedding.weight"].shape
            tokens = sd["embeddings.position_embedding.weight"].shape[0]
            ffn_dim = sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
        except KeyError as e:
            raise CheckpointError(f"CLIP vision checkpoint lacks {e.args[0]!r}") from e
        layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
        grid = round((tokens - 1) ** 0.5)
        if grid * grid != tokens - 1:
            raise CheckpointError(f"CLIP position embedding has {tokens} rows: not 1 + a square grid of patches")
        if layers < 2:
            raise CheckpointError("CLIP vision checkpoint has fewer than 2 blocks; Wan reads the penultimate one")
        if num_heads is None:
            if dim % _HEAD_DIM:
                raise CheckpointError(f"cannot infer the head count of a {dim}-wide CLIP tower; pass num_heads")
            num_heads = dim // _HEAD_DIM
        return cls(
            dim=dim,
            ffn_dim=ffn_dim,
            num_heads=num_heads,
            num_layers=layers,
            num_layers_used=layers - 1,
            image_size=grid * patch,
            patch_size=patch,
        )


def preprocess_images(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, 3, S, S] fp32 pixels normalised as the tower expects.

    Follows the official recipe: bicubic resize of the [-1, 1] image (no antialias, no clamp of
    the cubic overshoot), then x * 0.5 + 0.5, then (x - mean) / std. Done in fp32 whatever the
    model dtype, as the official code does before entering autocast.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
    x = F.interpolate(images.float(), size=(image_size, image_size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class WanImageEncoder(nn.Module):
    """CLIP ViT-H/14 features for Wan I2V: `encode(images) -> [B, 257, 1280]`."""

    def __init__(self, config: ImageEncoderConfig = ImageEncoderConfig()):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.config = config
        hf_config = CLIPVisionConfig(
            hidden_size=config.dim,
            intermediate_size=config.ffn_dim,
            num_attention_heads=config.num_heads,
            num_hidden_layers=config.num_layers_used,
            image_size=config.image_size,
            patch_size=config.patch_size,
            layer_norm_eps=config.eps,
            hidden_act="gelu",  # official activation='gelu': nn.GELU, the exact erf form
            attention_dropout=0.0,
        )
        hf_config._attn_implementation = "sdpa"
        model = CLIPVisionModel(hf_config)
        # transformers 5 puts the tower directly on CLIPVisionModel, transformers 4 under `.vision_model`
        self.tower = getattr(model, "vision_model", model)
        # Wan reads the blocks' output, never the pooled + normed class token
        self.tower.post_layernorm = nn.Identity()
        self.eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tower.embeddings.patch_embedding.weight.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess_images(images.to(self.device), self.config.image_size)

    @torch.no_grad()
    def forward_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, S, S] -> penultimate-block tokens [B, 1 + (S/patch)^2, dim]."""
        out = self.tower(pixel_values=pixel_values.to(self.dtype))
        return out.last_hidden_state

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> CLIP features [B, 257, 1280] (model dtype)."""
        return self.forward_pixels(self.preprocess(images))
