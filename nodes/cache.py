"""WanCacheConfig: feature caching settings for WanSampler (skip DiT evaluations that barely change).

For the 50-step base models: TeaCache ("Tea") or MagCache ("Mag") reuse the previous step's block
residual when the change is predicted to be small (`wan_core.layers.cache`). The sampler reports how
many DiT evaluations were skipped in its stage record.
"""

from __future__ import annotations

from wan_core.api import CACHE_MODELS as MODEL_KEYS

from .types import CATEGORY, WAN_CACHE, CacheSettings

METHODS = ["Mag", "Tea"]


class WanCacheConfig:
    """TeaCache / MagCache settings; plug into WanSampler's `cache` input."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (WAN_CACHE,)
    RETURN_NAMES = ("cache",)
    FUNCTION = "make"
    DESCRIPTION = (
        "Feature caching for base (50/40-step) models: skip DiT evaluations whose output barely changes. "
        "Mag: published magnitude-ratio tables; Tea: published polynomial fits. Threshold 0 = no skipping."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "method": (METHODS, {"default": "Mag"}),
                "teacache_thresh": (
                    "FLOAT",
                    {"default": 0.2, "min": 0.0, "max": 5.0, "step": 0.01, "tooltip": "Tea: higher skips more"},
                ),
                "use_ret_steps": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Tea: time-projection indicator, first 5 steps always computed"},
                ),
                "magcache_thresh": (
                    "FLOAT",
                    {"default": 0.24, "min": 0.0, "max": 5.0, "step": 0.01, "tooltip": "Mag: higher skips more"},
                ),
                "magcache_K": (
                    "INT",
                    {"default": 6, "min": 1, "max": 100, "tooltip": "Mag: most consecutive skipped steps"},
                ),
                "magcache_retention_ratio": (
                    "FLOAT",
                    {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Mag: share of first steps always computed"},
                ),
                "start_step": (
                    "INT",
                    {"default": -1, "min": -1, "max": 1000, "tooltip": "steps before it always computed; -1: the method's default"},
                ),
                "end_step": (
                    "INT",
                    {
                        "default": 0,
                        "min": -1000,
                        "max": 1000,
                        "tooltip": "steps from it on always computed; negative counts from the end (-1: last step); 0: the method's default",
                    },
                ),
                "max_skips": (
                    "INT",
                    {"default": 0, "min": 0, "max": 1000, "tooltip": "Tea: most consecutive skips (0: no cap)"},
                ),
                "cache_model": (
                    ["auto", *MODEL_KEYS],
                    {"default": "auto", "tooltip": "published table to use; auto: from the DiT size (and video area for I2V)"},
                ),
            }
        }

    def make(
        self,
        method: str,
        teacache_thresh: float,
        use_ret_steps: bool,
        magcache_thresh: float,
        magcache_K: int,
        magcache_retention_ratio: float,
        start_step: int = -1,
        end_step: int = 0,
        max_skips: int = 0,
        cache_model: str = "auto",
    ):
        if method not in METHODS:
            raise ValueError(f"cache method must be one of {METHODS}, got {method!r}")
        if cache_model != "auto" and cache_model not in MODEL_KEYS:
            raise ValueError(f"cache_model must be 'auto' or one of {MODEL_KEYS}, got {cache_model!r}")
        settings = CacheSettings(
            method=method, teacache_thresh=float(teacache_thresh), use_ret_steps=bool(use_ret_steps),
            magcache_thresh=float(magcache_thresh), magcache_K=int(magcache_K),
            magcache_retention_ratio=float(magcache_retention_ratio), start_step=int(start_step),
            end_step=int(end_step), max_skips=int(max_skips), cache_model=cache_model,
        )  # fmt: skip
        return (settings,)
