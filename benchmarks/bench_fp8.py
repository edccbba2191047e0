"""Full-size Wan2.1-14B T2V DiT forward, bf16 vs FP8 block linears, in one run on one GPU.

Random weights (speed does not depend on values), the same weights for both: the bf16 model is
timed, then quantised in place (`quantize_model`, per-channel weight scales) and timed with each
FP8 kernel; output cosine similarity to the bf16 output and peak memory are recorded. With
--compile, the FP8 model is also timed with compiled blocks, then a bf16 model with the same
weights is rebuilt and timed compiled (the default path on CUDA). Timing helpers are
bench_dit.py's.

  python benchmarks/bench_fp8.py [--res 480p] [--kernels scaled_mm,scaled_mm_fast[,sgl]] [--compile]

Prints a table last; writes JSON to $OUT/bench_fp8.json (or ./bench_fp8.json).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dit as bd  # noqa: E402  (also puts the repository root on sys.path)

from wan_core.layers.compile import compile_blocks  # noqa: E402
from wan_core.layers.fp8 import quantize_model, set_fp8_kernel  # noqa: E402
from wan_core.loading.dit import build_model  # noqa: E402
from wan_core.models.config import PRESETS  # noqa: E402


def random_model(cfg, attention):
    torch.manual_seed(0)
    m = build_model(cfg, None, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    m.set_attention(attention)
    return m


def gib() -> float:
    return torch.cuda.memory_allocated() / 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", default="480p")
    ap.add_argument("--kernels", default="scaled_mm,scaled_mm_fast")
    ap.add_argument("--attention", default="sdpa_cudnn")
    ap.add_argument("--compile", action="store_true", help="also time both with compiled blocks")
    args = ap.parse_args()
    resolutions = [r for r in args.res.split(",") if r]
    kernels = [k for k in args.kernels.split(",") if k]
    cfg = PRESETS["t2v-14b"]
    R = bd.RESULTS
    bd.log("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
    R.update(device=torch.cuda.get_device_name(), torch=torch.__version__, attention=args.attention)
    outs = {}

    m = random_model(cfg, args.attention)
    R["bf16_weights_GiB"] = gib()
    outs["bf16"] = bd.run_model("bf16", m, cfg, resolutions)

    t0 = time.time()
    quantize_model(m, kernel=kernels[0])
    torch.cuda.synchronize()
    R["quantize_s"] = time.time() - t0
    gc.collect()
    torch.cuda.empty_cache()
    R["fp8_weights_GiB"] = gib()
    bd.log(
        f"weights: bf16 {R['bf16_weights_GiB']:.1f} GiB -> fp8 {R['fp8_weights_GiB']:.1f} GiB ({R['quantize_s']:.1f} s)"
    )
    for k in kernels:
        try:
            set_fp8_kernel(m, k)
            outs[f"fp8_{k}"] = bd.run_model(f"fp8[{k}]", m, cfg, resolutions)
        except Exception:
            traceback.print_exc()
            R[f"fp8_{k}_error"] = traceback.format_exc()[-800:]
    if args.compile:
        try:
            set_fp8_kernel(m, kernels[0])
            m.set_block_ops("auto")  # the fused ops, as a CUDA build chooses
            compile_blocks(m)
            outs["fp8_compiled"] = bd.run_model(f"fp8[{kernels[0]}]+compile", m, cfg, resolutions)
        except Exception:
            traceback.print_exc()
            R["fp8_compile_error"] = traceback.format_exc()[-800:]
        del m
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
        m = random_model(cfg, args.attention)  # same seed: the same weights as the bf16 run
        m.set_block_ops("auto")  # the fused ops, as a CUDA build chooses
        compile_blocks(m)
        outs["bf16_compiled"] = bd.run_model("bf16+compile", m, cfg, resolutions)
    del m

    for name, o in outs.items():
        if name != "bf16" and "480p" in o and "480p" in outs["bf16"]:
            R[f"cos_{name}_vs_bf16_480p"] = bd.cos(o["480p"], outs["bf16"]["480p"])
    rows = {(name, res): t for name, res, _, t, _, _ in bd.ROWS}
    for (name, res), t in rows.items():
        base = "bf16+compile" if name.endswith("+compile") else "bf16"
        if name.startswith("fp8") and (base, res) in rows:
            R[f"ratio_{name}_{res}"] = t / rows[(base, res)]

    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "bench_fp8.json"), "w") as f:
        json.dump(R, f, indent=1)
    bd.log(json.dumps({k: v for k, v in R.items() if k.startswith(("cos_", "ratio_"))}, indent=1))
    bd.log(
        f"\n{'model':28s} {'res':5s} {'tokens':>7s} {'s/forward':>10s} {'TFLOP/s':>8s} {'peak GiB':>9s} {'vs bf16':>8s}"
    )
    for name, res, L, t, tf, pk in bd.ROWS:
        ratio = R.get(f"ratio_{name}_{res}")
        bd.log(f"{name:28s} {res:5s} {L:7d} {t:10.3f} {tf:8.0f} {pk:9.1f} {'' if ratio is None else f'{ratio:8.2f}'}")


if __name__ == "__main__":
    main()
