"""The VAE stage as `WanPipeline.generate` and ComfyUI's decode node run it: `vae_frames.decode_frames`
(via `pipeline.decode`; 480x832x81, random bf16 VAE) alone and with the background mp4 writer beside
it, per x264 preset, with the float32 result staged through pinned buffers (`PIN_RESULT` False) or
page-locked itself (True); staged is the default (None: page-locked when a writer takes the frames).
"decode" is the stage, "tail" the encoder's time after it, as in bench_e2e. First row: the decode
node's former path (the VAE's chunks copied synchronously into a CPU video, frames made on the CPU).
`--alone`: x264 given the decoded frames at once, no decode beside it (submitting them, then the
flush): the encoder's own time for this video. `--profile`: the bare decode's top GPU kernels.

  python benchmarks/bench_vae_stage.py [--presets faster,medium] [--runs 3] [--size 720x1280] [--alone] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_dit import log  # noqa: E402
from wan_core import vae_frames  # noqa: E402
from wan_core.models.vae import WanVAE  # noqa: E402
from wan_core.options import GenerationConfig  # noqa: E402
from wan_core.pipeline import WanPipeline  # noqa: E402
from wan_core.spec import ModelSpec  # noqa: E402
from wan_core.video import VideoWriter, uint8_levels, wan_to_frames  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="faster,medium")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", default="480x832", help="HxW of the video (81 frames)")
    ap.add_argument("--alone", action="store_true", help="also time x264 alone on the decoded frames")
    ap.add_argument("--profile", action="store_true", help="list the bare decode's top GPU kernels")
    args = ap.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    out_dir = os.environ.get("OUT", ".")
    with torch.device("cuda"):
        vae = WanVAE()
    pipe = WanPipeline(dit_path="random", task="t2v", device="cuda")
    pipe.spec, pipe.config = ModelSpec(dit="random", device="cuda"), GenerationConfig()
    pipe.vae = vae.to(torch.bfloat16).eval()
    latent = torch.randn(1, 16, 21, height // 8, width // 8, device="cuda")
    mp4 = os.path.join(tempfile.gettempdir(), "bench_vae_stage.mp4")
    results, rows = {"device": torch.cuda.get_device_name()}, []
    pipe.decode(latent)  # warm-up: cuDNN's algorithm choice, pinned buffers

    def record(name: str, times: list[tuple[float, float]]) -> None:  # (stage, tail) per run; the median run's
        results[name] = {"runs": times}
        rows.append((name, *sorted(times)[len(times) // 2]))
        log(f"{name}: {[(round(a, 3), round(b, 3)) for a, b in times]}")

    # ComfyUI's decode node before it shared decode_frames: each chunk copied synchronously into a
    # CPU video, then the frame layout and [0, 1] scaling on the CPU
    times = []
    for _ in range(args.runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        frames = wan_to_frames(vae.decode(latent, out_device="cpu"))
        times.append((time.perf_counter() - t0, 0.0))
    del frames
    record("former node path: CPU video + CPU frames", times)
    for preset in [None, *args.presets.split(",")]:
        for pin in (False, True):
            vae_frames.PIN_RESULT = pin
            times, frames = [], None
            for _ in range(args.runs):
                writer = VideoWriter(mp4, fps=16, layout="comfy", preset=preset, background=True) if preset else None
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                # the previous result is still held while this one is made, as by a caller keeping it
                frames = pipe.decode(latent, on_frames=writer.write if writer else None)
                t1 = time.perf_counter()
                if writer:
                    writer.close()
                times.append((t1 - t0, time.perf_counter() - t1))
            del frames
            record(f"{'pinned' if pin else 'staged'} result, {'no writer' if preset is None else 'x264 ' + preset}", times)
    if args.alone:
        u8 = uint8_levels(pipe.decode(latent))  # [T, H, W, 3] on the CPU
        for preset in args.presets.split(","):
            times = []
            for _ in range(args.runs):
                writer = VideoWriter(mp4, fps=16, layout="comfy", preset=preset)
                t0 = time.perf_counter()
                writer.write(u8)
                t1 = time.perf_counter()
                writer.close()
                times.append((t1 - t0, time.perf_counter() - t1))
            record(f"x264 {preset} alone (submit, flush)", times)
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            pipe.decode(latent)
            torch.cuda.synchronize()
        kernels = sorted(((e.self_device_time_total, e.key) for e in prof.key_averages() if e.self_device_time_total > 0),
                         reverse=True)
        log(f"bare decode: {sum(us for us, _ in kernels) / 1e6:.3f} s of GPU kernels")
        for us, name in kernels[:20]:
            log(f"  {us / 1e3:9.1f} ms  {name[:110]}")
    with open(os.path.join(out_dir, "bench_vae_stage.json"), "w") as f:
        json.dump(results, f, indent=1)
    log(f"\n{'VAE stage, ' + args.size + 'x81 bf16':40s} {'decode s':>8s} {'tail s':>7s} {'total s':>7s}")
    for name, decode, tail in rows:
        log(f"{name:40s} {decode:8.3f} {tail:7.3f} {decode + tail:7.3f}")


if __name__ == "__main__":
    main()
