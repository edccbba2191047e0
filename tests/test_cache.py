"""Feature caching (wan_core.layers.cache): exactness when nothing is skipped, the skip arithmetic, branch
separation, the decision rules against transcriptions of the reference algorithms, config keys,
calibration and its command line. Tiny random DiT, fp32, CPU."""

import json
import random

import numpy as np
import pytest
import torch

from wan_core.layers.cache import (
    COND,
    MAGCACHE_RATIOS,
    TEACACHE_COEFFICIENTS,
    UNCOND,
    BranchState,
    FeatureCache,
    MagCachePolicy,
    TeaCachePolicy,
    cache_branch,
    cache_from_config,
    calibrate_teacache,
    feature_cache,
    guided_velocity_branches,
    published_model_key,
    rel_l1,
    simulate,
)
from wan_core.layers.cache import main as calibrate_main
from wan_core.layers.stack import layer_state
from wan_core.loading.dit import build_model, save_dit
from wan_core.models.config import PRESETS
from wan_core.sampling.loop import Cond, guided_velocity, make_noise, sample
from wan_core.sampling.schedulers import make_scheduler

from .test_dit import random_state_dict, tiny_cfg

STEPS = 6
GUIDANCE = 4.0


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_cfg()
    model = build_model(cfg, random_state_dict(cfg, seed=3), dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    ctx = torch.randn(1, 7, cfg.text_dim, generator=g)
    # a very different negative prompt: cond and uncond residuals differ strongly
    ctx_null = 30.0 * torch.randn(1, 3, cfg.text_dim, generator=g)
    noise = make_noise((1, 16, 2, 4, 4), seed=1)
    return model, Cond(ctx), Cond(ctx_null), noise


def _run(model, cond, uncond, noise, predict=guided_velocity, steps=STEPS):
    with torch.no_grad():
        return sample(model, noise, make_scheduler("unipc", steps, 5.0), cond, uncond, GUIDANCE, predict=predict)


def _always_skip_mag(steps=STEPS, K=100, start=1, end=None):
    """A data-independent policy that skips every step it may (all ratios 1: zero error)."""
    return MagCachePolicy(ratios=([1.0] * steps, [1.0] * steps), thresh=1.0, K=K, start_step=start, end_step=end)


# ---- exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["tea", "tea_block0", "mag"])
@pytest.mark.parametrize("predict", [guided_velocity_branches, guided_velocity])
def test_threshold_zero_is_bitwise_uncached(setup, policy, predict):
    model, cond, uncond, noise = setup
    ref = _run(model, cond, uncond, noise)
    pol = {
        # the published T2V-14B polynomial is negative for small changes: thresh 0 must still never skip
        "tea": TeaCachePolicy(
            thresh=0.0, coefficients=TEACACHE_COEFFICIENTS["t2v-14b"]["e0"], indicator="e0", start_step=0
        ),
        "tea_block0": TeaCachePolicy(thresh=0.0, indicator="block0", start_step=0),
        "mag": MagCachePolicy(ratios=MAGCACHE_RATIOS["t2v-14b"], thresh=0.0, K=6, retention_ratio=0.0),
    }[policy]
    cache = FeatureCache(pol)
    with feature_cache(model, cache, num_steps=STEPS):
        got = _run(model, cond, uncond, noise, predict=predict)
    assert torch.equal(got, ref)
    rep = cache.report()
    assert rep.skipped_total == 0 and rep.evaluations == 2 * STEPS
    assert rep.computed == {COND: list(range(STEPS)), UNCOND: list(range(STEPS))}
    # detached: the model's own methods are back
    assert "forward_blocks" not in model.__dict__ and "embed_time" not in model.__dict__
    assert layer_state(model).cache is None


def test_skip_adds_the_cached_residual_of_the_same_branch(setup):
    """A skipped evaluation = head(embed(x_now) + residual of this branch's last computed step)."""
    model, cond, uncond, noise = setup
    x0, x1 = noise, noise * 0.7 + 0.1
    t0, t1 = torch.tensor([900.0]), torch.tensor([800.0])

    def by_hand(x, t, c, residual=None):
        tokens, grid = model.embed_video(x, None)
        e, e0 = model.embed_time(t)
        ctx, _ = model.embed_context(c.context, None)
        out = (
            tokens + residual
            if residual is not None
            else model.forward_blocks(tokens, e0, ctx, None, model.rope(grid, "cpu"))
        )
        return model.unpatchify(model.head(out, e), grid), out - tokens

    with torch.no_grad():
        _, res_c = by_hand(x0, t0, cond)
        _, res_u = by_hand(x0, t0, uncond)
        exp_c, _ = by_hand(x1, t1, cond, res_c)
        exp_u, _ = by_hand(x1, t1, uncond, res_u)
        mixed_u, _ = by_hand(x1, t1, uncond, res_c)
        assert rel_l1(res_c, res_u) > 0.1  # the branches really differ (measured 0.27)
        with feature_cache(model, FeatureCache(_always_skip_mag(3)), num_steps=3) as cache:
            for x, t in ((x0, t0), (x1, t1)):
                with cache_branch(COND):
                    got_c = model(x, t, cond.context)
                with cache_branch(UNCOND):
                    got_u = model(x, t, uncond.context)
            rep = cache.report()
    assert rep.skipped == {COND: [1], UNCOND: [1]}
    assert torch.equal(got_c, exp_c) and torch.equal(got_u, exp_u)
    assert rel_l1(got_u, mixed_u) > 1e-2  # a mixing bug would have shown


def _manual_cached_cfg(model, cond, uncond, noise, compute_steps):
    """The caching arithmetic written out by hand with one residual per branch."""
    sched = make_scheduler("unipc", STEPS, 5.0)
    sched.reset()
    x = noise.float()
    res = {}
    for i in range(STEPS):
        t = sched.timesteps[i].expand(1)
        vs = {}
        for name, c in ((COND, cond), (UNCOND, uncond)):
            tokens, grid = model.embed_video(x, None)
            e, e0 = model.embed_time(t)
            ctx, _ = model.embed_context(c.context, None)
            if i in compute_steps:
                out = model.forward_blocks(tokens, e0, ctx, None, model.rope(grid, "cpu"))
                res[name] = out - tokens
            else:
                out = tokens + res[name]
            vs[name] = model.unpatchify(model.head(out, e), grid)
        v = vs[UNCOND] + GUIDANCE * (vs[COND] - vs[UNCOND])
        x = sched.step(v, i, x)
    return x


def test_cfg_run_keeps_branches_apart_in_any_order(setup):
    model, cond, uncond, noise = setup
    pol = _always_skip_mag(K=2)  # computes steps 0 and 3, skips 1, 2, 4, 5
    with torch.no_grad():
        exp = _manual_cached_cfg(model, cond, uncond, noise, {0, 3})
        cache = FeatureCache(pol)
        with feature_cache(model, cache, num_steps=STEPS):
            got = _run(model, cond, uncond, noise, predict=guided_velocity_branches)

        # a CFG-parallel-like caller evaluating uncond first, branches declared: same result
        def reversed_order(model, x, t, cond, uncond, guidance):
            with cache_branch(UNCOND):
                v_u = model(x, t, uncond.context)
            with cache_branch(COND):
                v = model(x, t, cond.context)
            return v_u + guidance * (v - v_u)

        with feature_cache(model, FeatureCache(pol), num_steps=STEPS):
            got_rev = _run(model, cond, uncond, noise, predict=reversed_order)
        # the undeclared fallback (call order) matches guided_velocity's cond-then-uncond order
        with feature_cache(model, FeatureCache(pol), num_steps=STEPS):
            got_fallback = _run(model, cond, uncond, noise, predict=guided_velocity)
        uncached = _run(model, cond, uncond, noise)
    assert cache.report().computed == {COND: [0, 3], UNCOND: [0, 3]}
    torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-6)
    assert torch.equal(got_rev, got) and torch.equal(got_fallback, got)
    assert torch.isfinite(got).all()
    assert rel_l1(got, uncached) > 1e-3  # skipping really changed the run


