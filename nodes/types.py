"""Custom ComfyUI types of this pack, and the small objects that travel under them.

ComfyUI only compares type names when linking sockets; the objects are plain Python. They are
picklable so that the multi-GPU sampler can send them to its worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wan_core.options import DEFAULT_NEGATIVE_PROMPT  # noqa: F401  (re-exported for the nodes)

# Socket type names (defined once; every node refers to these constants).
WAN_MODEL = "WAN_MODEL"  # wan_core.spec.ModelSpec: files + build options, built lazily and cached
WAN_TEXT_EMBEDS = "WAN_TEXT_EMBEDS"  # TextEmbeds
WAN_IMAGE_EMBEDS = "WAN_IMAGE_EMBEDS"  # ImageEmbeds (I2V conditioning)
WAN_OFFLOAD = "WAN_OFFLOAD"  # OffloadSettings
# ComfyUI's own types, for interop with core nodes
IMAGE = "IMAGE"  # float [T, H, W, 3] in [0, 1]
LATENT = "LATENT"  # {"samples": [B, 16, F, h, w]}

CATEGORY = "Wan Fast"

# The 4-step distill schedule of the lightx2v models (FORMATS.md, "Step-distilled models").
DISTILL_STEP_LIST = "1000,750,500,250"


@dataclass
class TextEmbeds:
    """umT5 features of the prompt and the negative prompt: [L, 4096] each (L = token count)."""

    positive: torch.Tensor
    negative: torch.Tensor
    prompt: str = ""


@dataclass
class ImageEmbeds:
    """I2V conditioning for one start image, made for a video size and frame count."""

    cond: object  # wan_core.conditioning.I2VCondition (y, clip_fea, height, width)
    num_frames: int

    @property
    def height(self) -> int:
        return self.cond.height

    @property
    def width(self) -> int:
        return self.cond.width


@dataclass(frozen=True)
class OffloadSettings:
    """What WanOffloadConfig chose; the loader copies it into the model description."""

    granularity: str = "none"  # "none" | "model" | "block"
    vram_budget_gb: float = 0.0  # 0: no budget (block offload keeps one block resident)

    @property
    def is_default(self) -> bool:
        return self.granularity == "none" and self.vram_budget_gb == 0.0
