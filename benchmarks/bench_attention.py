"""Self-attention at Wan2.1-14B's shapes (40 heads of 128, 480p: 32,760 tokens; 720p: 75,600):
cuDNN / flash SDPA in bf16 vs our 8-bit Triton kernel (wan_core/sage_attention.py), with INT8 or
FP8 Q·Kᵀ, timed kernel-only (inputs already quantised) and whole (quantisation included,
compiled as it runs inside a compiled block), with the error against cuDNN's bf16 output.

  python benchmarks/bench_attention.py [--res 480p,720p]

Prints a table last; writes $OUT/bench_attention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_dit import timeit  # noqa: E402
from wan_core.kernels import sage_attention as sa  # noqa: E402
from wan_core.kernels import sage_kernel  # noqa: E402
from wan_core.kernels.attention import get_attention  # noqa: E402

TOKENS = {"480p": 32760, "720p": 75600}


def bench(fn) -> float:
    return timeit(fn, warm=2, reps=10)[0]  # median seconds, CUDA events


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", default="480p,720p")
    ap.add_argument("--quick", action="store_true", help="480p, cuDNN vs sage_triton's kernel variants only")
    args = ap.parse_args()
    R = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    R["triton"] = triton.__version__
    rows = []
    h, d = 40, 128
    names = ("sdpa_cudnn", "sage_triton") if args.quick else ("sdpa_cudnn", "sdpa_flash", "sage_triton", "sage_triton_int8")
    for res in ("480p",) if args.quick else args.res.split(","):
        L = TOKENS[res]
        flop = 4 * L * L * d * h
        g = torch.Generator(device="cuda").manual_seed(0)
        # q/k like the model's after RMSNorm + RoPE (unit scale), keys with a shared channel bias
        q = torch.randn(1, L, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = (torch.randn(1, L, h, d, device="cuda", generator=g) + torch.randn(1, 1, h, d, device="cuda", generator=g)).bfloat16()
        v = torch.randn(1, L, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
        ref = None
        for name in names:
            fn = get_attention(name, "cuda")
            out = fn(q, k, v)
            if ref is None:
                ref = out.float()
            c = F.cosine_similarity(out.float().flatten(), ref.flatten(), 0).item()
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            t = bench(lambda fn=fn, a=(q, k, v): fn(*a))
            rows.append(dict(res=res, name=name + " (eager)", s=t, tflops=flop / t / 1e12, cos=c, rel=rel))
            print(rows[-1], flush=True)
            if not name.startswith("sage"):
                continue
            cfn = torch.compile(fn, fullgraph=True, dynamic=False)
            cfn(q, k, v)
            t = bench(lambda cfn=cfn, a=(q, k, v): cfn(*a))
            rows.append(dict(res=res, name=name + " (compiled)", s=t, tflops=flop / t / 1e12, cos=c, rel=rel))
            print(rows[-1], flush=True)
            packed = sa.quantize(q, k, v, qk_int8=name == "sage_triton_int8")
            if args.quick:  # (tma, pipeline, warp specialisation)
                combos = [(True, False, False), (True, True, False), (True, False, True)]
            elif res == "480p":
                combos = [(True, True, False), (True, False, False), (False, True, False), (False, False, False),
                          (True, False, True)]
            else:
                combos = [(None, None, None)]
            for tma, pipe, ws in combos:
                try:
                    o = sa._launch(*packed, L, L, torch.bfloat16, use_tma=tma, pipeline=pipe, warp_spec=ws).float()
                    c2 = F.cosine_similarity(o.flatten(), ref.flatten(), 0).item()
                    t = bench(lambda packed=packed, n=L, kw=dict(use_tma=tma, pipeline=pipe, warp_spec=ws):
                              sa._launch(*packed, n, n, torch.bfloat16, **kw))
                    best = str(sage_kernel.attn_fwd_tuned.best_config).split(", num_ctas")[0]
                    rel2 = ((o - ref).norm() / ref.norm()).item()
                    rows.append(dict(res=res, name=f"{name} kernel tma={tma} pipe={pipe} ws={ws}", s=t,
                                     tflops=flop / t / 1e12, cos=c2, rel=rel2, config=best, tma=tma, pipe=pipe, ws=ws,
                                     qk=name))
                except Exception as e:  # a variant that fails to compile is reported, not fatal
                    rows.append(dict(res=res, name=f"{name} kernel tma={tma} pipe={pipe} ws={ws}", s=float("nan"),
                                     tflops=0.0, cos=0.0, rel=0.0, config=repr(e)[:200]))
                print(rows[-1], flush=True)
            if res == "480p":  # the fastest FP8 variant becomes the default for what follows
                fast = [r for r in rows if r.get("qk") == name and r["tflops"] > 0]
                if fast and name == "sage_triton":
                    top = max(fast, key=lambda r: r["tflops"])
                    sa.KERNEL_OPTIONS.update(use_tma=top["tma"], pipeline=top["pipe"], warp_spec=top["ws"])
                    R["best_options"] = dict(sa.KERNEL_OPTIONS)
                    print("best", R["best_options"], flush=True)
        q = k = v = ref = packed = None
        torch.cuda.empty_cache()
    R["rows"] = rows
    with open(os.path.join(os.environ.get("OUT", "."), "bench_attention.json"), "w") as f:
        json.dump(R, f, indent=1)
    if "best_options" in R:  # read by bench_dit.py --sage-options
        with open(os.path.join(os.environ.get("OUT", "."), "sage_options.json"), "w") as f:
            json.dump(R["best_options"], f)
    print(f"\n{R['device']}, torch {R['torch']}, triton {R['triton']}: self-attention, 1x40 heads x 128")
    print(f"{'res':5s} {'backend':46s} {'ms':>8s} {'TFLOP/s':>8s} {'cos vs cuDNN':>13s} {'rel err':>8s}")
    for r in rows:
        print(f"{r['res']:5s} {r['name']:46s} {r['s'] * 1e3:8.1f} {r['tflops']:8.0f} {r['cos']:13.5f} {r['rel']:8.4f} {r.get('config', '')}")


if __name__ == "__main__":
    main()