def test_high_threshold_skips_and_reports(setup):
    model, cond, uncond, noise = setup
    cache = cache_from_config(
        {
            "feature_caching": "Tea",
            "teacache_thresh": 1e9,
            "use_ret_steps": True,
            "teacache_start_step": 1,
            "cache_model": "t2v-14b",
        }
    )
    with feature_cache(model, cache, num_steps=STEPS):
        got = _run(model, cond, uncond, noise, predict=guided_velocity_branches)
    rep = cache.report()
    assert torch.isfinite(got).all()
    assert rep.computed == {COND: [0], UNCOND: [0]} and rep.skipped_total == 2 * (STEPS - 1)
    s = rep.summary()
    assert f"skipped {2 * (STEPS - 1)} of {2 * STEPS}" in s and "cond 5/6" in s and "uncond 5/6" in s
    d = rep.to_dict()
    assert d["per_branch"][UNCOND]["skipped"] == list(range(1, STEPS)) and d["evaluations"] == 2 * STEPS


def test_new_run_detected_without_begin_run(setup):
    model, cond, uncond, noise = setup
    cache = FeatureCache(_always_skip_mag(K=2), num_steps=STEPS).attach(model)
    try:
        first = _run(model, cond, uncond, noise, predict=guided_velocity_branches)
        second = _run(model, cond, uncond, noise, predict=guided_velocity_branches)  # timestep rises: new run
        with pytest.raises(RuntimeError, match="already"):
            FeatureCache(_always_skip_mag()).attach(model)
    finally:
        cache.detach()
    assert torch.equal(first, second)
    assert cache.report().computed == {COND: [0, 3], UNCOND: [0, 3]}


