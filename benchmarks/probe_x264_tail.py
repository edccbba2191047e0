"""What the mp4 "tail" of a whole run (the encoder's time after the last decoded chunk) is made of.

The frames of a random-weight 720p decode (random bf16 VAE, random latent, as the whole-run
benchmark's) are handed to a background `VideoWriter` 4 at a time at the VAE's pace (one latent
frame's chunk every `--chunk-ms`), then closed: "tail" is close()'s time, as in bench_e2e. Rows:
x264 options on top of the preset (the file's size says what each costs in compression).

  python benchmarks/probe_x264_tail.py [--size 720x1280] [--preset faster] [--chunk-ms 80]
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
from wan_core import vae_frames  # noqa: E402
from wan_core.models.vae import WanVAE  # noqa: E402
from wan_core.video import VideoWriter, uint8_levels  # noqa: E402

VARIANTS = {
    "preset only": {},
    "threads 16": {"threads": "16"},
    "threads 32": {"threads": "32"},
    "rc-lookahead 10": {"x264-params": "rc-lookahead=10"},
    "sliced threads": {"x264-params": "sliced-threads=1"},
    "no mbtree": {"x264-params": "mbtree=0"},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="720x1280")
    ap.add_argument("--preset", default="faster")
    ap.add_argument("--chunk-ms", type=float, default=80.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    with torch.device(args.device):
        vae = WanVAE().to(torch.bfloat16 if args.device == "cuda" else torch.float32).eval()
    latent = torch.randn(1, 16, 21, h // 8, w // 8, device=args.device)
    u8 = uint8_levels(vae_frames.decode_frames(vae, latent))  # [81, H, W, 3] uint8 on the CPU
    mp4 = os.path.join(tempfile.gettempdir(), "probe_x264_tail.mp4")
    results = {}
    print(f"{'x264 ' + args.preset + ', ' + args.size:28s} {'tail s':>7s} {'alone s':>8s} {'MB':>6s}")
    for name, extra in VARIANTS.items():
        tails, alones = [], []
        for _ in range(args.runs):
            writer = VideoWriter(mp4, fps=16, layout="comfy", preset=args.preset, background=True)
            writer.options.update(extra)
            t0 = time.perf_counter()
            for i in range(0, u8.shape[0], 4):
                writer.write(u8[i : i + 4])
                time.sleep(max(0.0, t0 + (i // 4 + 1) * args.chunk_ms / 1e3 - time.perf_counter()))
            t1 = time.perf_counter()
            writer.close()
            tails.append(time.perf_counter() - t1)
            writer = VideoWriter(mp4, fps=16, layout="comfy", preset=args.preset)
            writer.options.update(extra)
            t0 = time.perf_counter()
            writer.write(u8)
            writer.close()
            alones.append(time.perf_counter() - t0)
        size = os.path.getsize(mp4) / 1e6
        results[name] = {"tail": tails, "alone": alones, "MB": size}
        print(f"{name:28s} {min(tails):7.3f} {min(alones):8.3f} {size:6.1f}", flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "probe_x264_tail.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
