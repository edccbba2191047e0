"""Output nodes: latent -> ComfyUI IMAGE frames, and frames -> an mp4 file."""

from __future__ import annotations

import torch

from wan_core.api import X264_PRESETS, ModelSpec, decode_video, latent_from_raw, write_video

from . import compat, stats
from .types import CATEGORY, IMAGE, LATENT, WAN_MODEL


class WanVAEDecode:
    """Latent -> video frames as ComfyUI IMAGE [T, H, W, 3] in [0, 1] (core CreateVideo/SaveVideo take them)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (IMAGE,)
    RETURN_NAMES = ("images",)
    FUNCTION = "decode"
    DESCRIPTION = (
        "VAE decode with the model's VAE (Wan2.1 VAE; TI2V-5B: the Wan2.2 VAE); tile_size > 0 bounds memory "
        "(Wan2.1 VAE only; same result, in latent pixels: 32 = 256 px)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (WAN_MODEL,),
                "samples": (LATENT,),
                "tile_size": ("INT", {"default": 0, "min": 0, "max": 512, "step": 8, "tooltip": "0: whole frames"}),
            }
        }

    def decode(self, model: ModelSpec, samples: dict, tile_size: int = 0):
        latent = samples.get("samples") if isinstance(samples, dict) else None
        if not isinstance(latent, torch.Tensor) or latent.ndim != 5:
            raise ValueError("WanVAEDecode: samples must be a video LATENT [B, 16 or 48, F, h, w] from a Wan sampler")
        with stats.stage("VAE decode", model.torch_device) as rec:
            z = latent_from_raw(latent[:1])  # LATENT holds raw VAE latents (ComfyUI's convention)
            frames = decode_video(model, z, tile_size or None)  # [T, H, W, 3] in [0, 1] on the CPU
        return {"ui": stats.ui(rec), "result": (frames,)}


class WanSaveVideo:
    """Frames -> mp4 (H.264, yuv420p) in ComfyUI's output folder, for setups without the core video nodes."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    DESCRIPTION = "Writes the frames as an mp4 (Wan2.1 and Wan2.2 A14B generate 16 fps, TI2V-5B 24 fps)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": (IMAGE,),
                "filename_prefix": ("STRING", {"default": "wan/video"}),
                "fps": ("FLOAT", {"default": 16.0, "min": 1.0, "max": 120.0, "step": 1.0}),
                "crf": (
                    "INT",
                    {"default": 19, "min": 0, "max": 51, "tooltip": "quality: lower is better, 17-23 look clean"},
                ),
            },
            "optional": {
                "preset": (
                    list(X264_PRESETS),
                    {"default": "medium", "tooltip": "x264 speed: faster presets encode sooner, files a little larger"},
                ),
            },
        }

    def save(self, images, filename_prefix: str = "wan/video", fps: float = 16.0, crf: int = 19, preset: str = "medium"):
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
            raise ValueError("WanSaveVideo: images must be IMAGE frames [T, H, W, 3]")
        with stats.stage("save") as rec:
            path, name, subfolder = compat.next_output_path(filename_prefix, "mp4")
            codec = write_video(path, images, fps=fps, layout="comfy", crf=crf, preset=preset)
        rec["codec"] = codec
        result = {"filename": name, "subfolder": subfolder, "type": "output", "format": "video/mp4"}
        return {"ui": {"images": [result], "animated": [True], "wan_timing": [rec]}, "result": ()}