def test_start_end_and_cap_through_the_model(setup):
    model, cond, uncond, noise = setup
    n = 10
    pol = TeaCachePolicy(thresh=1e9, coefficients=None, indicator="block0", start_step=2, end_step=-2, max_skips=2)
    cache = FeatureCache(pol)
    with feature_cache(model, cache, num_steps=n):
        got = _run(model, cond, uncond, noise, predict=guided_velocity_branches, steps=n)
    assert torch.isfinite(got).all()
    for b in (COND, UNCOND):
        assert cache.report().computed[b] == [0, 1, 4, 7, 8, 9]
        assert cache.report().skipped[b] == [2, 3, 5, 6]


def _block0_change_and_inputs(model, call):
    """Two cond calls (t 900, 700) under a block-0 TeaCache: the indicator's traced change of the
    second call, and block 0's self-attention inputs as they were seen."""
    seen = []
    hook = model.blocks[0].self_attn.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    cache = FeatureCache(TeaCachePolicy(thresh=0.0, indicator="block0", start_step=0), trace=True)
    try:
        with feature_cache(model, cache, num_steps=2), torch.no_grad():
            for t in (900.0, 700.0):
                with cache_branch(COND):
                    call(t)
    finally:
        hook.remove()
    return cache.trace[1]["changes"]["block0"], seen


def test_block0_indicator_is_block0_modulated_input(setup):
    model, cond, _, noise = setup
    change, seen = _block0_change_and_inputs(model, lambda t: model(noise, torch.tensor([t]), cond.context))
    assert change == pytest.approx(rel_l1(seen[1], seen[0]), rel=1e-6)


