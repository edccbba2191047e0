"""Wan2.2 through the multi-GPU paths: 2 gloo processes on the CPU give what one process gives.

- Sequence parallel (Ulysses, Ring) with TI2V-5B's per-token timesteps: the per-token time
  projection e0 [B, L, 6, C] is padded and split like the tokens (45 tokens over 2 ranks: one
  padded), frame-0 tokens at t = 0; a forward and a whole FirstFrame run equal one process.
- Two A14B experts (different weights, both sequence-parallel) through `parallel_sample` with
  CFG parallel, Ulysses and Ring: the torchrun / pipeline path at the denoise level.
- The worker group of the multi-GPU sampler node: a `SampleRequest` naming the low-noise expert
  (`LowNoiseExpert`: spec, switch, guidance) and one carrying `FirstFrame`, on tiny Wan2.2 models
  written to disk; each rank leases both experts itself. Their latents equal the one-process
  `WanPipeline` run's.
fp32, relative error <= 1e-5 throughout (measured: ~1e-7 or bitwise).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wan_core.layers.parallel import (
    ParallelConfig,
    build_groups,
    disable_sequence_parallel,
    enable_sequence_parallel,
    init_process_group,
    parallel_sample,
)
from wan_core.layers.parallel.workers import WorkerGroup
from wan_core.loading.dit import build_model
from wan_core.sampling.denoise import LowNoiseExpert, SampleRequest, denoise_request
from wan_core.sampling.experts import Experts, ExpertSwitch
from wan_core.sampling.first_frame import FirstFrame
from wan_core.sampling.loop import Cond, make_noise, sample
from wan_core.sampling.schedulers import make_scheduler

from .test_dit import random_state_dict, rel_err
from .test_wan22_dit import tiny22

TOL = 1e-5
GRIDS = [(3, 6, 10), (5, 2, 2)]  # latent F, H, W -> 45 and 5 tokens (patch 1x2x2): one padded token over 2 ranks
FORWARD = [ParallelConfig(ulysses=2), ParallelConfig(ulysses=2, ulysses_chunks=1), ParallelConfig(ring=2)]
SAMPLING = [ParallelConfig(ulysses=2), ParallelConfig(ring=2), ParallelConfig(cfg=2)]


def _groups(cache: dict, pc: ParallelConfig, heads: int):
    return cache.get(pc) or cache.setdefault(pc, build_groups(pc, heads))


def _report(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def _conds(cfg, seed: int):
    g = torch.Generator().manual_seed(seed)
    return Cond([torch.randn(9, cfg.text_dim, generator=g)]), Cond([torch.randn(3, cfg.text_dim, generator=g)])


def _check_ti2v_forward(model, cache: dict):
    """Per-token t (frame 0 at 0) through split blocks equals the one-process forward."""
    cfg = model.cfg
    for grid in GRIDS:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, cfg.in_dim, *grid, generator=g)
        t_rows = torch.tensor([900.0, 300.0])
        t = FirstFrame(torch.zeros(2, cfg.in_dim, 1, *grid[1:])).timesteps(t_rows, x.shape, cfg.patch_size)  # [2, L]
        assert t.shape[1] % 2 == 1 and (t[:, 0] == 0).all()
        ctx = [torch.randn(n, cfg.text_dim, generator=g) for n in (7, 12)]
        with torch.no_grad():
            ref = model(x, t, ctx)
            rows = model(x, t_rows, ctx)
        assert rel_err(rows, ref) > 1e-3, "the per-token t changed nothing: the check has no teeth"
        for pc in FORWARD:
            with torch.no_grad():
                enable_sequence_parallel(model, _groups(cache, pc, cfg.num_heads))
                got = model(x, t, ctx)
                disable_sequence_parallel(model)
            err = rel_err(got, ref)
            assert err <= TOL, f"ti2v per-token {pc} grid {grid}: rel err {err:.2e}"
            _report(f"ti2v per-token forward {pc} grid {grid}: rel err {err:.1e}")


def _check_ti2v_sample(model, cache: dict):
    """A 3-step CFG run with latent frame 0 held at an image latent (FirstFrame) equals one process."""
    cfg = model.cfg
    grid = GRIDS[0]
    noise = make_noise((1, cfg.in_dim, *grid), seed=4)
    z = make_noise((1, cfg.in_dim, 1, *grid[1:]), seed=5)
    cond, uncond = _conds(cfg, 6)
    with torch.no_grad():
        ref = sample(model, noise, make_scheduler("unipc", 3, 5.0), cond, uncond, 4.0, first_frame=FirstFrame(z))
        for pc in SAMPLING:
            groups = _groups(cache, pc, cfg.num_heads)
            enable_sequence_parallel(model, groups)
            got = parallel_sample(model, noise, make_scheduler("unipc", 3, 5.0), cond, uncond, 4.0, groups,
                                  first_frame=FirstFrame(z))  # fmt: skip
            disable_sequence_parallel(model)
            assert torch.equal(got[:, :, :1], z)
            err = rel_err(got, ref)
            assert err <= TOL, f"ti2v first-frame sampling {pc}: rel err {err:.2e}"
            _report(f"ti2v first-frame sampling {pc}: rel err {err:.1e}")


def _check_experts(high, low, cache: dict):
    """Two experts (boundary switch, a guidance scale each), both split, equal the one-process run."""
    cfg = high.cfg
    sched = lambda: make_scheduler("unipc", 4, 12.0)  # noqa: E731
    switch = ExpertSwitch(boundary=0.875)
    assert switch.plan(sched().timesteps) == [True, True, True, False]  # both experts run
    experts = Experts(high, low, switch, guidance_high=4.0, guidance_low=3.0)
    noise = make_noise((1, cfg.in_dim, *GRIDS[0]), seed=7)
    cond, uncond = _conds(cfg, 8)
    with torch.no_grad():
        ref = sample(experts, noise, sched(), cond, uncond)
        alone = sample(Experts(high, high, switch, 4.0, 3.0), noise, sched(), cond, uncond)
        assert rel_err(alone, ref) > 1e-3, "the low-noise expert changed nothing: the check has no teeth"
        for pc in SAMPLING:
            groups = _groups(cache, pc, cfg.num_heads)
            for m in experts.models:
                enable_sequence_parallel(m, groups)
            got = parallel_sample(experts, noise, sched(), cond, uncond, 99.0, groups)  # guidance: the experts'
            for m in experts.models:
                disable_sequence_parallel(m)
            err = rel_err(got, ref)
            assert err <= TOL, f"two experts {pc}: rel err {err:.2e}"
            _report(f"two experts {pc}: rel err {err:.1e}")


def _worker(rank: int, world: int, init_file: str):
    torch.set_num_threads(1)
    init_process_group("cpu", rank=rank, world_size=world, init_method=f"file://{init_file}", timeout_s=120)
    try:
        cache: dict = {}
        cfg = tiny22("ti2v")
        ti2v = build_model(cfg, random_state_dict(cfg, seed=1), dtype=torch.float32)
        _check_ti2v_forward(ti2v, cache)
        _check_ti2v_sample(ti2v, cache)
        cfg = tiny22("t2v")
        high = build_model(cfg, random_state_dict(cfg, seed=2), dtype=torch.float32)
        low = build_model(cfg, random_state_dict(cfg, seed=3), dtype=torch.float32)
        _check_experts(high, low, cache)
    finally:
        dist.destroy_process_group()


def test_two_processes_per_token_t_first_frame_and_two_experts(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


# ---- the worker group (multi-GPU sampler node) on tiny Wan2.2 models written to disk ---------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-process pipeline runs (A14B T2V two experts; TI2V-5B with an image) and their requests."""
    from wan_core.loading.discover import find_model_files
    from wan_core.loading.tiny import write_tiny_model
    from wan_core.pipeline import WanPipeline
    from wan_core.wan22 import expert_switch

    root = tmp_path_factory.mktemp("wan22")
    size = dict(target_video_length=9, target_height=48, target_width=80)  # A14B latent 3x6x10: 45 tokens
    a14b = write_tiny_model(root / "a14b", "t2v", "wan", seed=5, family="wan2.2")
    files = find_model_files(a14b, "t2v", family="wan2.2")
    pipe = WanPipeline(a14b, model_cls="wan2.2_moe", dtype="fp32", device="cpu").create_generator(infer_steps=4, **size)
    assert (pipe.spec.dit, pipe.spec_low.dit) == (files.dit_high, files.dit_low)
    switch = expert_switch(pipe.config, "t2v")
    assert switch.plan(pipe.config.scheduler().timesteps) == [True, True, True, False]
    cond, uncond = pipe.encode_text("a red fox in the snow", "")
    noise = make_noise(pipe.latent_shape(), 11)
    g_high, g_low = pipe.config.guidances
    moe_req = SampleRequest(
        noise, pipe.config.scheduler(), cond, uncond, g_high, low=LowNoiseExpert(pipe.spec_low, switch, g_low)
    )
    moe = (pipe.spec, moe_req, pipe.sample(noise, cond, uncond))

    ti2v = write_tiny_model(root / "ti2v", "ti2v", "wan", seed=6, family="wan2.2")
    pipe = WanPipeline(ti2v, model_cls="wan2.2", task="i2v", dtype="fp32", device="cpu").create_generator(
        infer_steps=3, target_video_length=9, target_height=96, target_width=160
    )
    image = torch.rand(3, 96, 160, generator=torch.Generator().manual_seed(1)) * 2 - 1
    image_cond = pipe.encode_image(image)
    shape = pipe.latent_shape(image_cond)
    assert shape == (1, 48, 3, 6, 10)  # 45 tokens
    cond, uncond = pipe.encode_text("a red fox in the snow", "")
    noise = make_noise(shape, 12)
    ff_req = SampleRequest(
        noise, pipe.config.scheduler(), cond, uncond, pipe.config.guidance, first_frame=FirstFrame(image_cond.z)
    )
    ff = (pipe.spec, ff_req, pipe.sample(noise, cond, uncond, image_cond))
    return moe, ff


