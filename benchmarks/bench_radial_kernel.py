"""Radial Attention's 8-bit block-sparse kernel alone, at Wan2.1-14B's self-attention shapes (40
heads of 128; 480p 32,760 tokens, 720p 75,600), against the dense 8-bit kernels on the same card:
FlashAttention-3's e4m3 (fast mode's dense attention, when installed) and our dense Triton one.

Kernel-only times (inputs already quantised) per tile config and loop form (plain / the next
tile's Q·Kᵀ issued before this tile's softmax), the autotuner's pick, and the quantisation op;
"ideal" is the dense kernel's time times the mask's density (what a sparse kernel at the dense
rate would take).

  python benchmarks/bench_radial_kernel.py [--res 480p,720p] [--sweep 480p,720p]

Prints a table last; writes $OUT/bench_radial_kernel.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_dit import timeit  # noqa: E402
from wan_core.kernels import sage_attention as sa  # noqa: E402
from wan_core.kernels.attention import get_attention  # noqa: E402
from wan_core.kernels.radial_mask import radial_plan  # noqa: E402

GRIDS = {"480p": (21, 1560), "720p": (21, 3600)}  # latent frames, tokens per frame


def bench(fn) -> float:
    return timeit(fn, warm=2, reps=10)[0]  # median seconds, CUDA events


def one_resolution(res: str, do_sweep: bool, R: dict) -> list:
    """Rows (resolution, name, seconds, cosine to the autotuned sparse output) of one token layout."""
    rows = []
    h, d = 40, 128
    frames, per_frame = GRIDS[res]
    L = frames * per_frame
    plan = radial_plan(frames, per_frame, 0.2, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, L, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = (
        torch.randn(1, L, h, d, device="cuda", generator=g) + torch.randn(1, 1, h, d, device="cuda", generator=g)
    ).bfloat16()
    v = torch.randn(1, L, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    packed = sa._quantize_op(q, k, v)
    blocks = (plan.counts.to(torch.int32), plan.indices.to(torch.int32).contiguous(), plan.block_size)
    R[f"{res}_density"] = plan.density
    R[f"{res}_quantize_s"] = t_quant = bench(lambda: sa._quantize_op(q, k, v))
    dense = {}
    for name in ("fa3_fp8", "sage_triton"):
        try:
            fn = get_attention(name, "cuda")
            dense[name] = bench(lambda fn=fn: fn(q, k, v))
            rows.append((res, f"dense {name} (with its quantisation)", dense[name], None))
        except Exception as e:  # FA3 not installed
            R[f"{res}_{name}_error"] = repr(e)[:300]
    dense_kernel = bench(lambda: sa._launch(*packed, L, L, torch.bfloat16))
    rows.append((res, "dense sage kernel alone (autotuned)", dense_kernel, None))
    rows.append((res, "quantisation op", t_quant, None))
    ideal = min([dense_kernel] + [t - t_quant for t in dense.values()]) * plan.density
    rows.append((res, f"ideal: best dense kernel x density {plan.density:.3f}", ideal, None))
    ref = sa._launch(*packed, L, L, torch.bfloat16, blocks=blocks).float()
    for pipeline in (False, True):
        t = bench(lambda p=pipeline: sa._launch(*packed, L, L, torch.bfloat16, blocks=blocks, pipeline=p))
        rows.append((res, f"sparse, default tile (Hopper: fixed) pipeline={pipeline}", t, None))
    tiles = [(64, 128, 4, 2), (64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 2), (64, 64, 4, 3)]
    for (bm, bn, w, s), pipeline in itertools.product(tiles, (False, True)) if do_sweep else ():
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
        name = f"sparse {bm}x{bn} w{w} s{s} pipeline={pipeline:d}"
        try:
            out = sa._launch(*packed, L, L, torch.bfloat16, config=cfg, blocks=blocks, pipeline=pipeline)
            c = F.cosine_similarity(out.float().flatten(), ref.flatten(), 0).item()
            t = bench(lambda cfg=cfg, p=pipeline: sa._launch(*packed, L, L, torch.bfloat16, config=cfg, blocks=blocks,
                                                              pipeline=p))  # fmt: skip
            rows.append((res, name, t, c))
        except Exception:
            R[f"{res}_{name}_error"] = traceback.format_exc()[-300:]
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", default="480p,720p")
    ap.add_argument("--sweep", default="480p,720p", help="resolutions whose tile configs are swept one by one")
    args = ap.parse_args()
    import triton

    R = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    rows = []
    for res in args.res.split(","):
        rows += one_resolution(res, res in args.sweep, R)
    R["rows"] = rows
    with open(os.path.join(os.environ.get("OUT", "."), "bench_radial_kernel.json"), "w") as f:
        json.dump(R, f, indent=1)
    print(f"\n{R['device']}, torch {R['torch']}, triton {R['triton']}; per call, one layer (40 heads)")
    for res, name, t, c in rows:
        print(f"{res:5s} {name:48s} {t * 1e3:8.2f} ms" + (f"  cos {c:.6f}" if c is not None else ""))


if __name__ == "__main__":
    main()
