"""Wan2.2 on one GPU, random weights (speed does not depend on values), peers in the same run.

Parts (`--parts`, comma-separated):
- forward5b: TI2V-5B DiT forward at 1280x704x121 (latent 48x31x44x80, 27,280 tokens): ComfyUI's
  WanModel (its Wan2.2 5B config) vs ours bf16 + FlashAttention-3 and fast mode, compiled; output cosine.
- vae22: Wan2.2 VAE decode of that latent (121 frames 704x1280): ComfyUI's module vs ours.
- a14b: the whole 4-step A14B T2V run at 480x832x81 through `WanPipeline.generate` (model_cls
  wan2.2_moe_distill: two 14B experts switched after step 2, a rank-64 LoRA per expert, FP8 fast
  mode, T5 on the GPU, Wan2.1 VAE, mp4 written): both experts resident, and "swap": each expert in
  pinned host memory, brought to the GPU for its own steps (model offload), the swap timed.
- ti2v: the whole TI2V-5B T2V run at 1280x704x121, 50 steps with CFG (100 DiT evaluations),
  bf16 + FlashAttention-3, Wan2.2 VAE, mp4 written.

  python benchmarks/bench_wan22.py --parts forward5b,vae22,a14b,ti2v [--attn fa3_fp8]

Writes $OUT/bench_wan22.json and prints a table per part.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_dit import cos, log, timeit  # noqa: E402
from benchmarks.bench_e2e import random_t5  # noqa: E402
from wan_core import pipeline as wan_pipeline  # noqa: E402
from wan_core.layers.compile import compile_blocks  # noqa: E402
from wan_core.loading.dit import build_model  # noqa: E402
from wan_core.models.config import PRESETS  # noqa: E402

R: dict = {}
GRID_5B = (31, 44, 80)  # 121 frames, 704 x 1280 through the Wan2.2 VAE (4 x 16 x 16)


def _free(stage: str = ""):
    gc.collect()
    torch.cuda.empty_cache()
    if stage:
        log(f"[{stage}] allocated {torch.cuda.memory_allocated() / 2**30:.1f} GiB")


def _random_(module, std=0.02):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def _ours(cfg, sd, variant: str):
    """bf16@backend or fast@backend, compiled with the fused block ops (what a CUDA build chooses)."""
    base, _, attn = variant.partition("@")
    m = build_model(cfg, sd, dtype=torch.bfloat16, device="cuda")
    m.set_attention(attn or "auto")
    if base == "fast":
        from wan_core.layers.fp8 import quantize_model

        quantize_model(m, kernel="auto")
    m.set_block_ops("auto")
    compile_blocks(m)
    return m


def part_forward5b(args):
    cfg = PRESETS["ti2v-5b"]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 48, *GRID_5B, device="cuda", dtype=torch.bfloat16, generator=g)
    ctx = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    t = torch.tensor([500.0], device="cuda")
    outs, rows = {}, []
    sys.path.insert(0, os.path.abspath(".carry/ComfyUI"))
    import comfy.ldm.wan.model as wm
    import comfy.ops

    torch.manual_seed(0)
    cm = wm.WanModel(model_type="t2v", in_dim=48, out_dim=48, dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads,
                     num_layers=cfg.num_layers, operations=comfy.ops.disable_weight_init, device="cuda", dtype=torch.bfloat16)  # fmt: skip
    _random_(cm)
    sd = dict(cm.state_dict())
    for name, make in [("comfyui", lambda: cm)] + [(v, lambda v=v: _ours(cfg, sd, v)) for v in args.variants5b.split(",")]:
        try:
            m = make()
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                tm, all_t = timeit(lambda m=m: m(x, t, ctx), warm=2 if name != "comfyui" else 1, reps=3)
                outs[name] = m(x, t, ctx).float().cpu()
            peak = torch.cuda.max_memory_allocated() / 2**30
            rows.append((name, tm, peak))
            R[f"forward5b_{name}"] = dict(s=tm, all_s=all_t, peak_GiB=peak)
            log(f"5B forward {name}: {tm:.3f} s {[round(v, 3) for v in all_t]} peak {peak:.1f} GiB")
            if name != "comfyui":
                m = None
                torch._dynamo.reset()
                _free()
        except Exception:
            traceback.print_exc()
            R[f"forward5b_{name}_error"] = traceback.format_exc()[-600:]
    cm = None
    _free()
    base = dict((n, s) for n, s, _ in rows).get("comfyui")
    log("\nTI2V-5B forward, 1280x704x121 (27,280 tokens), one H100-class GPU")
    log(f"{'model':28s} {'s':>7s} {'vs ComfyUI':>10s} {'cos':>8s} {'peak GiB':>9s}")
    for n, s, pk in rows:
        c = cos(outs[n], outs["comfyui"]) if "comfyui" in outs and n in outs else float("nan")
        R[f"forward5b_{n}"]["cos_to_comfyui"] = c
        log(f"{n:28s} {s:7.3f} {base / s if base else float('nan'):9.3f}x {c:8.5f} {pk:9.2f}")


def part_vae22(args):
    from wan_core.models.vae22 import Wan22VAE

    sys.path.insert(0, os.path.abspath(".carry/ComfyUI"))
    import comfy.ldm.wan.vae2_2 as cv

    torch.manual_seed(0)
    with torch.device("cuda"):
        ours = Wan22VAE()
    ours = _random_(ours.to(torch.bfloat16).eval(), 0.02)
    z = torch.randn(1, 48, *GRID_5B, device="cuda")
    rows = []
    try:
        with torch.device("cuda"):
            theirs = cv.WanVAE(dim=160, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                               temperal_downsample=[False, True, True], dropout=0.0)  # fmt: skip
        theirs = theirs.to(torch.bfloat16).eval()
        theirs.load_state_dict(ours.state_dict(), strict=True)
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            tm, all_t = timeit(lambda: theirs.decode(z.to(torch.bfloat16)), warm=1, reps=1)
        rows.append(("comfyui", tm, torch.cuda.max_memory_allocated() / 2**30))
        theirs = None
        _free()
    except Exception:
        traceback.print_exc()
        R["vae22_comfyui_error"] = traceback.format_exc()[-600:]
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        tm, all_t = timeit(lambda: ours.decode(z, keep=True), warm=1, reps=1)
    rows.append(("ours", tm, torch.cuda.max_memory_allocated() / 2**30))
    log("\nWan2.2 VAE decode, 48x31x44x80 -> 121 frames 704x1280, bf16")
    base = dict((n, s) for n, s, _ in rows).get("comfyui")
    for n, s, pk in rows:
        R[f"vae22_{n}"] = dict(s=s, peak_GiB=pk)
        log(f"{n:12s} {s:7.3f} s {base / s if base else float('nan'):6.3f}x peak {pk:6.2f} GiB")
    ours = None
    _free()


def _pipeline(model_cls, cfg_keys, dits, t5, vae, task="t2v", device="cuda"):
    """A WanPipeline over models built here: its lease hands out ours (by expert)."""
    from wan_core.options import GenerationConfig
    from wan_core.pipeline import WanPipeline
    from wan_core.spec import ModelSpec

    moe = "low" in dits
    paths = dict(high_noise_path="random", low_noise_path="random") if moe else dict(dit_path="random")
    pipe = WanPipeline(model_cls=model_cls, task=task, device=device, **paths)
    pipe.config = GenerationConfig.from_dict(cfg_keys)
    pipe.spec = ModelSpec(dit="random", device=device, expert="high" if moe else None, task="ti2v" if not moe else task)
    pipe.spec_low = pipe.spec.replace(expert="low") if moe else None
    pipe.dit, pipe.dit_low = dits.get("high", dits.get("dit")), dits.get("low")
    pipe.text_encoder, pipe.vae, pipe.image_encoder = t5, vae, None
    wan_pipeline.lease = lambda spec: contextlib.nullcontext(dits["dit"] if spec.expert is None else dits[spec.expert])
    return pipe


def _timed_runs(pipe, name, runs, presets, out_dir, warm_keys=None):
    """Run 0 compiles (with `warm_keys` laid over the config: a shorter run), then the timed runs."""
    rows = []
    keys = pipe.config
    for run, preset in [(0, presets[0])] + [(r, p) for p in presets for r in range(1, runs + 1)]:
        pipe.config = keys.updated({"video_preset": preset, **((warm_keys or {}) if run == 0 else {})})
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = pipe.generate(seed=run, prompt="a cat surfing a wave at sunset", save_result_path=os.path.join(out_dir, "w22.mp4"))
        wall = time.perf_counter() - t0
        tag = f"{name} x264 {preset} " + ("warm-up" if run == 0 else f"run {run}")
        log(f"{tag}: {wall:.2f} s; {res.summary()}; steps {[round(s, 2) for s in res.step_times]}")
        if run > 0:
            R[tag] = dict(wall_s=wall, timings=res.timings, step_times=res.step_times, peak_GiB=res.peak_memory / 2**30)
            rows.append((f"{name} ({preset})", wall, res.timings, res.peak_memory / 2**30, res.step_times))
    return rows


def part_a14b(args, t5, out_dir):
    from wan_core.layers.lora import apply_loras
    from wan_core.loading.lora import random_lora
    from wan_core.models.vae import WanVAE

    cfg = PRESETS["t2v-a14b"]
    with torch.device("cuda"):
        vae = WanVAE()
    vae = vae.to(torch.bfloat16).eval()
    dits = {}
    for i, e in enumerate(("high", "low")):
        m = _random_(build_model(cfg, None, dtype=torch.bfloat16, device="cuda"))
        from wan_core.layers.fp8 import quantize_model

        quantize_model(m, kernel="auto")
        _free(f"{e}-noise expert in FP8")
        apply_loras(m, [(random_lora(cfg, rank=64, seed=i, targets="blocks", diffs=False, magnitude=0.01), 1.0)], mode="auto")
        m.set_attention(args.attn)
        m.set_block_ops("auto")
        compile_blocks(m)
        dits[e] = m
        _free(f"{e}-noise expert with LoRA")
    if t5 is None:
        t5 = random_t5("cuda")
        _free("T5")
    keys = dict(denoising_step_list=[1000, 750, 500, 250], sample_shift=5.0, enable_cfg=False, boundary_step_index=2)
    pipe = _pipeline("wan2.2_moe_distill", keys, dits, t5, vae)
    rows = _timed_runs(pipe, "A14B both resident", args.runs, args.presets.split(","), out_dir)
    # swap: each expert waits in pinned host memory and comes to the GPU for its own steps
    from wan_core.layers.offload import enable_offload

    handles = {e: enable_offload(m, granularity="model", device="cuda") for e, m in dits.items()}
    _free()
    for h in handles.values():  # the upload alone: the swap's cost
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with h.loaded():
            torch.cuda.synchronize()
            R.setdefault("expert_upload_s", []).append(time.perf_counter() - t0)
    log(f"expert upload (host -> GPU), per expert: {[round(v, 3) for v in R['expert_upload_s']]} s")
    try:
        rows += _timed_runs(pipe, "A14B swap", args.runs, args.presets.split(",")[:1], out_dir)
    except Exception:
        traceback.print_exc()
        R["a14b_swap_error"] = traceback.format_exc()[-600:]
    for h in handles.values():
        h.remove()
    wan_pipeline.lease = None
    del pipe, dits, vae
    torch._dynamo.reset()
    _free("after A14B")
    return rows, t5


def part_ti2v(args, t5, out_dir):
    if t5 is None:
        t5 = random_t5("cuda")
    from wan_core.models.vae22 import Wan22VAE

    cfg = PRESETS["ti2v-5b"]
    with torch.device("cuda"):
        vae = Wan22VAE()
    vae = _random_(vae.to(torch.bfloat16).eval(), 0.02)
    dit = _random_(build_model(cfg, None, dtype=torch.bfloat16, device="cuda"))
    dit.set_attention(args.attn5b)
    dit.set_block_ops("auto")
    compile_blocks(dit)
    keys = dict(infer_steps=args.steps5b, sample_shift=5.0, sample_guide_scale=5.0, target_video_length=121, fps=24,
                target_height=704, target_width=1280)  # fmt: skip
    pipe = _pipeline("wan2.2", keys, {"dit": dit}, t5, vae)
    rows = _timed_runs(pipe, f"TI2V-5B {args.steps5b} steps CFG", 1, args.presets.split(",")[:1], out_dir,
                       warm_keys=dict(infer_steps=2))  # fmt: skip
    wan_pipeline.lease = None
    del pipe, dit, vae
    torch._dynamo.reset()
    _free()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="forward5b,vae22,a14b,ti2v")
    ap.add_argument("--variants5b", default="bf16@flash_attn3,fast@fa3_fp8")
    ap.add_argument("--attn", default="fa3_fp8", help="self-attention of the A14B fast-mode experts")
    ap.add_argument("--attn5b", default="flash_attn3", help="self-attention of the TI2V-5B whole run (bf16)")
    ap.add_argument("--steps5b", type=int, default=50)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--presets", default="faster,medium")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT", ".")
    R["device"], R["torch"] = torch.cuda.get_device_name(), torch.__version__
    log("torch", torch.__version__, torch.cuda.get_device_name())
    parts = args.parts.split(",")
    rows = []
    try:
        if "forward5b" in parts:
            part_forward5b(args)
        if "vae22" in parts:
            part_vae22(args)
        if "a14b" in parts:  # builds the experts first, then the T5 (kept for ti2v)
            a14b_rows, t5 = part_a14b(args, None, out_dir)
            rows += a14b_rows
        else:
            t5 = None
        if "ti2v" in parts:
            rows += part_ti2v(args, t5, out_dir)
    finally:
        with open(os.path.join(out_dir, "bench_wan22.json"), "w") as f:
            json.dump(R, f, indent=1, default=str)
        for f in os.listdir(out_dir):
            if f.endswith(".mp4"):
                os.remove(os.path.join(out_dir, f))
    if rows:
        log("\nWhole runs (random weights in memory, T5 on the GPU, mp4 written)")
        log(f"{'run':44s} {'total s':>8s} {'text':>6s} {'sampling':>9s} {'vae':>6s} {'save':>6s} {'peak GiB':>9s}")
        for n, wall, tm, pk, _ in rows:
            log(f"{n:44s} {wall:8.2f} {tm.get('text_encode', 0):6.2f} {tm.get('sampling', 0):9.2f} "
                f"{tm.get('vae_decode', 0):6.2f} {tm.get('save', 0):6.2f} {pk:9.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
