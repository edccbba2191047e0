"""LightX2V-style configuration of feature caching -> a `FeatureCache` (or None).

Keys read (LightX2V's names first; the `teacache_*` / `magcache_*` extras are ours):

- `feature_caching`: "NoCaching" (default) | "Tea" | "Mag". LightX2V's other methods
  ("TaylorSeer", "Ada", "Custom", "FirstBlock", "DualBlock", "DynamicBlock") are refused by name.
- `infer_steps` (or `sample_steps`): the run length; `begin_run(num_steps)` may give it later.
- Tea: `teacache_thresh` (default 0.26, LightX2V's), `use_ret_steps` (default False, LightX2V's):
  True = indicator "e0", first 5 steps computed, no forced last step; False = indicator "e",
  first and last steps computed. `coefficients` = [[fit for ret steps], [fit without]] (LightX2V
  layout; a flat list is taken as the fit for the chosen mode); absent: the published fit for
  the model (see `model_key`). Extras: `teacache_indicator` ("e" | "e0" | "block0"),
  `teacache_start_step`, `teacache_end_step`, `teacache_max_skips`.
- Mag: `magcache_thresh`, `magcache_K`, `magcache_retention_ratio`, `magcache_ratios`
  ([[cond], [uncond]]; absent: the published table for the model); `magcache_calibration: true`
  turns skipping off and records the ratios (read them from `FeatureCache.trace`).
  Extras: `magcache_start_step`, `magcache_end_step`. Defaults: the authors' published setting
  for the model (E 0.24 / K 6 / R 0.2 for the 14B models), else LightX2V's (0.24 / 6 / 0.2).
- `cache_model` (ours): which published table to use: "t2v-14b", "t2v-1.3b", "i2v-14b-480p",
  "i2v-14b-720p"; otherwise the caller's `model_key` argument (see `published_model_key`).
"""

from __future__ import annotations

from collections.abc import Mapping

from .layer import FeatureCache
from .policies import INDICATORS, MagCachePolicy, TeaCachePolicy
from .tables import MAGCACHE_DEFAULTS, MAGCACHE_RATIOS, MODEL_KEYS, TEACACHE_COEFFICIENTS

__all__ = ["cache_from_config", "published_model_key", "CACHE_METHODS"]

CACHE_METHODS = ("NoCaching", "Tea", "Mag")
_UNSUPPORTED = ("TaylorSeer", "Ada", "Custom", "FirstBlock", "DualBlock", "DynamicBlock")


def published_model_key(model_cfg, height: int | None = None, width: int | None = None) -> str | None:
    """The published-table key for a DiT config (`WanConfig`) and a video size, or None.

    14B vs 1.3B comes from the width of the model (5120 vs 1536); the two I2V-14B checkpoints
    have identical shapes, so the 480P / 720P table is chosen by the video area (>= 1280x720 *
    0.75 -> 720p). Give `cache_model` in the config when that guess is wrong.
    """
    dim = getattr(model_cfg, "dim", None)
    if getattr(model_cfg, "model_type", "t2v") == "t2v":
        return {5120: "t2v-14b", 1536: "t2v-1.3b"}.get(dim)
    if dim != 5120:
        return None
    if height and width and height * width >= 0.75 * 1280 * 720:
        return "i2v-14b-720p"
    return "i2v-14b-480p"


def _opt_int(v) -> int | None:
    return None if v is None else int(v)


def _steps(cfg: Mapping) -> int | None:
    n = cfg.get("infer_steps", cfg.get("sample_steps"))
    return int(n) if n is not None else None


def _model(cfg: Mapping, model_key: str | None) -> str | None:
    key = cfg.get("cache_model", model_key)
    if key is not None and key not in MODEL_KEYS:
        raise ValueError(f"cache_model {key!r} has no published tables; choose one of {MODEL_KEYS}")
    return key


