"""The ComfyUI nodes of this pack (classic node API: plain classes, usable without ComfyUI)."""

from .cache import WanCacheConfig
from .decode import WanSaveVideo, WanVAEDecode
from .encode import WanImageEncode, WanTextEncode
from .loaders import WanFP8Loader, WanLoraApply, WanModelLoader, WanOffloadConfig, WanRadialAttention
from .sample import WanMultiGPUSampler, WanSampler
from .sample_moe import WanMultiGPUSamplerMoE, WanSamplerMoE

NODE_CLASS_MAPPINGS = {
    "WanModelLoader": WanModelLoader,
    "WanFP8Loader": WanFP8Loader,
    "WanLoraApply": WanLoraApply,
    "WanOffloadConfig": WanOffloadConfig,
    "WanRadialAttention": WanRadialAttention,
    "WanTextEncode": WanTextEncode,
    "WanImageEncode": WanImageEncode,
    "WanSampler": WanSampler,
    "WanSamplerMoE": WanSamplerMoE,
    "WanCacheConfig": WanCacheConfig,
    "WanMultiGPUSampler": WanMultiGPUSampler,
    "WanMultiGPUSamplerMoE": WanMultiGPUSamplerMoE,
    "WanVAEDecode": WanVAEDecode,
    "WanSaveVideo": WanSaveVideo,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "WanModelLoader": "Wan Model Loader",
    "WanFP8Loader": "Wan FP8 Model Loader",
    "WanLoraApply": "Wan LoRA",
    "WanOffloadConfig": "Wan CPU Offload",
    "WanRadialAttention": "Wan Radial Attention",
    "WanTextEncode": "Wan Text Encode",
    "WanImageEncode": "Wan Image Encode (I2V / TI2V)",
    "WanSampler": "Wan Sampler",
    "WanSamplerMoE": "Wan2.2 Sampler (two experts)",
    "WanCacheConfig": "Wan Feature Cache (Tea/Mag)",
    "WanMultiGPUSampler": "Wan Multi-GPU Sampler",
    "WanMultiGPUSamplerMoE": "Wan2.2 Multi-GPU Sampler (two experts)",
    "WanVAEDecode": "Wan VAE Decode",
    "WanSaveVideo": "Wan Save Video (mp4)",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