def test_block0_indicator_with_per_token_timesteps():
    """Wan2.2 TI2V-5B feeds t per token (e0 [B, L, 6, C]): the indicator is still block 0's
    modulated input, token by token."""
    from .test_wan22_dit import _first_frame_zero_t, tiny22

    cfg = tiny22("ti2v")
    model = build_model(cfg, random_state_dict(cfg), dtype=torch.float32)
    x = torch.randn(1, 48, 3, 4, 6)
    ctx = [torch.randn(7, cfg.text_dim)]
    change, seen = _block0_change_and_inputs(model, lambda t: model(x, _first_frame_zero_t([t], 3, 4, 6), ctx))
    assert change == pytest.approx(rel_l1(seen[1], seen[0]), rel=1e-6)


# ---- decision rules vs transcriptions of the reference loops ----------------------------------


def _ref_tea(changes, coeffs, thresh, ret):
    """TeaCache4Wan2.1 / LightX2V per-branch rule, written as the reference code reads."""
    n = len(changes)
    ret_steps, cutoff = (5, n) if ret else (1, n - 1)
    acc, calc = 0.0, []
    for i in range(n):
        if i < ret_steps or i >= cutoff:
            should, acc = True, 0.0
        else:
            acc += np.poly1d(coeffs)(changes[i])
            should = not acc < thresh
            if should:
                acc = 0.0
        calc.append(should)
    return calc


def _ref_mag(ratios, thresh, K, retention):
    n = len(ratios)
    acc_r, acc_s, acc_e, calc = 1.0, 0, 0.0, []
    for i in range(n):
        skip = False
        if i >= int(n * retention):
            acc_r *= ratios[i]
            acc_s += 1
            acc_e += abs(1 - acc_r)
            if acc_e < thresh and acc_s <= K:
                skip = True
            else:
                acc_r, acc_s, acc_e = 1.0, 0, 0.0
        calc.append(not skip)
    return calc


def _drive(policy, n, changes=None, branch=COND):
    st, calc = BranchState(), []
    for i in range(n):
        skip = policy.decide(st, i, n, branch, None if changes is None or i == 0 else changes[i], can_skip=i > 0)
        st.skips = st.skips + 1 if skip else 0
        calc.append(not skip)
    return calc


@pytest.mark.parametrize("ret", [True, False])
def test_tea_rule_matches_reference(ret):
    rng = random.Random(0)
    coeffs = TEACACHE_COEFFICIENTS["t2v-14b"]["e0" if ret else "e"]
    for thresh in (0.05, 0.1, 0.2, 0.3):
        changes = [0.0] + [rng.uniform(0.01, 0.08) for _ in range(49)]
        cache = cache_from_config(
            {"feature_caching": "Tea", "use_ret_steps": ret, "teacache_thresh": thresh, "cache_model": "t2v-14b"}
        )
        got = _drive(cache.policy, 50, changes)
        assert got == _ref_tea(changes, coeffs, thresh, ret)


def test_tea_cap_and_window():
    pol = TeaCachePolicy(thresh=10.0, coefficients=None, start_step=3, end_step=12, max_skips=3)
    calc = _drive(pol, 15, [0.01] * 15)
    assert [i for i, c in enumerate(calc) if c] == [0, 1, 2, 6, 10, 12, 13, 14]


@pytest.mark.parametrize("key", ["t2v-14b", "i2v-14b-480p"])
@pytest.mark.parametrize("thresh,K", [(0.12, 4), (0.24, 6), (0.12, 2)])
def test_mag_rule_matches_reference(key, thresh, K):
    pol = cache_from_config(
        {"feature_caching": "Mag", "magcache_thresh": thresh, "magcache_K": K, "cache_model": key}
    ).policy
    n = len(MAGCACHE_RATIOS[key][0])
    for b, table in ((COND, MAGCACHE_RATIOS[key][0]), (UNCOND, MAGCACHE_RATIOS[key][1])):
        got = _drive(pol, n, branch=b)
        assert got == _ref_mag(table, thresh, K, 0.2) == simulate(pol, n, branch=b)
        # K caps consecutive skips; the first int(n * 0.2) steps are computed
        run = longest = 0
        for c in got:
            run = 0 if c else run + 1
            longest = max(longest, run)
        assert longest <= K and all(got[: int(n * 0.2)])


