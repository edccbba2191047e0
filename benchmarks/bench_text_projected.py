"""Cross-attention + its output projection at Wan2.1-14B's shapes (40 heads of 128, 512 text rows,
5120 outputs), by prompt length: the plain path (the collapsed text kernel storing e4m3 codes, then
the FP8 projection, `scaled_mm_fast`) against the projected form (`text_projected`: the weights
as codes, U = V W_o, one GEMM with K = 40 x Lp), and the projected form in bf16 (a plain bf16
linear), forced at every length so that the crossover shows (`PROJECTED_MAX_KEYS` is set from it).
Times are medians of 10 calls (CUDA events); "err" is the relative error of each against float32
attention through the dequantised projection.

  python benchmarks/bench_text_projected.py [--res 480p,720p]

Prints a table last; writes $OUT/bench_text_projected.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_dit import timeit  # noqa: E402
from wan_core.kernels import text_projected as tp  # noqa: E402
from wan_core.kernels.text_attention import reference_text_attention  # noqa: E402
from wan_core.layers.fp8 import FP8Linear  # noqa: E402

ROWS = {"480p": 32760, "720p": 75600}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", default="480p,720p")
    ap.add_argument("--tokens", default="0,15,31,47,63,79,95,111")
    args = ap.parse_args()
    torch.manual_seed(0)
    lin = nn.Linear(5120, 5120, device="cuda", dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(lin)
    fp8.set_kernel("auto")
    w, s, b, mm = fp8.projection_operands
    w32 = fp8.dequantized_weight(torch.float32)
    R, table = {"device": torch.cuda.get_device_name(), "fp8_kernel": mm}, []
    for res in args.res.split(","):
        lq = ROWS[res]
        q = torch.randn(1, lq, 40, 128, device="cuda", dtype=torch.bfloat16)
        for n in map(int, args.tokens.split(",")):
            k = torch.randn(1, 512, 40, 128, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(1, 512, 40, 128, device="cuda", dtype=torch.bfloat16)
            k[:, n:], v[:, n:] = k[:, n].clone(), v[:, n].clone()
            lengths = torch.tensor([n], dtype=torch.int32)
            want = reference_text_attention(q.float(), k.float(), v.float(), lengths)
            want = torch.nn.functional.linear(want.flatten(2), w32, b.float())
            fp8_args = (q, k, v, lengths, None, None, w, s, b, mm)
            bf16_args = (q, k, v, lengths, None, None, lin.weight, None, lin.bias, "linear")
            calls = {"plain": fp8_args, "projected": fp8_args, "projected_bf16": bf16_args}
            row = [res, n + 1]
            for name, call in calls.items():
                tp.PROJECTED_MAX_KEYS = 0 if name == "plain" else 512
                t = timeit(lambda call=call: tp.text_attention_projected(*call), warm=2, reps=10)[0]
                out = tp.text_attention_projected(*call).float()
                err = ((out - want).norm() / want.norm()).item()
                R[f"{res}_keys{n + 1}_{name}"] = {"s": t, "err": err}
                row += [t * 1e3, err]
            table.append(row)
            print(row, flush=True)
            del want
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "bench_text_projected.json"), "w") as f:
        json.dump(R, f, indent=1)
    print(f"\n{R['device']}: cross-attention (40 x 128, 512 text rows) + output projection 5120 -> 5120, FP8 {mm}")
    print(f"{'res':5s} {'keys':>5s} {'plain ms':>9s} {'err':>7s} {'proj ms':>8s} {'err':>7s} {'proj bf16 ms':>13s} {'err':>7s}")
    for r in table:
        print(f"{r[0]:5s} {r[1]:5d} {r[2]:9.3f} {r[3]:7.4f} {r[4]:8.3f} {r[5]:7.4f} {r[6]:13.3f} {r[7]:7.4f}")


if __name__ == "__main__":
    main()
