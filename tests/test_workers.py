"""The persistent worker group of the multi-GPU sampler node, on 2 CPU processes (gloo).

It samples what one process samples, is reused across runs (same processes), streams progress,
honours cancel between steps, and when a worker is killed or fails it reports the error, leaves
no process behind, and the next run works on a fresh group. Each rank runs the one-process
denoising stage (`sampling.denoise`): a feature cache skips the same evaluations as in one
process, and a CUDA out-of-memory error reaches the caller with `explain_oom`'s offload advice.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import psutil
import pytest
import torch

from wan_core.layers.offload import explain_oom
from wan_core.layers.parallel.workers import RunCancelled, SampleRequest, WorkerGroup, WorkerGroupError
from wan_core.loading.dit import save_dit
from wan_core.model_cache import lease
from wan_core.sampling.denoise import denoise_request, token_count
from wan_core.sampling.loop import Cond, make_noise, sample
from wan_core.sampling.schedulers import make_scheduler
from wan_core.spec import ModelSpec

from .test_dit import random_state_dict, rel_err, tiny_cfg

STEPS = 4


class FailOnRank1:
    """A model description whose build fails on rank 1 only (rank 0 then waits in a collective)."""

    def build_dit(self, device):
        if os.environ.get("RANK") == "1":
            raise RuntimeError("boom on rank 1")
        cfg = tiny_cfg()
        from wan_core.loading.dit import build_model

        return build_model(cfg, random_state_dict(cfg), dtype=torch.float32, device=device)


OOM_TEXT = "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 23.64 GiB total capacity)"


def _tiny_dit(device):
    cfg = tiny_cfg()
    from wan_core.loading.dit import build_model

    return build_model(cfg, random_state_dict(cfg), dtype=torch.float32, device=device)


def _raise_oom(*args, **kwargs):
    raise torch.OutOfMemoryError(OOM_TEXT)


class OutOfMemoryDit:
    """A model description whose DiT runs out of CUDA memory in its first forward (on every rank)."""

    def build_dit(self, device):
        model = _tiny_dit(device)
        model.forward = _raise_oom
        return model


def _worker_children() -> list[psutil.Process]:
    """Our spawned workers still around (the resource tracker is not one of them)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "spawn_main" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _gone(pids, timeout=10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = tiny_cfg("t2v")
    path = save_dit(random_state_dict(cfg, seed=4), str(tmp_path_factory.mktemp("dit") / "dit"), layout="single", cfg=cfg)
    spec = ModelSpec(dit=path, task="t2v", device="cpu", dtype="fp32")
    g = torch.Generator().manual_seed(0)
    req = SampleRequest(
        noise=make_noise((1, 16, 3, 6, 10), seed=1),  # 45 tokens: padded to 46 over 2 ranks
        scheduler=make_scheduler("unipc", STEPS, 5.0),
        cond=Cond([torch.randn(8, cfg.text_dim, generator=g)]),
        uncond=Cond([torch.randn(3, cfg.text_dim, generator=g)]),
        guidance=4.5,
        preview=True,
    )
    with torch.no_grad(), lease(spec) as dit:
        ref = sample(dit, req.noise, make_scheduler("unipc", STEPS, 5.0), req.cond, req.uncond, req.guidance)
    return spec, req, ref


def test_group_reuse_cancel_kill_and_restart(setup):
    spec, req, ref = setup
    group = WorkerGroup(2, {"seq_p_size": 2, "seq_p_attn_type": "ulysses"}, device="cpu", threads=1)
    try:
        # two runs on the same processes, each equal to one process, with per-step progress + previews
        seen = []
        out, report = group.run(spec, req, progress=seen.append)
        pids = group.pids
        assert [s.step for s in seen] == list(range(STEPS)) and all(s.total == STEPS for s in seen)
        assert seen[-1].x0 is not None and seen[-1].x0.shape == req.noise.shape
        assert rel_err(out, ref) <= 1e-5, rel_err(out, ref)
        assert report is None  # no feature cache asked for
        out2, _ = group.run(spec, req)
        assert group.pids == pids, "the group was not reused"
        assert rel_err(out2, ref) <= 1e-5

        # cancel (asked before the first step ends): every rank stops after step 0, the group stays
        seen = []
        with pytest.raises(RunCancelled):
            group.run(spec, req, progress=seen.append, cancel=lambda: True)
        assert [s.step for s in seen] == [0]
        assert group.alive and group.pids == pids

        # a worker killed from outside: reported, everything gone, the next run works on new processes
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(WorkerGroupError, match="worker 1 was killed by signal 9"):
            group.run(spec, req)
        assert _gone(pids), "a worker outlived the teardown"
        assert _worker_children() == []
        out3, _ = group.run(spec, req)
        assert rel_err(out3, ref) <= 1e-5
        assert set(group.pids).isdisjoint(pids)

        # a worker that raises (rank 0 is then stuck in a collective): the traceback comes back, nothing is left
        pids = group.pids
        with pytest.raises(WorkerGroupError, match="(?s)worker 1 failed.*boom on rank 1"):
            group.run(FailOnRank1(), req)
        assert _gone(pids)
        assert _worker_children() == []
    finally:
        group.close()
    assert _worker_children() == []


TEA = {"feature_caching": "Tea", "coefficients": [1.0, 0.0], "teacache_thresh": 100.0}  # skips every step it may


def test_group_runs_the_denoise_stage_cache_and_oom_advice(setup):
    """CFG parallel (cond on one rank, uncond on the other, each rank's cache following its branch):
    the same latent and the same CacheReport as one process with that cache; a cache config the
    model cannot run is refused with the group kept; an out-of-memory error comes back as one."""
    spec, req, _ = setup
    cached = dataclasses.replace(req, cache=TEA)
    with torch.no_grad(), lease(spec) as dit:
        ref, ref_report = denoise_request(dit, cached)
    assert ref_report.skipped_total > 0 and set(ref_report.computed) == {"cond", "uncond"}
    group = WorkerGroup(2, {"cfg_p_size": 2}, device="cpu", threads=1)
    try:
        out, report = group.run(spec, cached)
        assert rel_err(out, ref) <= 1e-5, rel_err(out, ref)
        assert report == ref_report, (report, ref_report)
        assert report.summary() == ref_report.summary()
        pids = group.pids

        # no published table for the tiny DiT: every rank refuses before its first step, the group stays
        with pytest.raises(ValueError, match="TeaCache needs 'coefficients'"):
            group.run(spec, dataclasses.replace(req, cache={"feature_caching": "Tea"}))
        assert group.alive and group.pids == pids

        # CUDA out of memory inside a worker's sampling: the caller gets explain_oom's advice
        with pytest.raises(torch.OutOfMemoryError) as info:
            group.run(OutOfMemoryDit(), req)
        probe = _tiny_dit("cpu")
        advice = str(explain_oom(torch.OutOfMemoryError(OOM_TEXT), probe, token_count(probe, req.noise.shape)))
        assert advice in str(info.value) and "CUDA out of memory in the Wan DiT (no DiT offload)" in advice
        assert isinstance(info.value, WorkerGroupError)  # the group was torn down (GPUs freed) ...
        assert _gone(pids) and _worker_children() == []
        out2, _ = group.run(spec, req)  # ... and the next run starts a fresh one
        assert set(group.pids).isdisjoint(pids) and out2.shape == req.noise.shape
    finally:
        group.close()
    assert _worker_children() == []