def test_mag_resamples_other_step_counts():
    pol = MagCachePolicy(ratios=MAGCACHE_RATIOS["i2v-14b-480p"], thresh=0.24, K=6)
    src = MAGCACHE_RATIOS["i2v-14b-480p"][0]
    t = pol.table(COND, 20)
    assert len(t) == 20 and t[0] == src[0] and t[-1] == src[-1]
    assert pol.table(COND, 40) == list(src)
    assert _drive(pol, 20).count(False) > 0


# ---- config --------------------------------------------------------------------------------------


def test_cache_from_config_keys():
    assert cache_from_config({}) is None and cache_from_config({"feature_caching": "NoCaching"}) is None
    with pytest.raises(ValueError, match="TaylorSeer"):
        cache_from_config({"feature_caching": "TaylorSeer"})
    with pytest.raises(ValueError, match="unknown"):
        cache_from_config({"feature_caching": "Bogus"})
    lx = {  # LightX2V configs/caching/teacache/wan_i2v_tea_480p.json, abridged
        "infer_steps": 40,
        "feature_caching": "Tea",
        "coefficients": [
            [2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01],
            [-3.0e02, 2.2e02, -5.2e01, 5.8e00, -2.0e-01],
        ],
        "use_ret_steps": True,
        "teacache_thresh": 0.26,
    }
    c = cache_from_config(lx)
    p = c.policy
    assert c.num_steps == 40 and p.thresh == 0.26 and p.indicator == "e0" and p.start_step == 5 and p.end_step is None
    assert list(p.coefficients) == lx["coefficients"][0]
    p = cache_from_config({**lx, "use_ret_steps": False}).policy
    assert (
        p.indicator == "e" and p.start_step == 1 and p.end_step == -1 and list(p.coefficients) == lx["coefficients"][1]
    )
    p = cache_from_config({"feature_caching": "Tea"}, model_key="i2v-14b-720p").policy  # LightX2V defaults
    assert (
        p.thresh == 0.26 and p.indicator == "e" and list(p.coefficients) == TEACACHE_COEFFICIENTS["i2v-14b-720p"]["e"]
    )
    p = cache_from_config(
        {"feature_caching": "Tea", "teacache_max_skips": 3, "teacache_end_step": 45}, "t2v-14b"
    ).policy
    assert p.max_skips == 3 and p.end_step == 45
    with pytest.raises(ValueError, match="calibrate-cache"):
        cache_from_config({"feature_caching": "Tea"})
    with pytest.raises(ValueError, match="calibrate-cache"):
        cache_from_config({"feature_caching": "Tea", "teacache_indicator": "block0"}, "t2v-14b")

    m = cache_from_config(
        {"feature_caching": "Mag", "magcache_ratios": [[1.0, 0.9], [1.0, 0.8]], "magcache_K": 2, "magcache_thresh": 0.1}
    )
    assert (
        m.policy.K == 2
        and m.policy.thresh == 0.1
        and m.policy.retention_ratio == 0.2
        and m.policy.table(UNCOND, 2) == [1.0, 0.8]
    )
    m = cache_from_config({"feature_caching": "Mag", "cache_model": "t2v-1.3b"})
    assert (m.policy.thresh, m.policy.K) == (0.12, 4) and not m.trace_enabled
    m = cache_from_config({"feature_caching": "Mag", "magcache_calibration": True, "cache_model": "t2v-14b"})
    assert m.policy.thresh == 0.0 and m.trace_enabled
    with pytest.raises(ValueError, match="cache_model"):
        cache_from_config({"feature_caching": "Mag", "cache_model": "t2v-5b"})


def test_published_model_key():
    assert published_model_key(PRESETS["t2v-14b"]) == "t2v-14b"
    assert published_model_key(PRESETS["t2v-1.3b"]) == "t2v-1.3b"
    assert published_model_key(PRESETS["i2v-14b"], 480, 832) == "i2v-14b-480p"
    assert published_model_key(PRESETS["i2v-14b"], 720, 1280) == "i2v-14b-720p"
    assert published_model_key(tiny_cfg()) is None


