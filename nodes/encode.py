"""Encoder nodes: prompts -> umT5 features; a start image -> I2V conditioning (or TI2V-5B's image latent)."""

from __future__ import annotations

from wan_core.api import ModelSpec, encode_prompts, encode_start_image

from . import stats
from .types import (
    CATEGORY,
    DEFAULT_NEGATIVE_PROMPT,
    IMAGE,
    WAN_IMAGE_EMBEDS,
    WAN_MODEL,
    WAN_TEXT_EMBEDS,
    ImageEmbeds,
    TextEmbeds,
)

MAX_SIZE = 4096


class WanTextEncode:
    """Prompt and negative prompt -> umT5-XXL features (the text encoder is built once and cached)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (WAN_TEXT_EMBEDS,)
    RETURN_NAMES = ("text_embeds",)
    FUNCTION = "encode"
    DESCRIPTION = "Encodes the prompt and the negative prompt with umT5-XXL (text length 512, as the official code)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (WAN_MODEL,),
                "prompt": ("STRING", {"multiline": True, "default": ""}),
                "negative_prompt": ("STRING", {"multiline": True, "default": DEFAULT_NEGATIVE_PROMPT}),
            }
        }

    def encode(self, model: ModelSpec, prompt: str, negative_prompt: str):
        with stats.stage("text encode") as rec:
            positive, negative = encode_prompts(model, prompt, negative_prompt)
        return {"ui": stats.ui(rec), "result": (TextEmbeds(positive=positive, negative=negative, prompt=prompt),)}


class WanImageEncode:
    """Start image -> image conditioning for a size and frame count, as the official code makes it for
    the model: Wan2.1 I2V: CLIP tokens, mask and first-frame latent; Wan2.2 I2V-A14B: the same
    without CLIP; TI2V-5B: the image's latent (Wan2.2 VAE), held as the first latent frame.

    As the official code: the video keeps the image's aspect ratio at about width x height pixels,
    sides rounded down to multiples of 16 (TI2V-5B: resized to cover and centre-cropped to
    multiples of 32); the sampler takes its size from here.
    """

    CATEGORY = CATEGORY
    RETURN_TYPES = (WAN_IMAGE_EMBEDS,)
    RETURN_NAMES = ("image_embeds",)
    FUNCTION = "encode"
    DESCRIPTION = (
        "I2V / TI2V conditioning: 480P = 832x480, 720P = 1280x720, TI2V-5B 1280x704 "
        "(area; the aspect ratio comes from the image)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (WAN_MODEL,),
                "image": (IMAGE,),
                "width": ("INT", {"default": 832, "min": 16, "max": MAX_SIZE, "step": 16}),
                "height": ("INT", {"default": 480, "min": 16, "max": MAX_SIZE, "step": 16}),
                "num_frames": ("INT", {"default": 81, "min": 1, "max": 1025, "step": 4, "tooltip": "4n+1"}),
            }
        }

    def encode(self, model: ModelSpec, image, width: int, height: int, num_frames: int):
        if model.task not in ("i2v", "ti2v"):
            raise ValueError(
                "WanImageEncode needs an image-to-video model (Wan2.1-I2V-14B-480P/720P, a Wan2.2 I2V-A14B expert) "
                "or Wan2.2 TI2V-5B; the model loaded is text-to-video"
            )
        if image is None or getattr(image, "ndim", 0) != 4 or image.shape[0] < 1:
            raise ValueError("WanImageEncode: connect a start image (IMAGE [B, H, W, 3], e.g. from Load Image)")
        if (num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 4n+1 (e.g. 81), got {num_frames}")
        with stats.stage("image encode") as rec:
            cond = encode_start_image(model, image[:1], num_frames, width * height)
        return {"ui": stats.ui(rec), "result": (ImageEmbeds(cond=cond, num_frames=num_frames),)}
