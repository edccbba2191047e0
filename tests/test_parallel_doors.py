"""Several processes through the doors: `torchrun -m wan_core` with a LightX2V `parallel` block
writes what one process writes, and the `parallel` key outside a torchrun world (or with degrees
that do not multiply to the world size) is a sentence, not a hang.

The torchrun runs are 2 CPU processes on gloo over a tiny model, launched side by side: Ulysses
over 2 ranks with CFG, CFG parallel (cond and uncond on one rank each), and CFG parallel with a
TeaCache that skips steps (each rank's cache follows its own branch). Their final latents
(`--save_latent`) are compared with the one-process CLI run (fp32, rel <= 1e-5; measured: bitwise
equal) and their mp4s decoded and compared frame by frame. The ComfyUI multi-GPU sampler node
(its persistent worker group, CFG parallel, a TeaCache) gives the one-process sampler node's latent
and cache numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from wan_core.cli import main
from wan_core.layers.parallel import ParallelConfig
from wan_core.loading.tiny import write_tiny_model
from wan_core.options import GenerationConfig
from wan_core.pipeline import WanPipeline
from wan_core.video import read_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = dict(infer_steps=4, target_video_length=5, target_height=32, target_width=48, sample_guide_scale=5.0, enable_cfg=True)
TEA = dict(feature_caching="Tea", coefficients=[1.0, 0.0], teacache_thresh=100.0)  # skips most steps it may
CASES = {
    "ulysses": ({}, {"seq_p_size": 2, "seq_p_attn_type": "ulysses"}, "cfg 1 x ulysses 2 x ring 1"),
    "cfg": ({}, {"cfg_p_size": 2}, "cfg 2 x ulysses 1 x ring 1"),
    "cfg_tea": (TEA, {"cfg_p_size": 2}, "cfg 2 x ulysses 1 x ring 1"),
}


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _argv(model, cfg_path, out, latent):
    return ["--model_path", model, "--config_json", str(cfg_path), "--prompt", "a red fox in the snow", "--seed", "11",
            "--device", "cpu", "--dtype", "fp32", "--save_result_path", str(out), "--save_latent", str(latent)]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case once: the torchrun launches side by side, the one-process references meanwhile."""
    root = tmp_path_factory.mktemp("par")
    model = write_tiny_model(root / "t2v", "t2v", "wan", seed=9)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    procs = {}
    for name, (extra, parallel, _) in CASES.items():
        cfg = root / f"{name}.json"
        cfg.write_text(json.dumps({**RUN, **extra, "parallel": parallel}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "wan_core",
               *_argv(model, cfg, root / f"{name}.mp4", root / f"{name}.pt")]  # fmt: skip
        procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    refs = {}
    for key, extra in (("plain", {}), ("tea", TEA)):
        cfg = root / f"ref_{key}.json"
        cfg.write_text(json.dumps({**RUN, **extra}))
        assert main(_argv(model, cfg, root / f"ref_{key}.mp4", root / f"ref_{key}.pt")) == 0
        refs[key] = (torch.load(root / f"ref_{key}.pt"), read_video(root / f"ref_{key}.mp4")[0])
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=180)
        out[name] = (p.returncode, stdout, stderr)
    return root, refs, out


@pytest.mark.parametrize("name", list(CASES))
def test_torchrun_cli_writes_what_one_process_writes(runs, name):
    root, refs, out = runs
    rc, stdout, stderr = out[name]
    assert rc == 0, stderr[-3000:]
    assert stderr.count(f"rank 0 of 2 on cpu: {CASES[name][2]}") == 1  # ranks > 0 log warnings only
    assert stdout.count("saved ") == 1  # one rank writes
    assert ("sequence parallel on the DiT: ulysses 2 x ring 1" in stderr) == (name == "ulysses")
    ref_latent, ref_frames = refs["tea" if CASES[name][0] else "plain"]
    latent = torch.load(root / f"{name}.pt")
    assert latent.shape == ref_latent.shape and rel_err(latent, ref_latent) <= 1e-5, rel_err(latent, ref_latent)
    frames, fps = read_video(root / f"{name}.mp4")
    assert frames.shape == ref_frames.shape == (5, 32, 48, 3) and fps == 16
    assert (frames.int() - ref_frames.int()).abs().max() <= 1
    if CASES[name][0]:  # rank 0 evaluated the cond branch only (4 steps, not 8), and its cache skipped some
        skipped = stdout.strip().split("; ")[-1]
        assert skipped.endswith("of 4 DiT evaluations skipped by the cache") and not skipped.startswith("0 of"), skipped