def _tea(cfg: Mapping, model_key: str | None) -> TeaCachePolicy:
    ret = bool(cfg.get("use_ret_steps", False))
    indicator = cfg.get("teacache_indicator", "e0" if ret else "e")
    if indicator not in INDICATORS:
        raise ValueError(f"teacache_indicator must be one of {INDICATORS}, got {indicator!r}")
    coeffs = cfg.get("coefficients")
    if coeffs is not None and len(coeffs) and isinstance(coeffs[0], (list, tuple)):
        coeffs = coeffs[0] if ret else coeffs[1]
    if coeffs is not None and not len(coeffs):
        coeffs = None
    if coeffs is None:
        key = _model(cfg, model_key)
        if indicator == "block0" or key is None:
            raise ValueError(
                "TeaCache needs 'coefficients' for this model"
                + (" (the block0 indicator has no published fit)" if indicator == "block0" else "")
                + f"; published fits exist for {MODEL_KEYS} (set 'cache_model'), or fit them with "
                "`python -m wan_core calibrate-cache`"
            )
        coeffs = TEACACHE_COEFFICIENTS[key][indicator]
    return TeaCachePolicy(
        thresh=float(cfg.get("teacache_thresh", 0.26)),
        coefficients=[float(c) for c in coeffs],
        indicator=indicator,
        start_step=int(cfg.get("teacache_start_step", 5 if ret else 1)),
        end_step=_opt_int(cfg.get("teacache_end_step", None if ret else -1)),
        max_skips=_opt_int(cfg.get("teacache_max_skips")),
    )


def _mag(cfg: Mapping, model_key: str | None) -> MagCachePolicy:
    key = _model(cfg, model_key)
    defaults = MAGCACHE_DEFAULTS.get(key, {"magcache_thresh": 0.24, "magcache_K": 6, "magcache_retention_ratio": 0.2})
    ratios = cfg.get("magcache_ratios")
    if not ratios:
        if key is None:
            raise ValueError(
                f"MagCache needs 'magcache_ratios' for this model; published tables exist for {MODEL_KEYS} (set 'cache_model')"
            )
        ratios = MAGCACHE_RATIOS[key]
    if len(ratios) != 2:
        raise ValueError("magcache_ratios must be [[cond ratios], [uncond ratios]]")
    thresh = (
        0.0
        if cfg.get("magcache_calibration", False)
        else float(cfg.get("magcache_thresh", defaults["magcache_thresh"]))
    )
    return MagCachePolicy(
        ratios=(list(map(float, ratios[0])), list(map(float, ratios[1]))),
        thresh=thresh,
        K=int(cfg.get("magcache_K", defaults["magcache_K"])),
        retention_ratio=float(cfg.get("magcache_retention_ratio", defaults["magcache_retention_ratio"])),
        start_step=_opt_int(cfg.get("magcache_start_step")),
        end_step=_opt_int(cfg.get("magcache_end_step")),
    )


def cache_from_config(cfg: Mapping, model_key: str | None = None) -> FeatureCache | None:
    """A detached `FeatureCache` for the config, or None for "NoCaching" (see the module doc for keys).

    model_key: the published-table key of the model being run (`published_model_key(...)`),
    used when the config gives no coefficients / ratios of its own.
    """
    method = cfg.get("feature_caching") or "NoCaching"
    if method == "NoCaching":
        return None
    if method in _UNSUPPORTED:
        raise ValueError(f"feature_caching {method!r} is not implemented here; supported: {CACHE_METHODS}")
    if method == "Tea":
        policy = _tea(cfg, model_key)
    elif method == "Mag":
        policy = _mag(cfg, model_key)
    else:
        raise ValueError(f"unknown feature_caching {method!r}; supported: {CACHE_METHODS}")
    trace = method == "Mag" and bool(cfg.get("magcache_calibration", False))
    return FeatureCache(policy, num_steps=_steps(cfg), trace=trace)
