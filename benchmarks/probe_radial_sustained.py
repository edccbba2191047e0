"""Probe (twelfth session): the 720p sparse attention per layer, in short bursts and sustained, with
the card's SM clock and power sampled alongside (and FA3's dense e4m3 kernel, when installed).
The session's run also timed FA3's TMA-paged kernel and Triton's warp specialisation here; those
parts left with the code they timed (git history, results/probe_radial_sustained_twelfth_*).

Why: inside the compiled forward our sparse kernel takes 46.0 ms per layer, alone 40.9-41.5 ms
(FA3 dense: 130.6 vs 127.7 ms). If a sustained run of the kernel alone also slows to ~46 ms with
the SM clock falling, the gap is the card's power limit, not the forward.

  python benchmarks/probe_radial_sustained.py     (writes $OUT/probe_radial_sustained.json, smi.csv)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wan_core.kernels import sage_attention as sa  # noqa: E402
from wan_core.kernels.radial_mask import radial_plan  # noqa: E402

OUT = os.environ.get("OUT", ".")


def per_call(fn, n: int) -> list[float]:
    """Milliseconds of each of n back-to-back calls (CUDA events, no sync between calls)."""
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    ev[0].record()
    for i in range(n):
        fn()
        ev[i + 1].record()
    torch.cuda.synchronize()
    return [ev[i].elapsed_time(ev[i + 1]) for i in range(n)]


def med(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main():
    R = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu",
                            "--format=csv,noheader,nounits", "-lms", "100"],
                           stdout=open(os.path.join(OUT, "smi.csv"), "w"))  # fmt: skip
    marks = []

    def mark(name):
        torch.cuda.synchronize()
        marks.append((name, time.time()))

    h, d, frames, per_frame = 40, 128, 21, 3600
    L = frames * per_frame
    plan = radial_plan(frames, per_frame, 0.2, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, L, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = (torch.randn(1, L, h, d, device="cuda", generator=g) + torch.randn(1, 1, h, d, device="cuda", generator=g)).bfloat16()
    v = torch.randn(1, L, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    packed = sa._quantize_op(q, k, v)
    blocks = (plan.counts.to(torch.int32), plan.indices.to(torch.int32).contiguous(), plan.block_size)

    def ours():
        return sa._launch(*packed, L, L, torch.bfloat16, blocks=blocks)

    ours()  # compiled and warm
    time.sleep(3)  # let the card cool a little after setup
    mark("ours burst")
    R["ours_burst_ms"] = per_call(ours, 12)
    mark("ours sustained")
    R["ours_sustained_ms"] = per_call(ours, 120)
    mark("idle")
    time.sleep(3)
    try:
        from wan_core.kernels.fa3_fp8 import fa3_fp8_attention

        mark("fa3 dense sustained")
        R["fa3_dense_sustained_ms"] = per_call(lambda: fa3_fp8_attention(q, k, v), 40)
    except Exception as e:
        R["fa3_dense_error"] = repr(e)[:300]
    mark("end")
    time.sleep(0.3)
    smi.terminate()
    R["marks"] = marks
    with open(os.path.join(OUT, "probe_radial_sustained.json"), "w") as f:
        json.dump(R, f)
    # clocks and power per phase
    rows = []
    for line in open(os.path.join(OUT, "smi.csv")):
        parts = [p.strip() for p in line.split(",")]
        try:
            ts = time.mktime(time.strptime(parts[0].split(".")[0], "%Y/%m/%d %H:%M:%S")) + float("0." + parts[0].split(".")[1])
            rows.append((ts, float(parts[1]), float(parts[2]), float(parts[3])))
        except (ValueError, IndexError):
            pass
    print(f"{R['device']}")
    for key in [k for k in R if k.endswith("_ms")]:
        xs = R[key]
        print(f"{key:34s} first3 {[round(x, 1) for x in xs[:3]]}  median {med(xs):7.2f}  last-50 median {med(xs[-50:]):7.2f} ms")
    for key in [k for k in R if "cos" in k or "error" in k]:
        print(key, R[key])
    for (name, t0), (_, t1) in zip(marks, marks[1:]):
        sel = [r for r in rows if t0 <= r[0] <= t1]  # smi's timestamps: local time, as mktime reads them
        if sel:
            print(f"{name:28s} {len(sel):4d} samples  SM clock {med([r[1] for r in sel]):6.0f} MHz (min {min(r[1] for r in sel):.0f})"
                  f"  power {med([r[2] for r in sel]):5.0f} W  temp {max(r[3] for r in sel):.0f} C")


if __name__ == "__main__":
    main()
