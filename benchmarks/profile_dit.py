"""Where a 14B forward (480p, or `--res 720p`) spends its time: one compiled forward under
torch.profiler, kernels grouped into attention / GEMM / other, top kernels listed. Variants as
bench_dit.py's compiled ones (bf16, fp8, fast; "fast@radial_attn": the 8-bit sparse kernel); the
output's cosine similarity to bf16's (same weights and inputs); a "+res16" suffix keeps the residual
stream in bf16 (`WanModel.set_residual_dtype`).

  python benchmarks/profile_dit.py [--variants fast,bf16] [--res 480p]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dit as bd  # noqa: E402

from wan_core.layers.compile import compile_blocks  # noqa: E402
from wan_core.layers.fp8 import quantize_model  # noqa: E402
from wan_core.loading.dit import build_model  # noqa: E402
from wan_core.models.config import PRESETS  # noqa: E402


def group(name: str) -> str:
    n = name.lower()
    if "attn" in n or "fmha" in n or "flash" in n or "sdpa" in n or "cudnn" in n:
        return "attention"
    if "gemm" in n or "sm90" in n or "cutlass" in n or "matmul" in n or "xmma" in n or "nvjet" in n:
        return "gemm"
    if n.startswith("triton"):
        return "triton (fused elementwise)"
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="fast,bf16")
    ap.add_argument("--res", default="480p", choices=sorted(bd.SHAPES), help="the token layout (720p: 75,600 tokens)")
    args = ap.parse_args()
    cfg = PRESETS["t2v-14b"]
    outs = {}
    for variant in args.variants.split(","):
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = build_model(cfg, None, dtype=torch.bfloat16, device="cuda")
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.02)
        base, _, attn = variant.replace("+res16", "").partition("@")  # "fast@fa3_fp8": another self-attention backend
        radial = None
        if attn == "radial_attn":  # the options the model cache gives: the 8-bit sparse kernel on an FP8 DiT
            from wan_core.kernels.radial_attention import for_model

            radial = for_model(None, base != "bf16", "cuda")
        m.set_attention(attn or ("sage_triton" if base == "fast" else "sdpa_cudnn"), radial=radial)
        if base != "bf16":
            quantize_model(m, kernel="auto")
        m.set_block_ops("auto")  # the fused ops, as a CUDA build chooses
        if "+res16" in variant:
            m.set_residual_dtype(torch.bfloat16)
        compile_blocks(m)
        x, t, c = bd.inputs(bd.SHAPES[args.res])
        with torch.inference_mode():
            for _ in range(2):
                outs[variant] = m(x, t, c).float().cpu()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                m(x, t, c)
                torch.cuda.synchronize()
        totals: dict[str, float] = {}
        kernels: dict[str, float] = {}
        for e in prof.key_averages():
            us = e.self_device_time_total
            if us <= 0:
                continue
            totals[group(e.key)] = totals.get(group(e.key), 0.0) + us
            kernels[e.key] = kernels.get(e.key, 0.0) + us
        total = sum(totals.values())
        print(f"\n== {variant}: {total / 1e6:.3f} s of GPU kernels in one {args.res} forward")
        for g, us in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"  {g:28s} {us / 1e6:7.3f} s  {100 * us / total:5.1f} %")
        for k, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:18]:
            print(f"    {us / 1e3:9.1f} ms  {k[:110]}")
        del m
        gc.collect()
        torch.cuda.empty_cache()
    for v, o in outs.items():
        if v != "bf16" and "bf16" in outs:
            print(f"cos({v}, bf16) on the same weights and inputs: {bd.cos(o, outs['bf16']):.5f}")


if __name__ == "__main__":
    main()
