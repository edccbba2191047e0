"""One-off probe: where the time of q/k norm + RoPE + 8-bit quantisation goes at 720p (40 heads of
128, 75,600 tokens), the unfused passes against `sage_prep_kernel`'s, per kernel and tile.

  python benchmarks/probe_qk_prep.py   (prints a table; writes $OUT/probe_qk_prep.json)
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_dit import timeit  # noqa: E402
from wan_core.kernels import sage_attention as sa  # noqa: E402
from wan_core.kernels import sage_prep_kernel as prep  # noqa: E402
from wan_core.kernels import sage_quant_kernel as kern  # noqa: E402
from wan_core.kernels.fused_ops import _launch_rms_norm_rope  # noqa: E402
from wan_core.kernels.rope import rope_tables  # noqa: E402


def ms(fn) -> float:
    return timeit(fn, warm=3, reps=15)[0] * 1e3


def main():
    rows, R = [], {"device": torch.cuda.get_device_name()}
    b, l, h, d = 1, 75600, 40, 128
    c = h * d
    g = torch.Generator(device="cuda").manual_seed(0)
    q = (torch.randn(b, l, c, device="cuda", generator=g) * 3).bfloat16()
    k = (torch.randn(b, l, c, device="cuda", generator=g) + 2).bfloat16()
    v = torch.randn(b, l, h, d, device="cuda", generator=g).bfloat16()
    w = torch.rand(c, device="cuda", generator=g) + 0.5
    cos, sin = rope_tables((21, 45, 80), d, "cuda")
    lp = -(-l // sa.PAD) * sa.PAD
    qn = _launch_rms_norm_rope(q, w, cos, sin, 1e-6, h).view(b, l, h, d)
    kn = _launch_rms_norm_rope(k, w, cos, sin, 1e-6, h).view(b, l, h, d)
    rows.append(("unfused: rms_norm_rope (one of q, k)", ms(lambda: _launch_rms_norm_rope(q, w, cos, sin, 1e-6, h))))
    rows.append(("unfused: quantize (kv_stats + quantize_qkv)", ms(lambda: sa._launch_quantize(qn, kn, v))))
    rows.append(("fused: _launch_quantize_qk_norm (all three)", ms(lambda: sa._launch_quantize_qk_norm(q, k, v, w, w, cos, sin,
                                                                                                      1e-6))))
    qc = torch.empty(b, h, lp, d, dtype=sa.FP8, device="cuda")
    qs = torch.empty(b, h, lp, device="cuda")
    krs = torch.empty(b, l, device="cuda")
    extra = sa.LOG2E / math.sqrt(d)
    for rows_per, warps in [(1, 4), (1, 8), (1, 16), (8, 8), (8, 16), (32, 8), (32, 16), (64, 16)]:
        ksum = torch.empty(b, lp // rows_per, c, device="cuda")
        args = (q, k, w, w, cos, sin, qc, qs, krs, ksum, l, lp, c, h, 1e-6, extra)
        meta = dict(HEAD_DIM=d, BLOCK_P=4096, ROWS=rows_per, num_warps=warps)
        for has_q, has_k in ((True, True), (True, False), (False, True)):
            if rows_per == 1 and has_k:
                continue
            name = f"qk_prep ROWS={rows_per} w{warps} {'q' if has_q else ''}{'k' if has_k else ''}"
            try:
                rows.append((name, ms(lambda a=args, m=meta, hq=has_q, hk=has_k: prep.qk_prep[(lp // m["ROWS"], b)](
                    *a, **m, HAS_Q=hq, HAS_K=hk))))
            except Exception as e:
                R[name] = repr(e)[:200]
    part = torch.empty(b, -(-l // 256), 4, c, device="cuda")
    for has_k in (True, False):
        rows.append((f"kv_stats tuned {'k+v' if has_k else 'v only'}", ms(lambda hk=has_k: kern.kv_stats_tuned[
            lambda m: (-(-l // 256), -(-c // m["BLOCK_C"]), b)](k, v, part, l, c, -(-l // 256), BLOCK_L=256, HAS_K=hk))))
    km = torch.zeros(b, h, d, device="cuda")
    vs = torch.full((b, h, d), 0.01, device="cuda")
    kc = torch.empty_like(qc)
    vt = torch.empty(b, h, d, lp, dtype=sa.FP8, device="cuda")
    ks = torch.empty(b, h, lp // sa.KBLK, device="cuda")
    plain = (qn, kn, v, km, km, vs, qc, qs, kc, ks, vt, l, lp, h, extra)
    rows.append(("quantize_qkv tuned, q k v", ms(lambda: kern.quantize_qkv_tuned[(lp // 256, h, b)](*plain, HEAD_DIM=d,
                                                                                                     KBLK=256))))
    raw = (None, k, v, km, km, vs, None, None, kc, ks, vt, l, lp, h, 0.0)
    for partner in (False, True):
        for sub, warps in [(16, 4), (32, 4), (32, 8), (64, 8)]:
            name = f"quantize_qkv K_NORM partner={partner:d} SUB={sub} w{warps}"
            try:
                rows.append((name, ms(lambda p=partner, s=sub, wa=warps: kern.quantize_qkv[(lp // 256, h, b)](
                    *raw, HEAD_DIM=d, KBLK=256, SUB=s, num_warps=wa, krs_ptr=krs, wk_ptr=w, cos_ptr=cos, sin_ptr=sin,
                    K_NORM=True, PARTNER=p))))
            except Exception as e:
                R[name] = repr(e)[:200]
    R["rows"] = rows
    with open(os.path.join(os.environ.get("OUT", "."), "probe_qk_prep.json"), "w") as f:
        json.dump(R, f, indent=1)
    print(f"\n{R['device']}; 720p, one layer")
    for name, t in rows:
        print(f"{name:50s} {t:8.3f} ms")


if __name__ == "__main__":
    main()
