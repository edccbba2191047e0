"""Why a step of the whole 720p run may cost more than bench_dit's forward: the same DiT timed
inside `WanPipeline.generate` (CUDA events around each forward, against the step's wall time)
and then outside it, on the run's own inputs and on bench_dit's, under no_grad (as sampling
runs) and inference_mode (as bench_dit runs); then one forward of each input set under
torch.profiler, kernel time per group and the kernels whose time differs most.

  python benchmarks/profile_e2e_step.py [--variant fast@radial_attn+res16] [--size 720x1280]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import bench_dit as bd  # noqa: E402
from benchmarks.bench_e2e import random_dit, random_pipeline, random_t5  # noqa: E402
from benchmarks.profile_dit import group  # noqa: E402
from wan_core.models.vae import WanVAE  # noqa: E402
from wan_core.options import GenerationConfig  # noqa: E402

log = bd.log


def kernel_times(fn) -> tuple[dict[str, float], float]:
    """GPU time (us) per kernel name of one call of fn, and the call's wall time (us)."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.self_device_time_total > 0:
            kernels[ev.key] = kernels.get(ev.key, 0.0) + ev.self_device_time_total
    return kernels, s.elapsed_time(e) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="fast@radial_attn+res16")
    ap.add_argument("--size", default="720x1280")
    args = ap.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    t5 = random_t5("cuda")
    with torch.device("cuda"):
        vae = WanVAE()
    vae = vae.to(torch.bfloat16).eval()
    dit = random_dit(args.variant)
    cfg = GenerationConfig(infer_steps=4, denoising_step_list=[1000, 750, 500, 250], sample_guide_scale=1.0,
                           target_height=height, target_width=width, video_preset="faster")  # fmt: skip
    pipe = random_pipeline("t2v", cfg, dit, t5, vae, None)

    calls: list[dict] = []

    def before(mod, a, kw):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        calls.append(dict(a=[v.clone() if torch.is_tensor(v) else v for v in a], kw=kw, start=ev,
                          grad=torch.is_grad_enabled(), inference=torch.is_inference_mode_enabled()))

    def after(mod, a, kw, out):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        calls[-1]["end"] = ev

    hooks = [dit.register_forward_pre_hook(before, with_kwargs=True), dit.register_forward_hook(after, with_kwargs=True)]
    path = os.path.join(tempfile.mkdtemp(), "run.mp4")
    for run in range(3):  # run 0 compiles
        calls.clear()
        res = pipe.generate(seed=run, prompt="a cat surfing a wave at sunset", save_result_path=path)
        fwd = [c["start"].elapsed_time(c["end"]) / 1e3 for c in calls]
        log(f"run {run}: {res.summary()}")
        log(f"  steps {[round(s, 3) for s in res.step_times]}; forwards (CUDA events) {[round(f, 3) for f in fwd]}; "
            f"grad {calls[0]['grad']}, inference_mode {calls[0]['inference']}")
    for h in hooks:
        h.remove()

    a0, kw0 = calls[0]["a"], calls[0]["kw"]
    ctx = a0[2]
    shape = tuple(a0[0].shape[2:])
    log(f"run inputs: x {tuple(a0[0].shape)} {a0[0].dtype}, t {a0[1].tolist()}, context "
        f"{[tuple(c.shape) for c in ctx] if isinstance(ctx, (list, tuple)) else tuple(ctx.shape)}, kwargs {sorted(kw0)}")
    bx, bt, bctx = bd.inputs(shape)
    cases = {
        "run inputs (step 0), no_grad": (torch.no_grad, a0, kw0),
        "run inputs (step 0), inference_mode": (torch.inference_mode, a0, kw0),
        "bench x/t, run context, inference_mode": (torch.inference_mode, [bx, bt, ctx], {}),
        "run x/t, bench context (512 rows), inference_mode": (torch.inference_mode, [a0[0], a0[1], bctx], {}),
        "bench_dit inputs, inference_mode": (torch.inference_mode, [bx, bt, bctx], {}),
    }
    profiles = {}
    for name, (mode, a, kw) in cases.items():
        with mode():
            tm, all_t = bd.timeit(lambda a=a, kw=kw: dit(*a, **kw), warm=1, reps=2)
            log(f"{name:52s} {tm:.3f} s {[round(v, 3) for v in all_t]}")
            if name in ("run inputs (step 0), no_grad", "bench_dit inputs, inference_mode"):
                profiles[name] = kernel_times(lambda a=a, kw=kw: dit(*a, **kw))
    (ka, wa), (kb, wb) = profiles.values()
    na, nb = profiles
    for name, (k, wall) in profiles.items():
        busy = sum(k.values())
        groups: dict[str, float] = {}
        for key, us in k.items():
            groups[group(key)] = groups.get(group(key), 0.0) + us
        log(f"\n== {name}: wall {wall / 1e6:.3f} s, kernels {busy / 1e6:.3f} s (idle {100 * (1 - busy / wall):.1f} %)")
        for g, us in sorted(groups.items(), key=lambda kv: -kv[1]):
            log(f"  {g:28s} {us / 1e6:7.3f} s")
    log(f"\nkernels whose time differs most ({na} minus {nb}), ms:")
    keys = set(ka) | set(kb)
    for key in sorted(keys, key=lambda k: -abs(ka.get(k, 0.0) - kb.get(k, 0.0)))[:25]:
        log(f"  {(ka.get(key, 0.0) - kb.get(key, 0.0)) / 1e3:+9.1f}  ({ka.get(key, 0.0) / 1e3:8.1f} vs {kb.get(key, 0.0) / 1e3:8.1f})  {key[:100]}")


if __name__ == "__main__":
    main()
