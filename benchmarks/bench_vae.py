"""Wan2.1 VAE decode of 81 frames at 480x832 (21 latent frames): ours vs ComfyUI's and diffusers'.

Random full-size weights in bf16 (speed does not depend on values), the same latent for all.
Ours also tiled (memory-bounded) and the encode of the same clip. Prints a table last; JSON in
$OUT/bench_vae.json. Peers: ComfyUI from .carry/ComfyUI (fetched, never committed), diffusers.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_dit import log, timeit  # noqa: E402
from wan_core.models.vae import WanVAE  # noqa: E402

RESULTS: dict = {}
ROWS: list = []


def measure(name, fn, reps=3):
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        t, all_t = timeit(fn, warm=1, reps=reps)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    RESULTS[name] = {"s": t, "all_s": all_t, "peak_above_weights_GiB": peak, "peak_total_GiB": torch.cuda.max_memory_allocated() / 2**30}
    ROWS.append((name, t, peak))
    log(f"{name:34s} {t:.3f}s {[f'{v:.3f}' for v in all_t]} peak above weights {peak:.2f} GiB")


def main():
    torch.manual_seed(0)
    z = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
    RESULTS["device"] = torch.cuda.get_device_name()
    with torch.device("cuda"):
        ours = WanVAE()
    ours = ours.to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    measure("ours decode", lambda: ours.decode(z))
    measure("ours decode tiled 32", lambda: ours.decode(z, tile_size=32), reps=2)
    video = torch.rand(1, 3, 81, 480, 832, device="cuda", dtype=torch.bfloat16) * 2 - 1
    measure("ours encode", lambda: ours.encode(video), reps=2)
    video = ours = None
    gc.collect()
    torch.cuda.empty_cache()
    try:
        sys.path.insert(0, os.path.abspath(".carry/ComfyUI"))
        import comfy.ldm.wan.vae as wv

        with torch.device("cuda"):
            cv = wv.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True], dropout=0.0)
        cv = cv.to(torch.bfloat16).eval()
        measure("ComfyUI decode", lambda: cv.decode(z))
        cv = None
    except Exception:
        traceback.print_exc()
        RESULTS["comfy_error"] = traceback.format_exc()[-600:]
    gc.collect()
    torch.cuda.empty_cache()
    try:
        from diffusers import AutoencoderKLWan

        with torch.device("cuda"):
            dv = AutoencoderKLWan()
        dv = dv.to(torch.bfloat16).eval()
        measure("diffusers decode", lambda: dv.decode(z, return_dict=False))
        dv = None
    except Exception:
        traceback.print_exc()
        RESULTS["diffusers_error"] = traceback.format_exc()[-600:]
    with open(os.path.join(os.environ.get("OUT", "."), "bench_vae.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    log(f"\n{'VAE, 81 frames 480x832, bf16':34s} {'s':>7s} {'peak GiB':>9s}")
    for name, t, pk in ROWS:
        log(f"{name:34s} {t:7.3f} {pk:9.2f}")


if __name__ == "__main__":
    main()
