"""One-off probe: q/k from their linears to the 8-bit attention's inputs at 720p (40 heads of 128,
75,600 tokens), per kernel: the unfused passes (`rms_norm_rope` for q and k, then the quantiser's
two passes) against `sage_prep_kernel` (q's codes in one pass; k in bf16 by the same kernel).

  python benchmarks/probe_qk_prep.py   (prints a table; writes $OUT/probe_qk_prep.json)
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_dit import timeit  # noqa: E402
from wan_core.kernels import sage_attention as sa  # noqa: E402
from wan_core.kernels import sage_prep_kernel as prep  # noqa: E402
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
    for k_by_prep in (True, False):
        sa.K_BY_PREP = k_by_prep
        rows.append((f"prep: _launch_quantize_qk_norm, k by {'prep' if k_by_prep else 'rms_norm_rope'}",
                     ms(lambda: sa._launch_quantize_qk_norm(q, k, v, w, w, cos, sin, 1e-6))))
    qc = torch.empty(b, h, lp, d, dtype=sa.FP8, device="cuda")
    qs = torch.empty(b, h, lp, device="cuda")
    ko = torch.empty_like(k)
    for warps in (4, 8, 16):
        meta = dict(HEAD_DIM=d, NH=64, num_warps=warps)
        rows.append((f"prep q codes, w{warps}", ms(lambda m=meta: prep.qk_norm_rope[(lp, b)](
            q, w, cos, sin, qc, qs, l, lp, h, 1e-6, 1.0, QUANT=True, **m))))
        rows.append((f"prep k bf16, w{warps}", ms(lambda m=meta: prep.qk_norm_rope[(l, b)](
            k, w, cos, sin, ko, None, l, lp, h, 1e-6, 1.0, QUANT=False, **m))))
    R["rows"] = rows
    with open(os.path.join(os.environ.get("OUT", "."), "probe_qk_prep.json"), "w") as f:
        json.dump(R, f, indent=1)
    print(f"\n{R['device']}; 720p, one layer")
    for name, t in rows:
        print(f"{name:60s} {t:8.3f} ms")


if __name__ == "__main__":
    main()
