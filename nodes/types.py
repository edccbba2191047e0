"""Custom ComfyUI types of this pack, and the small objects that travel under them.

ComfyUI only compares type names when linking sockets; the objects are plain Python. They are
picklable so that the multi-GPU sampler can send them to its worker processes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from wan_core.api import cache_config
from wan_core.options import DEFAULT_NEGATIVE_PROMPT  # noqa: F401  (re-exported for the nodes)
from wan_core.sampling.schedulers import DISTILL_STEPS

# Socket type names (defined once; every node refers to these constants).
WAN_MODEL = "WAN_MODEL"  # wan_core.spec.ModelSpec: files + build options, built lazily and cached
WAN_TEXT_EMBEDS = "WAN_TEXT_EMBEDS"  # TextEmbeds
WAN_IMAGE_EMBEDS = "WAN_IMAGE_EMBEDS"  # ImageEmbeds (I2V conditioning, or TI2V-5B's image latent)
WAN_OFFLOAD = "WAN_OFFLOAD"  # wan_core.layers.offload.OffloadOptions (what ModelSpec.offload holds)
WAN_CACHE = "WAN_CACHE"  # CacheSettings (feature caching for the sampler)
WAN_RADIAL = "WAN_RADIAL"  # wan_core.kernels.radial_attention.RadialOptions (what ModelSpec.radial holds)
# ComfyUI's own types, for interop with core nodes
IMAGE = "IMAGE"  # float [T, H, W, 3] in [0, 1]
LATENT = "LATENT"  # {"samples": [B, C, F, h, w]} raw VAE latents (C 16; TI2V-5B 48), as ComfyUI's nodes exchange them
CONDITIONING = "CONDITIONING"  # [[tensor [1, tokens, 4096], dict]]: core CLIPTextEncode of a CLIPLoader (type wan)

CATEGORY = "Wan Fast"

# The 4-step distill schedule of the lightx2v models (FORMATS.md, "Step-distilled models").
DISTILL_STEP_LIST = ",".join(map(str, DISTILL_STEPS))  # the widget's text: "1000,750,500,250"


@dataclass
class TextEmbeds:
    """umT5 features of the prompt and the negative prompt: [L, 4096] each (L = token count)."""

    positive: torch.Tensor
    negative: torch.Tensor
    prompt: str = ""


@dataclass
class ImageEmbeds:
    """Image conditioning for one start image, made for a video size and frame count.

    cond: `I2VCondition` (y, clip_fea, height, width; Wan2.2 I2V-A14B: clip_fea None) or, for
    TI2V-5B, `TI2VCondition` (the image's 48-channel latent z, height, width): the sampler tells
    which by its type and checks it against its model.
    """

    cond: object  # wan_core.api.I2VCondition | wan_core.api.TI2VCondition
    num_frames: int

    @property
    def height(self) -> int:
        return self.cond.height

    @property
    def width(self) -> int:
        return self.cond.width


@dataclass(frozen=True)
class CacheSettings:
    """What WanCacheConfig chose; the sampler turns it into a `wan_core.layers.cache.FeatureCache` per run.

    start_step -1 and end_step 0 mean "the method's default"; end_step < 0 counts from the end;
    max_skips (TeaCache) 0 means no cap; cache_model "auto" picks the published table from the DiT.
    """

    method: str = "Mag"  # "Tea" | "Mag"
    teacache_thresh: float = 0.2
    use_ret_steps: bool = True
    magcache_thresh: float = 0.24
    magcache_K: int = 6
    magcache_retention_ratio: float = 0.2
    start_step: int = -1
    end_step: int = 0
    max_skips: int = 0
    cache_model: str = "auto"

    def to_config(self) -> dict:
        """The LightX2V / wan_core.layers.cache config keys these settings stand for."""
        return cache_config(**asdict(self))
