"""Feature caching on the full-size Wan2.1-14B T2V DiT: cost per evaluation, cache overhead, and the
projected 50-step CFG wall time of each policy.

A real 50-step 480p run with CFG is 100 evaluations x ~2.7 s, about 4.5 min per policy: too long
for one device call with several policies. So the benchmark splits what it reports:

(a) MEASURED on the H100 with random bf16 weights (speed does not depend on values), 480p
    (32,760 tokens), cuDNN attention + compiled blocks (our CUDA default):
    - one uncached evaluation; one evaluation with the cache attached that computes (overhead
      of the residual and the indicator); one that skips (embeddings + residual add + head);
    - a short real `sample()` run (4 steps, CFG) uncached and cached with a fixed skip pattern,
      whose measured wall time checks the projection formula below.
(b) SKIP PATTERNS over the 50-step schedule (UniPC, shift 5, the official T2V setting):
    - "expected": each policy driven by a per-step change curve that follows the published ones.
      MagCache: its decisions depend on the step only, so the published T2V-14B magnitude-ratio
      table (MagCache4Wan2.1, calibrated at 720p) gives exactly the pattern real weights give.
      TeaCache: the rescaled per-step change is modelled as k * |1 - r_t| with r_t that same
      published curve; k is fitted per mode so that the *lower* threshold reproduces the
      evaluation fraction of TeaCache4Wan2.1's published T2V-14B timings (time ratio; an upper
      bound of the evaluation fraction since T5/VAE time does not shrink); the higher threshold
      is then a prediction, printed next to its published figure.
    - "random weights": the TeaCache rule fed with this random model's own time-embedding
      changes (the real indicator on the wrong weights: not representative of real weights).
(c) PROJECTED wall time of the 50-step CFG run = computed evaluations x measured cost of a
    computed evaluation + skipped evaluations x measured cost of a skipped one.
Quality cannot be judged on random weights: check it with real weights.

  python benchmarks/bench_cache.py [--res 480p] [--steps 50] [--no-compile]

Prints a table last; writes JSON to $OUT/bench_cache.json (or ./bench_cache.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dit import SHAPES, inputs, log, timeit  # noqa: E402

from wan_core.layers.cache import (  # noqa: E402
    MAGCACHE_RATIOS,
    CachePolicy,
    FeatureCache,
    MagCachePolicy,
    TeaCachePolicy,
    cache_from_config,
    feature_cache,
    guided_velocity_branches,
    rel_l1,
    resample_nearest,
    simulate,
)
from wan_core.layers.compile import compile_blocks  # noqa: E402
from wan_core.loading.dit import build_model  # noqa: E402
from wan_core.models.config import PRESETS  # noqa: E402
from wan_core.sampling.loop import Cond, make_noise, sample  # noqa: E402
from wan_core.sampling.schedulers import make_scheduler  # noqa: E402

# TeaCache4Wan2.1 README, "Wan2.1 t2v 14B" (720p, A800): seconds for (use_ret_steps, thresh).
TEA_PUBLISHED_S = {
    (False, 0.0): 1829,
    (False, 0.14): 1234,
    (False, 0.20): 909,
    (True, 0.0): 1829,
    (True, 0.10): 915,
    (True, 0.20): 578,
}
# MagCache4Wan2.1 README, T2V 14B 720p (A800): 60 min 04 s uncached, E024K6R02 21 min 40 s.
MAG_PUBLISHED_S = {0.0: 3604, 0.24: 1300}

POLICIES = [  # name, config (LightX2V keys), anchor of the Tea proxy fit
    ("NoCaching", {"feature_caching": "NoCaching"}),
    ("Tea ret 0.10", {"feature_caching": "Tea", "use_ret_steps": True, "teacache_thresh": 0.10}),
    ("Tea ret 0.20", {"feature_caching": "Tea", "use_ret_steps": True, "teacache_thresh": 0.20}),
    ("Tea 0.14", {"feature_caching": "Tea", "use_ret_steps": False, "teacache_thresh": 0.14}),
    ("Tea 0.20", {"feature_caching": "Tea", "use_ret_steps": False, "teacache_thresh": 0.20}),
    (
        "Mag E012K4R02",
        {"feature_caching": "Mag", "magcache_thresh": 0.12, "magcache_K": 4, "magcache_retention_ratio": 0.2},
    ),
    (
        "Mag E024K6R02",
        {"feature_caching": "Mag", "magcache_thresh": 0.24, "magcache_K": 6, "magcache_retention_ratio": 0.2},
    ),
]
TEA_ANCHOR = {True: 0.10, False: 0.14}  # the threshold whose published figure fits k


def _cpu_timeit(fn, warm=1, reps=3):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        s = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - s)
    return sorted(ts)[len(ts) // 2], ts


class _AlwaysSkip(CachePolicy):
    name = "always-skip"

    def decide(self, st, step, num_steps, branch, change, can_skip):
        return can_skip


class _SkipFrom(CachePolicy):
    """Computes steps < first, skips the rest (a fixed pattern for the short real run)."""

    name = "skip-from"

    def __init__(self, first):
        self.first = first

    def decide(self, st, step, num_steps, branch, change, can_skip):
        return can_skip and step >= self.first


def tea_proxy_k(curve, ret, thresh, target_evals, steps):
    """k such that TeaCache on k * curve computes `target_evals` of `steps` (closest; smallest k on ties)."""
    best = None
    for k in np.geomspace(0.05, 200, 800):
        pol = cache_from_config(
            {"feature_caching": "Tea", "use_ret_steps": ret, "teacache_thresh": thresh, "cache_model": "t2v-14b"}
        ).policy
        pol = TeaCachePolicy(
            thresh=thresh, coefficients=None, indicator=pol.indicator, start_step=pol.start_step, end_step=pol.end_step
        )
        n = sum(simulate(pol, steps, k * curve))
        if best is None or abs(n - target_evals) < best[1]:
            best = (float(k), abs(n - target_evals))
    return best[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", default="480p")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--shift", type=float, default=5.0)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--short-steps", type=int, default=4, help="steps of the short real sample() check (0: skip it)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script, measures nothing")
    args = ap.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    timer = _cpu_timeit if args.smoke else timeit
    sync = (lambda: None) if args.smoke else torch.cuda.synchronize
    peak = (lambda: 0.0) if args.smoke else (lambda: torch.cuda.max_memory_allocated() / 2**30)
    reset_peak = (lambda: None) if args.smoke else torch.cuda.reset_peak_memory_stats
    out_dir = os.environ.get("OUT", ".")
    R: dict = {
        "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "res": args.res,
        "steps": args.steps,
    }
    log("torch", torch.__version__, R["device"])
    t_start = time.time()

    # ---- the model -----------------------------------------------------------------------
    cfg = PRESETS["t2v-14b"]
    grid = SHAPES[args.res]
    if args.smoke:
        cfg = cfg.replace(dim=128, ffn_dim=256, num_heads=2, num_layers=2)
        grid = (3, 8, 8)
    model = build_model(cfg, None, dtype=torch.bfloat16, device=dev)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.set_attention("sdpa" if args.smoke else "sdpa_cudnn")
    if not args.no_compile and not args.smoke:
        model.set_block_ops("auto")  # the fused ops, as a CUDA build chooses
        compile_blocks(model)
    x, t, ctx = inputs(grid, dev=dev)
    log(f"model ready in {time.time() - t_start:.0f} s")

    # ---- (a) per-evaluation costs ----------------------------------------------------------
    def fwd():
        return model(x, t, ctx)

    with torch.inference_mode():
        t0 = time.time()
        fwd()
        sync()
        R["first_forward_s(compile)"] = time.time() - t0
        reset_peak()
        R["eval_uncached_s"], R["eval_uncached_all_s"] = timer(fwd, warm=1, reps=3)
        R["peak_uncached_GiB"] = peak()
        log(f"uncached evaluation {R['eval_uncached_s']:.3f} s")
        for label, pol in (
            ("eval_cached_compute_e0", TeaCachePolicy(thresh=0.0, indicator="e0", start_step=0)),
            ("eval_cached_compute_block0", TeaCachePolicy(thresh=0.0, indicator="block0", start_step=0)),
        ):
            reset_peak()
            with feature_cache(model, FeatureCache(pol), num_steps=10**9):
                R[f"{label}_s"], R[f"{label}_all_s"] = timer(fwd, warm=1, reps=3)
            R[f"peak_{label}_GiB"] = peak()
            log(f"{label} {R[f'{label}_s']:.3f} s, peak {R[f'peak_{label}_GiB']:.1f} GiB")
        with feature_cache(model, FeatureCache(_AlwaysSkip()), num_steps=10**9):
            R["eval_skipped_s"], R["eval_skipped_all_s"] = timer(fwd, warm=1, reps=5)  # warm-up computes, the rest skip
        log(f"skipped evaluation {R['eval_skipped_s']:.4f} s")

    t_comp, t_skip, t_plain = R["eval_cached_compute_e0_s"], R["eval_skipped_s"], R["eval_uncached_s"]

    # ---- (a') short real CFG run: measured vs projected -------------------------------------
    if args.short_steps:
        n = args.short_steps
        g = torch.Generator(device=dev).manual_seed(1)
        c = torch.randn(1, 60, 4096, device=dev, dtype=torch.bfloat16, generator=g)
        cn = torch.randn(1, 20, 4096, device=dev, dtype=torch.bfloat16, generator=g)
        noise = make_noise((1, 16, *grid), seed=0, device=dev)
        with torch.inference_mode():
            sync()
            s0 = time.time()
            ref = sample(model, noise, make_scheduler("unipc", n, args.shift), Cond(c), Cond(cn), 5.0)
            sync()
            R["short_uncached_s"] = time.time() - s0
            cache = FeatureCache(_SkipFrom(n // 2))
            with feature_cache(model, cache, num_steps=n):
                s0 = time.time()
                got = sample(
                    model,
                    noise,
                    make_scheduler("unipc", n, args.shift),
                    Cond(c),
                    Cond(cn),
                    5.0,
                    predict=guided_velocity_branches,
                )
                sync()
                R["short_cached_s"] = time.time() - s0
            rep = cache.report()
        n_run = sum(len(v) for v in rep.computed.values())
        R["short_report"] = rep.to_dict()
        R["short_cached_projected_s"] = n_run * t_comp + rep.skipped_total * t_skip
        R["short_uncached_projected_s"] = 2 * n * t_plain
        R["short_finite"] = bool(torch.isfinite(got).all())
        R["short_rel_l1_vs_uncached"] = rel_l1(got, ref)
        log(
            f"short {n}-step CFG run: uncached {R['short_uncached_s']:.1f} s (projected {R['short_uncached_projected_s']:.1f}), "
            f"cached {R['short_cached_s']:.1f} s (projected {R['short_cached_projected_s']:.1f}); {rep.summary()}"
        )

    # ---- (b) skip patterns over the schedule ----------------------------------------------------
    n = args.steps
    sched = make_scheduler("unipc", n, args.shift)
    with torch.inference_mode():
        emb = [model.embed_time(ts.to(dev).reshape(1)) for ts in sched.timesteps]
    rand_change = {
        ind: [0.0] + [rel_l1(emb[i][j], emb[i - 1][j]) for i in range(1, n)] for ind, j in (("e", 0), ("e0", 1))
    }
    R["random_weights_indicator_change"] = rand_change
    mag_c, mag_u = (np.array(v) for v in MAGCACHE_RATIOS["t2v-14b"])
    curve = {
        "cond": np.abs(1 - np.array(resample_nearest(mag_c, n))),
        "uncond": np.abs(1 - np.array(resample_nearest(mag_u, n))),
    }
    ks = {}
    for ret, th in TEA_ANCHOR.items():
        target = n * TEA_PUBLISHED_S[(ret, th)] / TEA_PUBLISHED_S[(ret, 0.0)]
        ks[ret] = tea_proxy_k(curve["cond"], ret, th, target, n)
    R["tea_proxy_k"] = {str(k): v for k, v in ks.items()}

    rows = []
    for name, conf in POLICIES:
        conf = {**conf, "cache_model": "t2v-14b", "infer_steps": n}
        cache = cache_from_config(conf)
        entry = {"config": conf}
        if cache is None:
            exp = {"cond": [True] * n, "uncond": [True] * n}
            rnd = exp
            published = 1.0
        elif isinstance(cache.policy, MagCachePolicy):
            exp = {b: simulate(cache.policy, n, branch=b) for b in ("cond", "uncond")}
            rnd = exp  # data-independent
            published = (
                MAG_PUBLISHED_S[conf["magcache_thresh"]] / MAG_PUBLISHED_S[0.0]
                if conf["magcache_thresh"] in MAG_PUBLISHED_S
                else None
            )
        else:
            pol = cache.policy
            ret = conf["use_ret_steps"]
            proxy = TeaCachePolicy(
                thresh=pol.thresh,
                coefficients=None,
                indicator=pol.indicator,
                start_step=pol.start_step,
                end_step=pol.end_step,
            )
            exp = {b: simulate(proxy, n, ks[ret] * curve[b], branch=b) for b in ("cond", "uncond")}
            rnd = {b: simulate(pol, n, rand_change[pol.indicator], branch=b) for b in ("cond", "uncond")}
            key = (ret, conf["teacache_thresh"])
            published = TEA_PUBLISHED_S[key] / TEA_PUBLISHED_S[(ret, 0.0)] if key in TEA_PUBLISHED_S else None
        n_exp = sum(map(sum, exp.values()))
        n_rnd = sum(map(sum, rnd.values()))
        proj = (lambda k: k * t_comp + (2 * n - k) * t_skip) if cache is not None else (lambda k: k * t_plain)
        entry.update(
            expected_pattern={b: "".join("C" if c else "." for c in v) for b, v in exp.items()},
            expected_evals=n_exp,
            random_weights_evals=n_rnd,
            published_eval_fraction=published,
            projected_s=proj(n_exp),
            projected_random_weights_s=proj(n_rnd),
        )
        R[name] = entry
        rows.append((name, n_exp, n_rnd, published, proj(n_exp), proj(n_rnd)))
    base = rows[0][4]

    with open(os.path.join(out_dir, "bench_cache.json"), "w") as f:
        json.dump(R, f, indent=1)
    log(f"\ntotal benchmark time {time.time() - t_start:.0f} s")
    log(
        f"\nMEASURED ({R['device']}, 14B T2V random bf16 weights, {args.res}, {'compiled' if not args.no_compile else 'eager'}):"
    )
    log(
        f"  evaluation uncached {t_plain:.3f} s | cache attached, computing: e0 indicator {t_comp:.3f} s, block0 indicator "
        f"{R['eval_cached_compute_block0_s']:.3f} s | skipped evaluation {t_skip:.4f} s"
    )
    res_gib = math.prod(grid) // 4 * cfg.dim * 4 / 2**30
    log(
        f"  peak GiB: uncached {R['peak_uncached_GiB']:.1f}, cache attached {R['peak_eval_cached_compute_e0_GiB']:.1f} "
        f"(one branch held here; a CFG run keeps one float32 residual of {res_gib:.2f} GiB per branch)"
    )
    if args.short_steps:
        log(
            f"  short {args.short_steps}-step CFG run: uncached {R['short_uncached_s']:.1f} s (projected {R['short_uncached_projected_s']:.1f}), "
            f"cached {R['short_cached_s']:.1f} s (projected {R['short_cached_projected_s']:.1f})"
        )
    log(
        f"\nPROJECTED {n}-step CFG run ({2 * n} evaluations); expected = policy on the published curve "
        "(Mag: exact for the published table; Tea: proxy fitted at the lower threshold), random = policy on this random model's indicator"
    )
    log(
        "published = evaluations implied by the published wall-time ratio (TeaCache4Wan2.1 / MagCache4Wan2.1 READMEs, T2V-14B 720p, A800)"
    )
    log(
        f"{'policy':16s} {'evals exp':>9s} {'evals rnd':>9s} {'published':>9s} {'wall exp s':>10s} {'speedup':>8s} {'wall rnd s':>10s}"
    )
    for name, ne, nr, pub, pe, pr in rows:
        pub_s = f"{pub * 2 * n:9.0f}" if pub is not None else f"{'-':>9s}"
        log(f"{name:16s} {ne:9d} {nr:9d} {pub_s} {pe:10.1f} {base / pe:7.2f}x {pr:10.1f}")


if __name__ == "__main__":
    main()
