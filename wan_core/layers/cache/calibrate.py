"""Fit TeaCache polynomials (and record MagCache ratios) for a model with no published ones.

One uncached sampling run per noise seed, with the caching layer in trace mode (never skips):
per branch and step it records the relative L1 change of each indicator ("e", "e0", "block0")
since the previous step, the relative L1 change of the model output (the velocity), and the
residual magnitude ratio. TeaCache's polynomial maps indicator change -> output change:
`numpy.polyfit(indicator change, output change, 4)` over the steps where the policy uses it
(with ret steps: from step 5; without: steps 1 .. N-2). The MagCache table is the mean over
seeds of the recorded ratios (1.0 at step 0), cond and uncond separately.

`main(argv)` is the command line (`python -m wan_core calibrate-cache ...`): it takes the prompt
embeddings from a safetensors file so it needs no text encoder.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .layer import COND, UNCOND, FeatureCache, cache_branch, rel_l1
from .policies import INDICATORS, TeaCachePolicy

__all__ = ["CalibrationResult", "calibrate_teacache", "main"]

log = logging.getLogger("wan_core.layers.cache")

# Steps whose changes feed each fit: (first step, steps dropped at the end) as the policy uses them.
_FIT_RANGE = {"e0": (5, 0), "e": (1, 1), "block0": (1, 0)}


@dataclass
class CalibrationResult:
    num_steps: int
    records: list[dict] = field(default_factory=list)  # branch, step, t, changes{ind}, output_change, mag_ratio
    coefficients: dict[str, list[float]] = field(default_factory=dict)  # indicator -> poly (highest first)
    fit_error: dict[str, float] = field(default_factory=dict)  # indicator -> mean |fit - target| / mean target
    mag_ratios: tuple[list[float], list[float]] = ((), ())

    def to_config(self) -> dict:
        """LightX2V config keys carrying the fitted data (merge into a run config)."""
        out: dict = {}
        if "e0" in self.coefficients and "e" in self.coefficients:
            out["coefficients"] = [self.coefficients["e0"], self.coefficients["e"]]
        if self.mag_ratios[0]:
            out["magcache_ratios"] = [list(self.mag_ratios[0]), list(self.mag_ratios[1])]
        return out

    def to_dict(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "coefficients": self.coefficients,
            "fit_error": self.fit_error,
            "config": self.to_config(),
            "records": self.records,
        }


def _record_predict(outputs: dict, records: list):
    """A predict function that evaluates each branch under its name and logs the output change."""

    def run(model, x, t, cond, uncond, guidance: float):
        def one(name, c):
            with cache_branch(name):
                v = model(x, t, c.context, clip_fea=c.clip_fea, y=c.y)
            prev = outputs.get(name)
            records.append({"branch": name, "output_change": rel_l1(v, prev) if prev is not None else None})
            outputs[name] = v.detach()
            return v

        v = one(COND, cond)
        if uncond is None or guidance == 1.0:
            return v
        v_u = one(UNCOND, uncond)
        return v_u + guidance * (v - v_u)

    return run


def _fit(xs: np.ndarray, ys: np.ndarray, degree: int) -> tuple[list[float], float]:
    deg = min(degree, max(len(xs) - 1, 0))
    with warnings.catch_warnings():
        # few points or a narrow x range make the fit ill-conditioned; fit_error reports the quality
        warnings.simplefilter("ignore", np.exceptions.RankWarning)
        coeffs = np.polyfit(xs, ys, deg)
    err = float(np.abs(np.polyval(coeffs, xs) - ys).mean() / max(np.abs(ys).mean(), 1e-12))
    return [float(c) for c in np.concatenate([np.zeros(degree - deg), coeffs])], err


def calibrate_teacache(
    model,
    noise: torch.Tensor | Sequence[torch.Tensor],
    scheduler,
    cond,
    uncond=None,
    guidance: float = 5.0,
    degree: int = 4,
    indicators: Sequence[str] = INDICATORS,
) -> CalibrationResult:
    """Run uncached sampling from each noise tensor and fit the TeaCache polynomials.

    Returns the per-step records, one degree-`degree` polynomial per indicator (keys of
    `coefficients`: "e0" goes to LightX2V's `coefficients[0]` (use_ret_steps), "e" to
    `coefficients[1]`), their mean relative fit error, and the mean MagCache ratio tables.
    cond / uncond: `sampling.Cond`.
    """
    from ...sampling.loop import sample  # here, not at the top: sampling may import wan_core.layers.cache

    noises = [noise] if isinstance(noise, torch.Tensor) else list(noise)
    n = len(scheduler)
    records: list[dict] = []
    for z in noises:
        cache = FeatureCache(TeaCachePolicy(thresh=0.0), num_steps=n, trace=True).attach(model)
        outputs: dict = {}
        out_recs: list[dict] = []
        try:
            cache.begin_run(n)
            with torch.no_grad():
                sample(model, z, scheduler, cond, uncond, guidance, predict=_record_predict(outputs, out_recs))
        finally:
            cache.detach()
        if len(cache.trace) != len(out_recs):
            raise RuntimeError("calibration: the model was not evaluated once per recorded call")
        for tr, o in zip(cache.trace, out_recs):
            records.append({**tr, "output_change": o["output_change"]})

    result = CalibrationResult(num_steps=n, records=records)
    for ind in indicators:
        first, drop_end = _FIT_RANGE[ind]
        pts = [
            (r["changes"][ind], r["output_change"])
            for r in records
            if first <= r["step"] < n - drop_end
            and r["changes"].get(ind) is not None
            and r["output_change"] is not None
        ]
        if len(pts) < 2:
            pts = [
                (r["changes"][ind], r["output_change"])
                for r in records
                if r["changes"].get(ind) is not None and r["output_change"] is not None
            ]
        if len(pts) < 2:
            continue
        xs, ys = np.array(pts, dtype=np.float64).T
        result.coefficients[ind], result.fit_error[ind] = _fit(xs, ys, degree)
    tables = []
    for name in (COND, UNCOND):
        table = []
        for s in range(n):
            vals = [
                r["mag_ratio"]
                for r in records
                if r["branch"] == name and r["step"] == s and r.get("mag_ratio") is not None
            ]
            table.append(round(float(np.mean(vals)), 5) if vals else 1.0)
        tables.append(table)
    has_uncond = any(r["branch"] == UNCOND for r in records)
    result.mag_ratios = (tables[0], tables[1] if has_uncond else list(tables[0]))
    return result


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m wan_core calibrate-cache",
        description="Fit TeaCache coefficients and MagCache ratios for a Wan2.1 DiT by running uncached sampling.",
    )
    ap.add_argument("--dit", required=True, help="DiT checkpoint (file or folder, any layout load_dit reads)")
    ap.add_argument(
        "--embeds",
        required=True,
        help="safetensors file with 'context' [Lt, 4096] and 'context_null' [Ln, 4096] T5 features; I2V also 'clip_fea' [1, 257, 1280] and 'y' [1, 20, F, H, W]",
    )
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--shift", type=float, default=5.0)
    ap.add_argument("--solver", default="unipc")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--size", default="832x480", help="WIDTHxHEIGHT of the video (T2V; I2V takes it from y)")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--seeds", default="0", help="comma-separated noise seeds; the fit pools all runs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--compile", default="auto", choices=["auto", "true", "false"])
    ap.add_argument("--out", default="cache_calibration.json", help="JSON written here (config keys under 'config')")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from ...loading.dit import load_dit
    from ...loading.io import read_state_dict
    from ...sampling.loop import Cond, latent_shape, make_noise
    from ...sampling.schedulers import make_scheduler
    from ..compile import CompileLayer, should_compile
    from ..stack import apply_layers

    args = _parser().parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    compile_opt = {"auto": "auto", "true": True, "false": False}[args.compile]
    model = load_dit(args.dit, dtype=dtype, device=args.device, attention=args.attention)
    if should_compile(compile_opt, args.device):
        apply_layers(model, [CompileLayer()])
    emb = read_state_dict(args.embeds)
    for k in ("context", "context_null"):
        if k not in emb:
            raise SystemExit(f"{args.embeds}: no '{k}' tensor (keys: {sorted(emb)})")
    dev = args.device
    ctx, ctx_null = emb["context"].to(dev, dtype), emb["context_null"].to(dev, dtype)
    clip_fea = emb["clip_fea"].to(dev, dtype) if "clip_fea" in emb else None
    y = emb["y"].to(dev, torch.float32) if "y" in emb else None
    if model.cfg.is_i2v:
        if clip_fea is None or y is None:
            raise SystemExit(f"{args.embeds}: an I2V model needs 'clip_fea' and 'y'")
        shape = (16, *y.shape[2:])
    else:
        w, h = (int(v) for v in args.size.lower().split("x"))
        shape = latent_shape(args.frames, h, w)
    cond, uncond = Cond(ctx, clip_fea, y), Cond(ctx_null, clip_fea, y)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    noises = [make_noise((1, *shape), s, device=dev) for s in seeds]
    sched = make_scheduler(args.solver, args.steps, args.shift)
    res = calibrate_teacache(model, noises, sched, cond, uncond, args.guidance)
    with open(args.out, "w") as f:
        json.dump(res.to_dict(), f, indent=1)
    for ind, c in res.coefficients.items():
        print(f"{ind:7s} coefficients {c}  (mean relative fit error {res.fit_error[ind]:.3f})")
    print(f"wrote {args.out}; merge its 'config' entry into a run config (feature_caching Tea/Mag)")
    return 0
