"""Feature caching for the 50-step base models: skip whole DiT block-stack evaluations.

When a cheap indicator says the model output will barely change from the previous step, the
block stack is skipped and the previous step's residual (output - input of the stack) of the
*same guidance branch* is added instead. Two policies, as in the reference framework:
TeaCache (`TeaCachePolicy`: accumulated, polynomial-rescaled relative L1 change of a
time-embedding indicator) and MagCache (`MagCachePolicy`: accumulated error of a calibrated
residual magnitude-ratio curve). Published calibration data for Wan2.1 lives in `tables`.

Typical use (what the pipeline does):

    cache = cache_from_config(cfg, published_model_key(model.cfg, height, width))
    with feature_cache(model, cache, num_steps=steps):
        latent = sample(model, noise, sched, cond, uncond, g, predict=guided_velocity_branches)
    log.info(cache.report().summary())
"""

from .calibrate import CalibrationResult, calibrate_teacache, main
from .config import CACHE_METHODS, cache_from_config, published_model_key
from .layer import (
    COND,
    UNCOND,
    CacheReport,
    FeatureCache,
    cache_branch,
    current_branch,
    feature_cache,
    guided_velocity_branches,
    rel_l1,
)
from .policies import INDICATORS, BranchState, CachePolicy, MagCachePolicy, TeaCachePolicy, resample_nearest, simulate
from .tables import MAGCACHE_DEFAULTS, MAGCACHE_RATIOS, MODEL_KEYS, TEACACHE_COEFFICIENTS

__all__ = [
    "CACHE_METHODS",
    "COND",
    "UNCOND",
    "INDICATORS",
    "MODEL_KEYS",
    "TEACACHE_COEFFICIENTS",
    "MAGCACHE_RATIOS",
    "MAGCACHE_DEFAULTS",
    "BranchState",
    "CachePolicy",
    "TeaCachePolicy",
    "MagCachePolicy",
    "resample_nearest",
    "simulate",
    "FeatureCache",
    "CacheReport",
    "cache_branch",
    "current_branch",
    "feature_cache",
    "guided_velocity_branches",
    "rel_l1",
    "cache_from_config",
    "published_model_key",
    "CalibrationResult",
    "calibrate_teacache",
    "main",
]
