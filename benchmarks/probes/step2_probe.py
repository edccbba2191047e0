"""Probe: pipeline inputs (float32 latent, 12 text tokens) vs bench_dit's (bf16 latent, 512 random
tokens) for fast@fa3_fp8 480p: each combination timed in alternation, then per-kernel diff."""
import os, sys, time, collections
import torch
sys.path.insert(0, os.getcwd())
from benchmarks.bench_e2e import random_dit
from benchmarks.bench_dit import inputs, SHAPES
m = random_dit("fast@fa3_fp8")
xb, t, ctxb = inputs(SHAPES["480p"])
g = torch.Generator(device="cuda").manual_seed(1)
x32 = torch.randn(1, 16, 21, 60, 104, device="cuda", generator=g)
ctxl = [torch.randn(12, 4096, device="cuda", generator=g, dtype=torch.bfloat16)]
print("ctxb", type(ctxb), getattr(ctxb, "shape", None) or [c.shape for c in ctxb], "xb", xb.dtype, xb.shape)
combos = {"x32+ctx12": (x32, ctxl), "xbf16+ctx12": (xb, ctxl), "x32+ctx512": (x32, ctxb), "xbf16+ctx512": (xb, ctxb)}
res = collections.defaultdict(list)
with torch.no_grad():
    for k, (x, c) in combos.items():
        m(x, t, c)
    torch.cuda.synchronize()
    for rep in range(3):
        for k, (x, c) in combos.items():
            torch.cuda.synchronize(); t0 = time.perf_counter(); m(x, t, c); torch.cuda.synchronize()
            res[k].append(time.perf_counter() - t0)
    from torch.profiler import profile, ProfilerActivity
    prof_k = {}
    for k in ("x32+ctx12", "xbf16+ctx512"):
        x, c = combos[k]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m(x, t, c); torch.cuda.synchronize()
        prof_k[k] = {e.key: (e.self_device_time_total / 1e3, e.count) for e in prof.key_averages() if e.self_device_time_total > 0}
a, b = prof_k["x32+ctx12"], prof_k["xbf16+ctx512"]
diffs = sorted(((a.get(k, (0, 0))[0] - b.get(k, (0, 0))[0], k) for k in set(a) | set(b)), key=lambda d: -abs(d[0]))[:12]
print("\nkernel ms: pipeline inputs minus bench inputs (largest differences)")
for d, k in diffs:
    print(f"  {d:+8.2f} ms  {a.get(k, (0, 0))[0]:8.2f} vs {b.get(k, (0, 0))[0]:8.2f}  n={a.get(k, (0, 0))[1]}/{b.get(k, (0, 0))[1]}  {k[:80]}")
print("\nper-forward wall s, 3 alternating runs each")
for k, v in res.items():
    print(f"  {k:14s} " + " ".join(f"{s:.4f}" for s in v) + f"   median {sorted(v)[1]:.4f}")