def test_parallel_key_outside_torchrun_says_how_to_launch(tmp_path, capsys):
    model = write_tiny_model(tmp_path / "m", "t2v", "wan", seed=9)
    with pytest.raises(ValueError, match=r"asks for 2 processes.*torchrun --nproc_per_node=2 -m wan_core.*Multi-GPU"):
        WanPipeline(model, dtype="fp32", device="cpu").create_generator(**RUN, parallel={"seq_p_size": 2})
    with pytest.raises(ValueError, match="asks for 4 processes"):
        WanPipeline(model, dtype="fp32", device="cpu").enable_parallel(cfg_p_size=2, seq_p_size=2).create_generator(**RUN)
    assert not dist.is_initialized()
    # parallel sizes of 1 (or false) need no process group
    pipe = WanPipeline(model, dtype="fp32", device="cpu").create_generator(**RUN, parallel={"seq_p_size": 1})
    assert pipe.parallel_run is None


def test_degrees_not_matching_the_world_fail_before_any_rendezvous(tmp_path, capsys, monkeypatch):
    """Under torchrun (its env), degrees whose product is not the world size: every rank prints the same
    sentence and exits with 2 before joining (here: a single process with WORLD_SIZE=2 and no peer, so a
    rendezvous would hang)."""
    model = write_tiny_model(tmp_path / "m", "t2v", "wan", seed=9)
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29581").items():
        monkeypatch.setenv(k, v)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**RUN, "parallel": {"seq_p_size": 4, "seq_p_attn_type": "ring"}}))
    assert main(["--model_path", model, "--config_json", str(cfg), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "parallel degrees cfg 1 x ulysses 1 x ring 4 = 4 processes, but the world has 2" in err
    assert not dist.is_initialized()


def test_parallel_keys_are_read():
    def pc(parallel):
        cfg = GenerationConfig.from_dict({**RUN, "parallel": parallel})
        cfg.check("t2v")
        return cfg.parallel_config(world_size=8)

    assert pc({"seq_p_size": 4, "seq_p_attn_type": "ulysses", "cfg_p_size": 2}) == ParallelConfig(cfg=2, ulysses=4)
    assert pc({"seq_p_size": 2, "seq_p_attn_type": "ulysses-4090"}) == ParallelConfig(ulysses=2)  # LightX2V's consumer-card variant
    assert pc({"seq_p_size": 4, "seq_p_attn_type": "ring"}) == ParallelConfig(ring=4)
    assert pc({"seq_p_size": 8, "seq_p_attn_type": "ulysses_ring", "ulysses_p_size": 2}) == ParallelConfig(ulysses=2, ring=4)
    assert pc(False) == pc({}) == ParallelConfig(ulysses=8)  # nothing said under torchrun: Ulysses over the world
    with pytest.raises(ValueError, match="tensor parallel"):
        pc({"tensor_p_size": 2})
    with pytest.raises(ValueError, match="'parallel' must be false or an object"):
        pc(4)


def test_multi_gpu_sampler_node_runs_what_the_sampler_node_runs(tmp_path):
    """The ComfyUI multi-GPU sampler (2 CPU workers, CFG parallel) with a TeaCache from WanCacheConfig:
    the latent and the cache's numbers in its stage record are the one-process sampler node's."""
    from nodes import NODE_CLASS_MAPPINGS
    from wan_core.layers.parallel.workers import shutdown_worker_groups

    model = write_tiny_model(tmp_path / "m", "t2v", "wan", seed=9)
    spec = WanPipeline(model, dtype="fp32", device="cpu").create_generator(**RUN).spec
    text = NODE_CLASS_MAPPINGS["WanTextEncode"]().encode(spec, "a red fox in the snow", "")["result"][0]
    (tea,) = NODE_CLASS_MAPPINGS["WanCacheConfig"]().make("Tea", 10.0, False, 0.24, 6, 0.2, end_step=100, cache_model="t2v-14b")
    args = (spec, text, 48, 32, 5, 4, 5.0, 5.0, "unipc", 11)
    one = NODE_CLASS_MAPPINGS["WanSampler"]().sample(*args, cache=tea)
    try:
        multi = NODE_CLASS_MAPPINGS["WanMultiGPUSampler"]().sample(
            *args, num_gpus=2, ulysses_degree=1, cfg_parallel=True, cache=tea
        )
    finally:
        shutdown_worker_groups()
    a, b = one["result"][0]["samples"], multi["result"][0]["samples"]
    assert a.shape == b.shape and rel_err(b, a) <= 1e-5, rel_err(b, a)
    rec_one, rec_multi = one["ui"]["wan_timing"][-1], multi["ui"]["wan_timing"][-1]
    assert rec_multi["stage"] == "multi-GPU sample" and rec_multi["gpus"] == 2
    assert rec_multi["skipped_evaluations"] > 0 and rec_multi["evaluations"] == 8
    for key in ("cache", "evaluations", "skipped_evaluations"):
        assert rec_multi[key] == rec_one[key], (key, rec_multi[key], rec_one[key])
