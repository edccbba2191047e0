"""CPU offload of the Wan2.1-14B T2V DiT on one GPU: time per forward and peak VRAM.

  python benchmarks/bench_offload.py [--res 480p] [--resident 0,8] [--budget 14] [--fp8-budget 10]
                                     [--reps 2] [--no-fp8] [--no-compile]

Random weights (speed does not depend on values), made on the GPU one tensor at a time and kept
in host memory: the whole model is on the GPU only for the resident baseline. Rows, per dtype:
- resident: no offload, the whole DiT on the GPU (`model.to("cuda")`);
- block R=N: block offload, the first N blocks resident, the others streamed through a ring of
  2 slots (prefetch 1) from pinned host memory;
- block budget=X: `vram_budget_gb=X` for this run's token count (the resident count it chose is
  in the table);
- model: model offload; s/forward is the loop's (the weights are on the GPU), `load s` is the
  one copy of the DiT onto the GPU a run pays before its loop.
FP8 rows (when `wan_core.layers.fp8` exists): the block linears quantised per block on the GPU
(per-channel e4m3, the `auto` kernel), then the same rows. Blocks compiled as in production
(`compile_blocks`) unless --no-compile. Also printed: the host->device bandwidth of one block
from pinned memory, and whether each output equals its resident baseline bitwise.
Peaks are `torch.cuda.max_memory_allocated` over the timed forwards (inputs included).
Prints a table last; JSON to $OUT/bench_offload.json (or ./bench_offload.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench_dit import SHAPES, inputs, log, timeit  # noqa: E402

from wan_core.layers.compile import compile_blocks  # noqa: E402
from wan_core.layers.offload import GiB, activation_bytes, enable_offload, weight_sizes  # noqa: E402
from wan_core.loading.dit import build_model  # noqa: E402
from wan_core.models.config import PRESETS  # noqa: E402

RESULTS: dict = {}
ROWS: list[dict] = []
T0 = time.time()
TIME_LIMIT_S = 420  # stop adding rows past 7 minutes (the whole run must stay under 8)


def random_host_model(cfg, dtype=torch.bfloat16):
    """The DiT with random weights in (pageable) host memory, never whole on the GPU."""
    model = build_model(cfg, None, dtype=dtype, device="meta")
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            for name, p in mod._parameters.items():
                if p is None:
                    continue
                t = torch.empty(p.shape, dtype=p.dtype, device="cuda")
                t.normal_(0, 0.02, generator=g)
                mod._parameters[name] = nn.Parameter(t.cpu(), requires_grad=False)
    return model


def quantize_blocks_on_gpu(model) -> bool:
    """FP8 block linears (wan_core.layers.fp8), one block at a time on the GPU; False if FP8 is not there."""
    try:
        from wan_core.layers.fp8 import FP8Linear, is_block_linear, set_fp8_kernel
    except ImportError:
        return False
    for i, blk in enumerate(model.blocks):
        blk.to("cuda")
        for name, mod in list(blk.named_modules()):
            if isinstance(mod, nn.Linear) and is_block_linear(f"blocks.{i}.{name}"):
                parent, _, child = name.rpartition(".")
                setattr(blk.get_submodule(parent) if parent else blk, child, FP8Linear.from_linear(mod))
        blk.to("cpu")
    RESULTS["fp8_kernel"] = set_fp8_kernel(model, "auto", device="cuda")
    return True


def out_of_time() -> bool:
    if time.time() - T0 > TIME_LIMIT_S:
        log(f"-- {time.time() - T0:.0f} s elapsed: skipping the remaining rows")
        return True
    return False


def measure(label, dtype_name, model, grid, reps, refs, resident=None, load_s=None):
    x, t, ctx = inputs(grid)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        tm, all_t = timeit(lambda: model(x, t, ctx), warm=1, reps=reps)
        out = model(x, t, ctx).float().cpu()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / GiB
    if label == "resident":
        refs[dtype_name] = (out, tm)
    ref_out, ref_t = refs.get(dtype_name, (None, None))
    row = dict(
        config=label,
        dtype=dtype_name,
        resident=resident,
        s=tm,
        all_s=all_t,
        slowdown=(tm / ref_t - 1) if ref_t else None,
        peak_GiB=peak,
        load_s=load_s,
        equal=bool(torch.equal(out, ref_out)) if ref_out is not None else None,
        max_diff=float((out - ref_out).abs().max()) if ref_out is not None else None,
    )
    ROWS.append(row)
    log(
        f"{dtype_name:5s} {label:22s} resident={resident} {tm:.3f}s {[f'{v:.3f}' for v in all_t]} peak {peak:.2f} GiB "
        f"equal={row['equal']} ({time.time() - T0:.0f} s elapsed)"
    )
    return row


def h2d_bandwidth(handle) -> float:
    g = handle.block_groups[0]
    buf = torch.empty(g.nbytes, dtype=torch.uint8, device="cuda")
    buf.copy_(g.host, non_blocking=True)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(5):
        buf.copy_(g.host, non_blocking=True)
    e.record()
    torch.cuda.synchronize()
    return 5 * g.nbytes / (s.elapsed_time(e) / 1e3) / 1e9


def run_rows(model, dtype_name, grid, tokens, residents, budget, reps, refs):
    """resident, block R=..., block budget, model offload for one weight format."""
    try:
        model.to("cuda")
        measure("resident", dtype_name, model, grid, reps, refs, resident=len(model.blocks))
    except Exception:
        traceback.print_exc()
        RESULTS[f"{dtype_name}_resident_error"] = traceback.format_exc()[-800:]
    model.to("cpu")
    gc.collect()
    torch.cuda.empty_cache()
    if out_of_time():
        return
    t0 = time.time()
    handle = enable_offload(model, "block", resident_blocks=0, device="cuda")
    RESULTS[f"{dtype_name}_pack_s"] = time.time() - t0
    RESULTS[f"{dtype_name}_block_GiB"] = handle.block_groups[0].nbytes / GiB
    RESULTS[f"{dtype_name}_h2d_GBps"] = h2d_bandwidth(handle)
    log(
        f"{dtype_name}: packed into pinned memory in {RESULTS[f'{dtype_name}_pack_s']:.1f} s; one block "
        f"{RESULTS[f'{dtype_name}_block_GiB']:.3f} GiB, H2D {RESULTS[f'{dtype_name}_h2d_GBps']:.1f} GB/s"
    )
    for r in residents:
        if out_of_time():
            break
        handle.set_resident_blocks(r)
        measure(f"block R={r}", dtype_name, model, grid, reps, refs, resident=r)
    handle.remove()
    if budget and not out_of_time():
        handle = enable_offload(model, "block", vram_budget_gb=budget, tokens=tokens, device="cuda")
        RESULTS[f"{dtype_name}_budget_plan"] = handle.plan.describe()
        log(f"{dtype_name} budget {budget} GiB: {handle.plan.describe()}")
        row = measure(f"block budget={budget:g}", dtype_name, model, grid, reps, refs, resident=handle.resident_blocks)
        row["within_budget"] = row["peak_GiB"] <= budget
        handle.remove()
    if not out_of_time():
        handle = enable_offload(model, "model", device="cuda")
        torch.cuda.synchronize()
        t0 = time.time()
        handle.load()
        torch.cuda.synchronize()
        load_s = time.time() - t0
        measure("model", dtype_name, model, grid, reps, refs, resident=len(model.blocks), load_s=load_s)
        handle.remove()
    gc.collect()
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", default="480p", choices=sorted(SHAPES))
    ap.add_argument("--resident", default="0,8", help="resident block counts for the block rows")
    ap.add_argument("--budget", type=float, default=14.0, help="bf16 VRAM budget row (GiB); 0: none")
    ap.add_argument("--fp8-budget", type=float, default=10.0, help="FP8 VRAM budget row (GiB); 0: none")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-fp8", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    cfg = PRESETS["t2v-14b"]
    grid = SHAPES[args.res]
    tokens = grid[0] * (grid[1] // 2) * (grid[2] // 2)
    residents = [int(r) for r in args.resident.split(",") if r]
    log("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
    RESULTS.update(device=torch.cuda.get_device_name(), torch=torch.__version__, res=args.res, tokens=tokens)

    model = random_host_model(cfg)
    model.set_attention("auto", device="cuda")
    if not args.no_compile:
        model.set_block_ops("auto", device="cuda")  # the fused ops, as a CUDA build chooses
        compile_blocks(model)
    rest, blocks = weight_sizes(model)
    RESULTS["activation_estimate_GiB"] = activation_bytes(model, tokens) / GiB
    log(
        f"built on the host in {time.time() - T0:.0f} s: rest {rest / GiB:.2f} GiB, {len(blocks)} blocks of {blocks[0] / GiB:.3f} GiB"
    )
    refs: dict = {}
    run_rows(model, "bf16", grid, tokens, residents, args.budget, args.reps, refs)
    if not args.no_fp8 and not out_of_time():
        t0 = time.time()
        try:
            if quantize_blocks_on_gpu(model):
                log(f"FP8 blocks ({RESULTS['fp8_kernel']}) in {time.time() - t0:.0f} s")
                run_rows(model, "fp8", grid, tokens, residents[:1], args.fp8_budget, args.reps, refs)
            else:
                log("wan_core.layers.fp8 not available: no FP8 rows")
        except Exception:
            traceback.print_exc()
            RESULTS["fp8_error"] = traceback.format_exc()[-800:]
    RESULTS["rows"] = ROWS
    RESULTS["total_s"] = time.time() - T0
    with open(os.path.join(os.environ.get("OUT", "."), "bench_offload.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    log(
        f"\nWan2.1-14B T2V DiT, {args.res} ({tokens} tokens), {RESULTS['device']}, compile={not args.no_compile}, total {RESULTS['total_s']:.0f} s"
    )
    log(
        f"{'dtype':5s} {'config':22s} {'resident':>8s} {'s/forward':>10s} {'vs resident':>11s} {'peak GiB':>9s} {'load s':>7s} {'equal':>6s}"
    )
    for r in ROWS:
        slow = f"{100 * r['slowdown']:+.1f}%" if r["slowdown"] is not None else "-"
        load = f"{r['load_s']:.2f}" if r["load_s"] is not None else "-"
        log(
            f"{r['dtype']:5s} {r['config']:22s} {r['resident']:>8} {r['s']:10.3f} {slow:>11s} {r['peak_GiB']:9.2f} "
            f"{load:>7s} {str(r['equal']):>6s}"
        )


if __name__ == "__main__":
    main()
