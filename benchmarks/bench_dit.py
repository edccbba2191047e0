"""Full-size Wan2.1-14B T2V DiT forward: ours vs ComfyUI's and diffusers' on the same inputs.

Random weights (speed does not depend on values); 480x832x81 (21x60x104 latent, 32,760 tokens)
and 720x1280x81 (21x90x160, 75,600 tokens); bf16. ComfyUI's model gets the same weights as
ours (its parameter names are the official ones), so the output similarity is checked too.

  python benchmarks/bench_dit.py [--res 480p,720p] [--peers comfy,diffusers] [--ours sdpa_cudnn,sdpa_flash]
                                 [--compile --compiled bf16,fp8,fast,fast-exact[,bf16+nofuse,...]]

"fast" is fast mode: FP8 block linears and the 8-bit Triton self-attention, compiled
("fast@radial_attn": Radial Attention's mask run by the block-sparse 8-bit kernel, as the model
cache gives an FP8 DiT; "fast@radial_attn+sparse16": by the bf16 sparse kernel). Compiled
variants use the "fused" block ops (single-pass norm/modulate/quantise ops, what a CUDA build
chooses); a "+nofuse" suffix times the "torch" block ops, their float32 work left to inductor.

Peers: ComfyUI from .carry/ComfyUI (a fetched checkout, never committed), diffusers from the
environment. Prints a table last; writes JSON to $OUT/bench_dit.json (or ./bench_dit.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from wan_core.loading.dit import build_model  # noqa: E402
from wan_core.models.config import PRESETS  # noqa: E402

SHAPES = {"480p": (21, 60, 104), "720p": (21, 90, 160)}
RESULTS: dict = {}
ROWS: list[tuple] = []


def log(*a):
    print(*a, flush=True)


def timeit(fn, warm=1, reps=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return sorted(ts)[len(ts) // 2], ts


def flops(cfg, grid, text_len=512):
    f, h, w = grid
    L = f * (h // 2) * (w // 2)
    d, ffn = cfg.dim, cfg.ffn_dim
    lin = 2 * L * d * d * 4 + 2 * L * d * d * 2 + 2 * text_len * d * d * 2 + 2 * L * d * ffn * 2
    attn = 4 * L * L * d + 4 * L * text_len * d
    return cfg.num_layers * lin, cfg.num_layers * attn, L


def inputs(grid, dev="cuda", seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(1, 16, *grid, device=dev, dtype=torch.bfloat16, generator=g)
    ctx = torch.randn(1, 512, 4096, device=dev, dtype=torch.bfloat16, generator=g)
    return x, torch.tensor([500.0], device=dev), ctx


def record(name, res, t, all_t, peak, cfg, grid):
    lin, att, L = flops(cfg, grid)
    RESULTS[f"{name}_{res}_s"] = t
    RESULTS[f"{name}_{res}_all_s"] = all_t
    RESULTS[f"{name}_{res}_peak_GiB"] = peak
    ROWS.append((name, res, L, t, (lin + att) / t / 1e12, peak))
    log(f"{name:28s} {res}: {t:.3f}s {[f'{v:.3f}' for v in all_t]} peak {peak:.1f} GiB, {(lin + att) / t / 1e12:.0f} TFLOP/s")


def run_model(name, fwd, cfg, resolutions, reps=3):
    outs = {}
    for res in resolutions:
        grid = SHAPES[res]
        x, t, ctx = inputs(grid)
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            tm, all_t = timeit(lambda x=x, t=t, ctx=ctx: fwd(x, t, ctx), warm=1, reps=reps)
            outs[res] = fwd(x, t, ctx).float().cpu()  # [1, 16, F, h, w]: small
        record(name, res, tm, all_t, torch.cuda.max_memory_allocated() / 2**30, cfg, grid)
    return outs


DEFAULT_SPARSE = None


def sparse_options(sage_attention, flags):
    """The sparse 8-bit kernel's tile and loop form for one radial variant: "+tile64x128w4s3" runs
    that tile (BLOCK_M x BLOCK_N, warps, stages) on this card instead of the measured default,
    "+plain" the plain loop; other variants get the defaults back."""
    global DEFAULT_SPARSE
    import copy
    import re

    if DEFAULT_SPARSE is None:
        DEFAULT_SPARSE = copy.deepcopy(sage_attention.SPARSE_OPTIONS)
    opts = copy.deepcopy(DEFAULT_SPARSE)
    for flag in flags:
        tile = re.fullmatch(r"tile(\d+)x(\d+)w(\d+)s(\d+)", flag)
        if tile:
            bm, bn, w, s = map(int, tile.groups())
            cap = torch.cuda.get_device_capability()
            opts["configs"][cap] = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
        if flag == "plain":
            opts["pipeline"] = False
    sage_attention.SPARSE_OPTIONS.clear()
    sage_attention.SPARSE_OPTIONS.update(opts)


def unproject_text(model) -> None:
    """The model's cross-attention without its projected form (`text_projected`): `text_attention`
    and its codes, then the output projection, as before the eighteenth session."""
    from wan_core.kernels.text_attention import text_attention

    def text_plain(*a):
        return text_attention(*a)

    text_plain.codes = text_attention.codes
    for blk in model.blocks:
        blk.cross_attn.text_attn_fn = text_plain


def unfold_query_norm(model) -> None:
    """The model's fused cross-attention with q normalised first (a pass writing the normalised q)
    instead of its RMSNorm folded into the projected form's rows' factors and keys."""
    import dataclasses

    for blk in model.blocks:
        ops = blk.cross_attn.ops

        def cross_attend(fn, o, norm_q, q, *args, attend=ops.attend):
            return attend(fn, o, norm_q(q.flatten(2)).view_as(q), *args)  # [B, L, H, D] normalised over C

        blk.cross_attn.ops = dataclasses.replace(ops, cross_attend=cross_attend)


def cos(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return (a @ b / (a.norm() * b.norm())).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", default="480p,720p")
    ap.add_argument("--peers", default="comfy,diffusers")
    ap.add_argument("--ours", default="sdpa_cudnn,sdpa_flash")
    ap.add_argument("--compile", action="store_true", help="also time ours with torch.compile on each block")
    ap.add_argument("--compiled", default="bf16", help="compiled variants: bf16,fp8,fast,fp8-exact,fast-exact")
    ap.add_argument("--sage-options", default=None, help="JSON of sage_attention.KERNEL_OPTIONS (from bench_attention.py)")
    args = ap.parse_args()
    resolutions = [r for r in args.res.split(",") if r]
    if args.sage_options and os.path.exists(args.sage_options):
        from wan_core.kernels import sage_attention

        with open(args.sage_options) as f:
            sage_attention.KERNEL_OPTIONS.update(json.load(f))
        RESULTS["sage_options"] = dict(sage_attention.KERNEL_OPTIONS)
    out_dir = os.environ.get("OUT", ".")
    cfg = PRESETS["t2v-14b"]
    log("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name())
    RESULTS["device"] = torch.cuda.get_device_name()
    RESULTS["torch"] = torch.__version__

    # --- ComfyUI first: its random weights are then handed to ours (same names) -------------
    sd = None
    cm = None
    outputs = {}
    if "comfy" in args.peers:
        try:
            sys.path.insert(0, os.path.abspath(".carry/ComfyUI"))
            import comfy.ldm.wan.model as wm
            import comfy.ops

            torch.manual_seed(0)
            cm = wm.WanModel(model_type="t2v", dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers,
                             operations=comfy.ops.disable_weight_init, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                for p in cm.parameters():
                    p.normal_(0, 0.02)
            outputs["comfy"] = run_model("comfyui", cm, cfg, resolutions)
            sd = {k: v for k, v in cm.state_dict().items()}
        except Exception:
            traceback.print_exc()
            RESULTS["comfy_error"] = traceback.format_exc()[-800:]
    if sd is None:
        ours0 = build_model(cfg, None, dtype=torch.bfloat16, device="cuda")
        with torch.no_grad():
            for p in ours0.parameters():
                p.normal_(0, 0.02)
        sd = ours0.state_dict()
    # --- ours, sharing the weights -----------------------------------------------------------
    for backend in [b for b in args.ours.split(",") if b]:
        try:
            m = build_model(cfg, sd, dtype=torch.bfloat16, device="cuda", source="comfy weights")
            m.set_attention(backend)
            outputs[f"ours_{backend}"] = run_model(f"ours[{backend}]", m, cfg, resolutions)
            del m
        except Exception:
            traceback.print_exc()
            RESULTS[f"ours_{backend}_error"] = traceback.format_exc()[-800:]
        gc.collect()
        torch.cuda.empty_cache()
    seen: dict[str, int] = {}
    for variant in args.compiled.split(",") if args.compile else []:
        # a variant named again is timed and kept apart ("name#2"): the same code first and last
        # in one process shows what the order alone changes
        seen[variant] = seen.get(variant, 0) + 1
        label = variant if seen[variant] == 1 else f"{variant}#{seen[variant]}"
        # compiled blocks (the default on CUDA); "fp8": FP8 linears (per-channel weights, per-token
        # activations, the FP8 kernel "auto": scaled_mm with fast accumulation on Hopper); "fast": FP8
        # linears + the 8-bit Triton self-attention; "-exact": the FP8 GEMMs without fast
        # accumulation (scaled_mm; what "fp8"/"fast" meant before 2026-11-26's second session;
        # "fast-accum" is an old name of "fast"); "@name" picks the self-attention backend (e.g.
        # "bf16@flash_attn3", "fast@fa3_fp8"; "fast@radial_attn": the block-sparse 8-bit kernel, with
        # "+sparse16" the bf16 sparse kernel, "+tile64x128w4s3" / "+plain" its tile and loop form,
        # `sparse_options`); a "+mk" suffix compiles with inductor's multi-kernel option
        try:
            torch._dynamo.reset()
            m = build_model(cfg, sd, dtype=torch.bfloat16, device="cuda")
            base, *flags = variant.split("+")
            base, _, attn = base.partition("@")  # "bf16@flash_attn3", "fast@fa3_fp8": another self-attention
            radial = None
            if attn and "radial" in attn:  # "fast@radial_attn": the 8-bit sparse kernel, as fast mode's model
                # cache chooses for an FP8 DiT; "+sparse16": the bf16 sparse kernel instead
                from wan_core.kernels.radial_attention import RadialOptions

                fast = base.startswith("fast") and "sparse16" not in flags
                radial = RadialOptions(kernel="fp8" if fast else "bf16")
                RESULTS[f"radial_{variant}"] = {"kernel": radial.kernel}
            m.set_attention(attn or ("sage_triton" if base.startswith("fast") else "sdpa_cudnn"), radial=radial)
            if "fulltext" in flags:  # "+fulltext": cross-attention to all 512 text rows through the
                # exact backend (FA3), not the text padding collapsed into one key (`text_attention`)
                from wan_core.models.dit import attend_all_text_rows

                for blk in m.blocks:
                    blk.cross_attn.text_attn_fn = attend_all_text_rows(blk.cross_attn.attn_fn)
            if "noproj" in flags:  # "+noproj": a short prompt's cross-attention not through its output
                # projection (`text_projected`): the text kernel's codes, then the FP8 projection
                unproject_text(m)
            mk = 2 if "mk2" in flags else 1 if "mk" in flags else 0
            if "res16" in flags:  # "+res16": the residual stream in bf16 between the matmuls
                m.set_residual_dtype(torch.bfloat16)
            if base != "bf16":
                from wan_core.layers.fp8 import quantize_model

                quantize_model(m, kernel="scaled_mm" if base.endswith("-exact") else "auto")
                gc.collect()
                torch.cuda.empty_cache()
            from wan_core.kernels import sage_attention

            sage_attention.TRITON_QUANTIZE = "torchquant" not in flags  # "+torchquant": q/k/v quantised by inductor
            sparse_options(sage_attention, flags)
            if "nofuse" not in flags:  # "+nofuse": the plain torch ops, all float32 work left to inductor
                import dataclasses

                from wan_core.kernels.block_ops import get_block_ops

                ops = get_block_ops("fused")
                if "noqk" in flags:  # "+noqk": q/k norm and RoPE left to inductor
                    ops = dataclasses.replace(ops, qk_norm_rope=get_block_ops("torch").qk_norm_rope)
                if "nocodes" in flags:  # "+nocodes": attention outputs handed to the FP8 projections in
                    # bf16 (each quantised by its projection), not stored as e4m3 codes by the kernels
                    plain = get_block_ops("torch")
                    ops = dataclasses.replace(ops, attend=plain.attend, cross_attend=plain.cross_attend)
                m.set_block_ops(ops)
                if "nofold" in flags:  # "+nofold": cross-attention's q normalised in a pass of its own,
                    # not its RMSNorm folded into the projected form (rows' factors, weight in the keys)
                    unfold_query_norm(m)
            for blk in m.blocks:  # "+mk": inductor's multi-kernel (persistent reductions up to 16k wide
                # where they time faster), "+mk2": persistent reductions forced; "+static": static
                # shapes only, as the pipeline compiles (`compile_blocks`); without it a 720p run
                # follows the 480p compile call, so dynamo recompiles it with dynamic shapes
                blk.compile(options={"triton.multi_kernel": mk} if mk else None, dynamic=False if "static" in flags else None)
            t0 = time.time()
            with torch.inference_mode():
                x, t, c = inputs(SHAPES["480p"])
                m(x, t, c)
            RESULTS[f"compile_{label}_s"] = time.time() - t0
            name = "ours[cudnn+compile]" if label == "bf16" else f"ours[{label}+compile]"
            fwd = m
            text = [int(f[4:]) for f in flags if re.fullmatch(r"text\d+", f)]
            if text:  # "+text16": a prompt of 16 T5 tokens (the model pads it to 512 rows, as a run
                # does), not 512 random rows
                fwd = lambda x, t, c, m=m, n=text[0]: m(x, t, [c[0, :n]])  # noqa: E731
            outputs["ours_compiled" if label == "bf16" else f"ours_{label}"] = run_model(name, fwd, cfg, resolutions)
            del m
        except Exception:
            traceback.print_exc()
            RESULTS[f"compile_{label}_error"] = traceback.format_exc()[-800:]
        gc.collect()
        torch.cuda.empty_cache()
    if "ours_compiled" in outputs:
        for k, v in outputs.items():
            if k.startswith("ours_") and k != "ours_compiled" and "480p" in v:
                RESULTS[f"cos_{k}_vs_ours_bf16_480p"] = cos(v["480p"], outputs["ours_compiled"]["480p"])
    variants = args.compiled.split(",") if args.compile else []
    first = ("ours_compiled" if variants[0] == "bf16" else f"ours_{variants[0]}") if variants else None
    eager = [b for b in args.ours.split(",") if b]
    first = f"ours_{eager[0]}" if eager else first  # the first of --ours, else of --compiled
    for k, v in outputs.items():  # every variant of ours against that one (e.g. radial against dense)
        if first in outputs and k.startswith("ours_") and k != first:
            for res in v.keys() & outputs[first].keys():
                RESULTS[f"cos_{k}_vs_{first}_{res}"] = cos(v[res], outputs[first][res])
    if "comfy" in outputs:
        for k, v in outputs.items():
            if k != "comfy" and "480p" in v:
                RESULTS[f"cos_{k}_vs_comfy_480p"] = cos(v["480p"], outputs["comfy"]["480p"])
    cm = sd = None
    gc.collect()
    torch.cuda.empty_cache()
    # --- diffusers ---------------------------------------------------------------------------
    if "diffusers" in args.peers:
        try:
            from diffusers import WanTransformer3DModel

            with torch.device("cuda"):
                dm = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                                           in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=cfg.ffn_dim,
                                           num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
            dm = dm.to(torch.bfloat16).eval()
            with torch.no_grad():
                for p in dm.parameters():
                    p.normal_(0, 0.02)
            run_model("diffusers", lambda x, t, c: dm(x, t, c, return_dict=False)[0], cfg, resolutions)
            del dm
        except Exception:
            traceback.print_exc()
            RESULTS["diffusers_error"] = traceback.format_exc()[-800:]

    with open(os.path.join(out_dir, "bench_dit.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    log(json.dumps({k: v for k, v in RESULTS.items() if k.startswith("cos_")}, indent=1))
    log(f"\n{'model':28s} {'res':5s} {'tokens':>7s} {'s/forward':>10s} {'TFLOP/s':>8s} {'peak GiB':>9s}")
    for name, res, L, t, tf, pk in ROWS:
        log(f"{name:28s} {res:5s} {L:7d} {t:10.3f} {tf:8.0f} {pk:9.1f}")


if __name__ == "__main__":
    main()