def test_request_in_one_process_equals_the_pipeline(runs):
    """`denoise_request` on both leased experts (what each worker runs) is the pipeline's run, bitwise;
    a request with a low-noise expert given one DiT is refused."""
    from wan_core.model_cache import lease

    (spec, req, ref), (ff_spec, ff_req, ff_ref) = runs
    with torch.no_grad(), lease(spec) as hi, lease(req.low.spec) as lo:
        got, _ = denoise_request(req.experts(hi, lo), req)
        with pytest.raises(ValueError, match="runs on both experts"):
            denoise_request(hi, req)
    assert torch.equal(got, ref)
    with torch.no_grad(), lease(ff_spec) as dit:
        got, _ = denoise_request(dit, ff_req)
    assert torch.equal(got, ff_ref)


def test_worker_group_runs_two_experts_and_first_frame(runs):
    (spec, req, ref), (ff_spec, ff_req, ff_ref) = runs
    swapped = dataclasses.replace(req, low=dataclasses.replace(req.low, spec=spec))
    for parallel in ({"seq_p_size": 2, "seq_p_attn_type": "ulysses"}, {"cfg_p_size": 2}):
        group = WorkerGroup(2, parallel, device="cpu", threads=1)
        try:
            seen = []
            out, report = group.run(spec, req, progress=seen.append)
            assert report is None and [s.step for s in seen] == [0, 1, 2, 3]
            assert rel_err(out, ref) <= TOL, (parallel, rel_err(out, ref))
            out, _ = group.run(ff_spec, ff_req)  # the same processes, now the TI2V-5B model
            assert torch.equal(out[:, :, :1], ff_req.first_frame.z)
            assert rel_err(out, ff_ref) <= TOL, (parallel, rel_err(out, ff_ref))
            pids = group.pids
            with pytest.raises(ValueError, match="low-noise expert's spec says expert='high'"):
                group.run(spec, swapped)  # refused before anything is sent
            with pytest.raises(ValueError, match="not available for the two-expert"):  # refused by the workers
                group.run(spec, dataclasses.replace(req, cache={"feature_caching": "Tea", "coefficients": [1.0, 0.0]}))
            assert group.alive and group.pids == pids
        finally:
            group.close()