# ---- calibration ---------------------------------------------------------------------------------


def test_calibration_records_true_changes(setup):
    model, cond, uncond, noise = setup
    n = 8
    sched = make_scheduler("unipc", n, 5.0)
    res = calibrate_teacache(model, noise, sched, cond, uncond, GUIDANCE)
    assert len(res.records) == 2 * n
    # independent record: velocities of an uncached run and the time embeddings per step
    outs = {COND: [], UNCOND: []}

    def rec(model, x, t, c, u, g):
        v, v_u = model(x, t, c.context), model(x, t, u.context)
        outs[COND].append(v)
        outs[UNCOND].append(v_u)
        return v_u + g * (v - v_u)

    with torch.no_grad():
        sample(model, noise, make_scheduler("unipc", n, 5.0), cond, uncond, GUIDANCE, predict=rec)
        e0s = [model.embed_time(t.expand(1))[1] for t in sched.timesteps]
    for r in res.records:
        i, b = r["step"], r["branch"]
        if i == 0:
            assert r["output_change"] is None and r["changes"]["e0"] is None and r["mag_ratio"] is None
            continue
        assert r["output_change"] == pytest.approx(rel_l1(outs[b][i], outs[b][i - 1]), rel=1e-5)
        assert r["changes"]["e0"] == pytest.approx(rel_l1(e0s[i], e0s[i - 1]), rel=1e-5)
        assert r["mag_ratio"] > 0
    for ind in ("e0", "e", "block0"):
        assert len(res.coefficients[ind]) == 5 and np.isfinite(res.coefficients[ind]).all()
    # the fit reproduces its own data where it has enough points
    pts = [(r["changes"]["block0"], r["output_change"]) for r in res.records if r["step"] >= 1]
    xs, ys = np.array(pts).T
    assert (
        np.abs(np.polyval(res.coefficients["block0"], xs) - ys).mean()
        <= res.fit_error["block0"] * np.abs(ys).mean() + 1e-9
    )
    cfg = res.to_config()
    assert cfg["coefficients"] == [res.coefficients["e0"], res.coefficients["e"]]
    assert len(cfg["magcache_ratios"][0]) == n and cfg["magcache_ratios"][0][0] == 1.0
    # the fitted config drives a cached run
    cache = cache_from_config({"feature_caching": "Tea", "use_ret_steps": True, "teacache_thresh": 0.5, **cfg})
    with feature_cache(model, cache, num_steps=n):
        out = _run(model, cond, uncond, noise, predict=guided_velocity_branches, steps=n)
    assert torch.isfinite(out).all()


def test_calibrate_cache_command_line(tmp_path):
    from safetensors.torch import save_file

    cfg = tiny_cfg()
    path = save_dit(random_state_dict(cfg, seed=9), str(tmp_path / "dit"), layout="single", cfg=cfg)
    g = torch.Generator().manual_seed(0)
    emb = tmp_path / "emb.safetensors"
    save_file(
        {
            "context": torch.randn(5, cfg.text_dim, generator=g),
            "context_null": torch.randn(2, cfg.text_dim, generator=g),
        },
        str(emb),
    )
    out = tmp_path / "cal.json"
    argv = ["--dit", path, "--embeds", str(emb), "--steps", "6", "--size", "64x32", "--frames", "5"]
    argv += ["--device", "cpu", "--dtype", "fp32", "--compile", "false", "--seeds", "0,1", "--out", str(out)]
    assert calibrate_main(argv) == 0
    data = json.loads(out.read_text())
    assert len(data["records"]) == 2 * 2 * 6
    assert [len(c) for c in data["config"]["coefficients"]] == [5, 5]
    assert len(data["config"]["magcache_ratios"]) == 2
