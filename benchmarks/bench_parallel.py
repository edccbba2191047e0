"""Several GPUs against one: Ulysses, Ring and Ulysses x Ring per DiT forward, CFG parallel
(times Ulysses on the rest of the GPUs) per sampling step.

Wan2.1-14B T2V, random bf16 weights built by every rank from the same seed (speed does not
depend on values; no files needed), 480x832x81 (32,760 tokens) and 720x1280x81 (75,600 tokens).

  torchrun --nproc_per_node=N benchmarks/bench_parallel.py [--res 480p,720p] [--cfg-res 480p,720p]
                                                            [--modes ulysses,ring,hybrid,cfg] [--no-compile]

Modes on N GPUs: ulysses (Ulysses N), ring (Ring N), hybrid (Ulysses 2 x Ring N/2), cfg (CFG 2 x
Ulysses N/2, the seed's layout: cfg_p_size 2 with the sequence split over the rest).

The 1-GPU baseline runs on both ranks at once (each on its own GPU, no communication); the
parallel modes then run on the same model, wrapped and unwrapped in place. Blocks are compiled
(the single-GPU default) unless --no-compile. Outputs of the parallel modes are compared with the
1-GPU output at 480p (bf16: rounding differs between kernel shapes). Prints a table last;
writes JSON to $OUT/bench_parallel.json (or ./bench_parallel.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wan_core.layers.compile import compile_blocks  # noqa: E402
from wan_core.layers.parallel import (  # noqa: E402
    ParallelConfig,
    build_groups,
    cfg_parallel_predict,
    disable_sequence_parallel,
    enable_sequence_parallel,
    init_process_group,
)
from wan_core.layers.parallel.ring import LSE_BACKENDS, lse_attention_math  # noqa: E402
from wan_core.loading.dit import build_model  # noqa: E402
from wan_core.models.config import PRESETS  # noqa: E402
from wan_core.sampling.loop import Cond, guided_velocity  # noqa: E402

SHAPES = {"480p": (21, 60, 104), "720p": (21, 90, 160)}
RESULTS: dict = {}
ROWS: list[tuple] = []


def log(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def timeit(fn, dev, warm=1, reps=3):
    """Median seconds over reps (max over ranks of each rep), after warm-up runs."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize(dev)
    ts = []
    for _ in range(reps):
        dist.barrier(device_ids=[dev.index])
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize(dev)
        t = torch.tensor([s.elapsed_time(e) / 1e3], device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        ts.append(t.item())
    return sorted(ts)[len(ts) // 2], ts


def inputs(grid, dev, seed=0):
    g = torch.Generator().manual_seed(seed)  # CPU: the same values on every rank
    x = torch.randn(1, 16, *grid, generator=g).to(dev)
    ctx = torch.randn(1, 512, 4096, generator=g).to(dev, torch.bfloat16)
    ctx_null = torch.randn(1, 512, 4096, generator=g).to(dev, torch.bfloat16)
    return x, torch.tensor([500.0], device=dev), ctx, ctx_null


def rel(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return ((a - b).norm() / b.norm()).item(), (a @ b / (a.norm() * b.norm())).item()


def check_lse_backends(dev):
    """Each LSE attention on this GPU against the float32 reference (bf16 inputs)."""
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, 1000, 8, 128, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    ref, ref_lse = lse_attention_math(q, k, v)
    for name, fn in LSE_BACKENDS.items():
        if name in ("math", "cpu_flash"):
            continue
        try:
            out, lse = fn(q, k, v)
            RESULTS[f"lse_{name}_out_rel"], _ = rel(out, ref)
            RESULTS[f"lse_{name}_lse_maxabs"] = (lse - ref_lse).abs().max().item()
            log(f"LSE attention {name}: out rel {RESULTS[f'lse_{name}_out_rel']:.2e}, lse max abs {RESULTS[f'lse_{name}_lse_maxabs']:.2e}")
        except Exception as e:  # report, do not stop the benchmark
            RESULTS[f"lse_{name}_error"] = repr(e)[:300]
            log(f"LSE attention {name}: {e!r}"[:300])


def record(mode, res, gpus, t, all_t, base=None, err=None, unit="forward"):
    peak = torch.cuda.max_memory_allocated() / 2**30
    key = f"{mode}_{res}"
    RESULTS[f"{key}_s"] = t
    RESULTS[f"{key}_all_s"] = all_t
    RESULTS[f"{key}_peak_GiB"] = peak
    speed = base / t if base else 1.0
    RESULTS[f"{key}_speedup"] = speed
    if err is not None:
        RESULTS[f"{key}_rel_err_vs_1gpu"], RESULTS[f"{key}_cos_vs_1gpu"] = err
    ROWS.append((mode, res, gpus, unit, t, speed, err, peak))
    if dist.get_rank() == 0:  # written as we go, so a run cut short still leaves its numbers
        with open(os.path.join(os.environ.get("OUT", "."), "bench_parallel.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)
    e = f", vs 1 GPU rel {err[0]:.2e} cos {err[1]:.6f}" if err else ""
    log(f"{mode:14s} {res} {gpus} GPU: {t:.3f} s/{unit} {[f'{v:.3f}' for v in all_t]} {speed:.2f}x{e}, peak {peak:.1f} GiB")


def workers_smoke(n: int = 2) -> None:
    """The node's worker group on n GPUs (NCCL), a tiny model from a file: start, two runs,
    cancel, a killed worker, restart. Run with plain python (not torchrun). Prints timings."""
    import signal
    import tempfile

    from wan_core.layers.parallel.workers import RunCancelled, SampleRequest, WorkerGroup, WorkerGroupError
    from wan_core.loading.dit import save_dit
    from wan_core.model_cache import lease
    from wan_core.sampling.loop import make_noise, sample
    from wan_core.sampling.schedulers import make_scheduler
    from wan_core.spec import ModelSpec

    cfg = PRESETS["t2v-1.3b"].replace(num_layers=2)
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        names = build_model(cfg, None, dtype=torch.float32, device="meta").state_dict()
    sd = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in names.items()}
    path = save_dit(sd, os.path.join(tempfile.mkdtemp(), "dit"), layout="single", cfg=cfg)
    spec = ModelSpec(dit=path, task="t2v", device="cuda", dtype="fp32", attention="sdpa")
    req = SampleRequest(make_noise((1, 16, 5, 30, 52), seed=1), make_scheduler("unipc", 4, 5.0),
                        Cond([torch.randn(20, 4096, generator=g)]), Cond([torch.randn(5, 4096, generator=g)]), 5.0)  # fmt: skip
    with torch.no_grad(), lease(spec.replace(device="cuda:0")) as dit:
        ref = sample(dit, req.noise.cuda(), make_scheduler("unipc", 4, 5.0),
                     Cond([c.cuda() for c in req.cond.context]), Cond([c.cuda() for c in req.uncond.context]), 5.0).cpu()  # fmt: skip
    out = {}
    for pc in ({"cfg": 2}, {"ulysses": 2}, {"ring": 2}):
        grp = WorkerGroup(n, pc, device="cuda")
        t0 = time.time()
        grp.start()
        out[f"{pc} start_s"] = time.time() - t0
        for i in range(2):
            t0 = time.time()
            lat, _ = grp.run(spec, req)
            out[f"{pc} run{i}_s"] = time.time() - t0
            e = ((lat - ref).norm() / ref.norm()).item()
            out[f"{pc} run{i}_rel_err"] = e
            assert e < 1e-3, (pc, e)
        try:
            grp.run(spec, req, cancel=lambda: True)
        except RunCancelled:
            out[f"{pc} cancel"] = "ok"
        pids = grp.pids
        if "cfg" not in pc:
            grp.close()
            out[f"{pc} leftover_pids"] = [p for p in pids if os.path.exists(f"/proc/{p}")]
            continue
        os.kill(pids[1], signal.SIGKILL)
        try:
            grp.run(spec, req)
        except WorkerGroupError as err:
            out[f"{pc} kill"] = str(err)[:120]
        lat, _ = grp.run(spec, req)
        out[f"{pc} after_restart_rel_err"] = ((lat - ref).norm() / ref.norm()).item()
        grp.close()
        out[f"{pc} leftover_pids"] = [p for p in pids if os.path.exists(f"/proc/{p}")]
    RESULTS["workers_smoke"] = out
    for k, v in out.items():
        print(f"workers {k}: {v}", flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "bench_parallel_workers.json"), "w") as f:
        json.dump(out, f, indent=1)


def main():
    if "--workers-smoke" in sys.argv:
        return workers_smoke()
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", default="480p,720p")
    ap.add_argument("--cfg-res", default="480p,720p")
    ap.add_argument("--modes", default="ulysses,ring,cfg",
                    help="ulysses, ring, hybrid (Ulysses 2 x Ring N/2), cfg (CFG 2 x Ulysses N/2), ulysses_nooverlap, "
                    "fast (FP8 linears + 8-bit self-attention: 1 GPU and Ulysses N, 480p; last: quantises the model)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--ring-attention", default="auto")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="fewer blocks (quick trials; not the reported setup)")
    args = ap.parse_args()
    t_start = time.time()
    dev = init_process_group("cuda")
    world = dist.get_world_size()
    resolutions = [r for r in args.res.split(",") if r]
    cfg_res = [r for r in args.cfg_res.split(",") if r]
    modes = [m for m in args.modes.split(",") if m]
    out_dir = os.environ.get("OUT", ".")
    cfg = PRESETS["t2v-14b"]
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    RESULTS.update(device=torch.cuda.get_device_name(dev), gpus=world, torch=torch.__version__, compile=not args.no_compile,
                   layers=cfg.num_layers, cudnn=torch.backends.cudnn.version())  # fmt: skip
    log("torch", torch.__version__, "cuda", torch.version.cuda, RESULTS["device"], "x", world)
    check_lse_backends(dev)

    # ---- the same random 14B weights on every rank ------------------------------------------------
    t0 = time.time()
    model = build_model(cfg, None, dtype=torch.bfloat16, device=dev)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.set_attention(args.attention, device=dev)
    probe = torch.stack([p.float().sum() for p in list(model.parameters())[:8]])
    probes = [torch.empty_like(probe) for _ in range(world)]
    dist.all_gather(probes, probe)
    assert all(torch.equal(probes[0], p) for p in probes), "ranks built different weights"
    if not args.no_compile:
        model.set_block_ops("auto", device=dev)  # the fused ops, as a CUDA build chooses
        compile_blocks(model)
    RESULTS["build_s"] = time.time() - t0
    log(f"built {cfg.num_layers}-block 14B DiT in {RESULTS['build_s']:.1f} s, attention {model.blocks[0].self_attn.attn_fn.backend_name}")

    base: dict = {}
    ref_out: dict = {}
    with torch.inference_mode():
        # ---- 1 GPU ----------------------------------------------------------------------------
        for res in resolutions:
            x, t, ctx, _ = inputs(SHAPES[res], dev)
            torch.cuda.reset_peak_memory_stats(dev)
            t1 = time.time()
            ref_out[res] = model(x, t, ctx).float()
            RESULTS[f"first_forward_1gpu_{res}_s"] = time.time() - t1
            tm, all_t = timeit(lambda x=x, t=t, ctx=ctx: model(x, t, ctx), dev, warm=0, reps=args.reps)
            base[("fwd", res)] = tm
            record("1gpu", res, 1, tm, all_t)
            if res not in ("480p",):
                ref_out.pop(res)
        # ---- sequence parallel ----------------------------------------------------------------
        for mode in [m for m in modes if m in ("ulysses", "ulysses_nooverlap", "ring", "hybrid")]:
            if mode == "hybrid" and (world < 4 or world % 2):
                log(f"hybrid needs an even world of 4 or more GPUs, not {world}: skipped")
                continue
            pc = {
                "ulysses": ParallelConfig(ulysses=world),
                "ulysses_nooverlap": ParallelConfig(ulysses=world, ulysses_chunks=1),
                "ring": ParallelConfig(ring=world, ring_attention=args.ring_attention),
                "hybrid": ParallelConfig(ulysses=2, ring=world // 2, ring_attention=args.ring_attention),
            }[mode]
            mode = {"hybrid": f"ulysses2xring{world // 2}"}.get(mode, mode)
            try:
                groups = build_groups(pc, cfg.num_heads)
                enable_sequence_parallel(model, groups)
                for res in resolutions:
                    x, t, ctx, _ = inputs(SHAPES[res], dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                    t1 = time.time()
                    out = model(x, t, ctx).float()
                    RESULTS[f"first_forward_{mode}_{res}_s"] = time.time() - t1
                    err = rel(out, ref_out[res]) if res in ref_out else None
                    del out
                    tm, all_t = timeit(lambda x=x, t=t, ctx=ctx: model(x, t, ctx), dev, warm=0, reps=args.reps)
                    record(mode, res, world, tm, all_t, base[("fwd", res)], err)
            except Exception:
                traceback.print_exc()
                RESULTS[f"{mode}_error"] = traceback.format_exc()[-1500:]
            finally:
                disable_sequence_parallel(model)
        # ---- CFG parallel, per sampling step (two DiT evaluations) -------------------------------
        if "cfg" in modes and world % 2 == 0:
            pc = ParallelConfig(cfg=2, ulysses=world // 2)
            groups = build_groups(pc, cfg.num_heads)
            predict = cfg_parallel_predict(groups)
            name = "cfg_parallel" if pc.sp == 1 else f"cfg2xulysses{pc.sp}"
            for res in cfg_res:
                x, t, ctx, ctx_null = inputs(SHAPES[res], dev)
                cond, uncond = Cond(ctx), Cond(ctx_null)
                torch.cuda.reset_peak_memory_stats(dev)
                one = guided_velocity(model, x, t, cond, uncond, 5.0)
                step_1 = lambda x=x, t=t, c=cond, u=uncond: guided_velocity(model, x, t, c, u, 5.0)  # noqa: E731
                tm, all_t = timeit(step_1, dev, warm=0, reps=args.reps)
                record("1gpu_step", res, 1, tm, all_t, unit="step")
                if pc.sp > 1:  # each CFG branch's evaluation split over its half of the GPUs
                    enable_sequence_parallel(model, groups)
                try:
                    two = predict(model, x, t, cond, uncond, 5.0)
                    err = rel(two, one)
                    del one, two
                    step_2 = lambda x=x, t=t, c=cond, u=uncond: predict(model, x, t, c, u, 5.0)  # noqa: E731
                    tm2, all_t2 = timeit(step_2, dev, warm=0, reps=args.reps)
                    record(name, res, world, tm2, all_t2, tm, err, unit="step")
                finally:
                    disable_sequence_parallel(model)

        # ---- fast mode (FP8 linears + 8-bit self-attention), 1 GPU and Ulysses N, per forward --------
        if "fast" in modes:
            try:
                from wan_core.layers.fp8 import quantize_model

                torch._dynamo.reset()
                quantize_model(model, kernel="auto")
                model.set_attention("sage_triton", device=dev)
                if not args.no_compile:
                    model.set_block_ops("auto", device=dev)  # the fused ops, as a CUDA build chooses
                    compile_blocks(model)
                torch.cuda.empty_cache()
                res = "480p"
                x, t, ctx, _ = inputs(SHAPES[res], dev)
                torch.cuda.reset_peak_memory_stats(dev)
                fast_ref = model(x, t, ctx).float()
                tm, all_t = timeit(lambda: model(x, t, ctx), dev, warm=0, reps=args.reps)
                record("1gpu_fast", res, 1, tm, all_t)
                enable_sequence_parallel(model, build_groups(ParallelConfig(ulysses=world), cfg.num_heads))
                try:
                    torch.cuda.reset_peak_memory_stats(dev)
                    err = rel(model(x, t, ctx).float(), fast_ref)
                    tm2, all_t2 = timeit(lambda: model(x, t, ctx), dev, warm=0, reps=args.reps)
                    record(f"ulysses{world}_fast", res, world, tm2, all_t2, tm, err)
                finally:
                    disable_sequence_parallel(model)
            except Exception:
                traceback.print_exc()
                RESULTS["fast_error"] = traceback.format_exc()[-1500:]

    RESULTS["total_s"] = time.time() - t_start
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "bench_parallel.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)
    log(f"\ntotal {RESULTS['total_s']:.0f} s")
    log(f"{'mode':14s} {'res':5s} {'GPUs':>4s} {'seconds':>12s} {'speedup':>8s} {'rel err vs 1 GPU':>17s} {'peak GiB':>9s}")
    for mode, res, gpus, unit, t, speed, err, peak in ROWS:
        e = f"{err[0]:.2e}" if err else "-"
        log(f"{mode:14s} {res:5s} {gpus:4d} {t:7.3f}/{unit:4s} {speed:7.2f}x {e:>17s} {peak:9.1f}")
    dist.barrier(device_ids=[dev.index])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
