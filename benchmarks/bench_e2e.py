"""A whole Wan2.1-14B T2V run at 480x832x81 with random weights, timed per stage, through
`WanPipeline.generate` (the same code as every door): umT5-XXL text encode, 4-step distill
sampling (no CFG; `--steps 50 --cache Mag`: the base model's run with CFG and feature caching;
`--task i2v`: I2V-14B with its CLIP and VAE encode, from a random image), VAE decode, mp4 save (x264 crf 19, preset medium; `--presets medium,faster` also
times other x264 presets). Variants: DiT in bf16, in FP8 (scaled_mm), fast mode
(FP8 + the 8-bit Triton self-attention); "-offload": the DiT waits in host RAM during the T5.

"Weights already in RAM": the models are built before the timed run. The text encoder lives
in host RAM and visits the GPU only for its stage (`--t5 host`, the default), so the peak
is the DiT's plus the activations, not DiT + T5; `--t5 gpu` keeps it on the GPU (an 80 GB card
holds both: 11 GB of T5 beside the FP8 DiT's 25 GB peak).

  python benchmarks/bench_e2e.py [--variants bf16,fp8] [--runs 2]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_dit import log, unfold_query_norm, unproject_text  # noqa: E402
from wan_core import pipeline as wan_pipeline  # noqa: E402
from wan_core.layers.compile import compile_blocks  # noqa: E402
from wan_core.loading.dit import build_model  # noqa: E402
from wan_core.models.config import PRESETS  # noqa: E402
from wan_core.models.text_encoder import WanTextEncoder  # noqa: E402
from wan_core.models.tokenizer import load_tokenizer, write_tiny_tokenizer  # noqa: E402
from wan_core.models.vae import WanVAE  # noqa: E402
from wan_core.options import GenerationConfig  # noqa: E402
from wan_core.pipeline import WanPipeline  # noqa: E402
from wan_core.spec import ModelSpec  # noqa: E402


class HostResidentEncoder:
    """The text encoder kept in (pinned) host RAM, moved to the GPU only while it encodes."""

    def __init__(self, enc: WanTextEncoder, device: str):
        self.enc, self.device = enc, device
        self.params = list(enc.model.parameters()) + list(enc.model.buffers())
        for p in self.params:
            p.data = p.data.to("cpu").pin_memory()
        self.host = [p.data for p in self.params]

    def encode(self, prompts):
        for p, h in zip(self.params, self.host):
            p.data = h.to(self.device, non_blocking=True)
        out = [o.to(self.device) for o in self.enc.encode(prompts)]
        for p, h in zip(self.params, self.host):
            p.data = h  # the GPU copies are freed
        return out


def random_t5(device: str):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", is_encoder_decoder=False, dropout_rate=0.0)
    with torch.device(device):
        m = UMT5EncoderModel(cfg).to(torch.bfloat16).eval()
    tok_dir = write_tiny_tokenizer(os.path.join(tempfile.mkdtemp(), "umt5"))
    return WanTextEncoder(m, load_tokenizer(tok_dir))


def random_clip(device: str):
    """The CLIP ViT-H/14 image tower of Wan2.1 I2V with random weights, bf16."""
    from wan_core.models.image_encoder import WanImageEncoder

    with torch.device(device):
        m = WanImageEncoder()
    return m.to(torch.bfloat16).eval()


def random_dit(variant: str, preset: str = "t2v-14b"):
    """bf16, fp8 (FP8 linears) or fast (FP8 linears + 8-bit Triton self-attention); compiled.
    "@name" picks the self-attention backend ("fast@fa3_fp8": FlashAttention-3's e4m3 kernel;
    "fast@radial_attn": the block-sparse 8-bit kernel, as the model cache gives an FP8 DiT; a
    "+res16" suffix: the residual stream in bf16; "+noproj": the cross-attention not through its
    output projection, `text_projected`; "+nofold": its q normalised in a pass of its own, not the
    RMSNorm folded into the projected form)."""
    res16, noproj, nofold = "+res16" in variant, "+noproj" in variant, "+nofold" in variant
    variant, _, attn = variant.replace("+res16", "").replace("+noproj", "").replace("+nofold", "").partition("@")
    attn = attn.split("-")[0]  # "fast@fa3_fp8-offload"
    fp8 = variant.startswith(("fp8", "fast"))
    cfg = PRESETS[preset]
    m = build_model(cfg, None, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    if fp8:
        from wan_core.layers.fp8 import quantize_model

        quantize_model(m, kernel="auto")
    radial = None
    if attn.startswith("radial"):  # the options the model cache gives: the 8-bit sparse kernel on an FP8 DiT
        from wan_core.kernels.radial_attention import for_model

        radial = for_model(None, fp8, "cuda")
    m.set_attention(attn or ("sage_triton" if variant.startswith("fast") else "auto"), radial=radial)
    m.set_block_ops("auto")  # the fused ops, as a CUDA build chooses
    if nofold:
        unfold_query_norm(m)
    if res16:
        m.set_residual_dtype(torch.bfloat16)
    if noproj:
        unproject_text(m)
    compile_blocks(m)
    return m


def random_pipeline(task: str, cfg: GenerationConfig, dit, t5, vae, clip) -> WanPipeline:
    """A `WanPipeline` over models built here (no files): sampling leases `dit`."""
    pipe = WanPipeline(dit_path="random", task=task, device="cuda")
    pipe.spec, pipe.config = ModelSpec(dit="random", device="cuda", task=task), cfg
    pipe.dit, pipe.text_encoder, pipe.vae, pipe.image_encoder = dit, t5, vae, clip
    wan_pipeline.lease = lambda spec, dit=dit: contextlib.nullcontext(dit)
    return pipe


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="bf16,fp8,fp8-offload")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--t5", default="host", choices=["host", "gpu"],
                    help="host: the T5 waits in pinned RAM and visits the GPU for its stage; gpu: it stays there")
    ap.add_argument("--presets", default="medium", help="x264 presets of the mp4, each timed --runs times (video_preset)")
    ap.add_argument("--size", default="480x832", help="HxW of the video (720x1280: the 720p run)")
    ap.add_argument("--task", default="t2v", choices=["t2v", "i2v"], help="i2v: I2V-14B with its CLIP, from a random image")
    ap.add_argument("--steps", type=int, default=4, help="4: the step-distill schedule, no CFG; else base sampling, CFG")
    ap.add_argument("--cfg", type=float, default=5.0, help="guidance scale of a base (not 4-step) run")
    ap.add_argument("--cache", default="NoCaching", help="feature_caching of the run: NoCaching, Tea or Mag (published tables)")
    ap.add_argument("--warm-steps", type=int, default=2, help="steps of the compiling warm-up run when --steps is not 4")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT", ".")
    results = {"device": torch.cuda.get_device_name()}
    t0 = time.time()
    t5 = random_t5("cuda")  # initialised on the GPU
    if args.t5 == "host":
        t5 = HostResidentEncoder(t5, "cuda")  # then kept in pinned RAM
    gc.collect()
    torch.cuda.empty_cache()
    log(f"T5 built in RAM ({time.time() - t0:.0f} s)")
    with torch.device("cuda"):
        vae = WanVAE()
    vae = vae.to(torch.bfloat16).eval()
    clip = random_clip("cuda") if args.task == "i2v" else None
    height, width = (int(v) for v in args.size.split("x"))
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=g).numpy() if clip is not None else None
    rows = []
    for variant in [v for v in args.variants.split(",") if v]:
        dit = random_dit(variant, "i2v-14b" if args.task == "i2v" else "t2v-14b")
        handle = None
        if variant.endswith("-offload"):
            # The DiT waits in pinned host RAM while the T5 runs, and comes to the GPU for sampling
            # (model-granularity offload): the T5 and the DiT are never on the GPU together.
            from wan_core.layers.offload import enable_offload

            handle = enable_offload(dit, granularity="model", device="cuda")
        presets = args.presets.split(",")
        if args.steps == 4:
            cfg = GenerationConfig(infer_steps=4, denoising_step_list=[1000, 750, 500, 250], sample_guide_scale=1.0,
                                   target_height=height, target_width=width)  # fmt: skip
        else:  # the base model's run: CFG at every step, the default shift
            cfg = GenerationConfig(infer_steps=args.steps, sample_guide_scale=args.cfg, target_height=height,
                                   target_width=width, feature_caching=args.cache)  # fmt: skip
        pipe = random_pipeline(args.task, cfg, dit, t5, vae, clip)
        schedule = [(0, presets[0])] + [(run, p) for p in presets for run in range(1, args.runs + 1)]  # run 0 compiles
        for run, preset in schedule:
            if handle is not None:
                handle.unload()
            warm = {"infer_steps": args.warm_steps} if run == 0 and args.steps != 4 else {}  # compiles, shorter
            pipe.config = cfg.updated({"video_preset": preset, **warm})
            name = variant if preset == "medium" else f"{variant} x264 {preset}"
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = pipe.generate(seed=run, prompt="a cat surfing a wave at sunset", image=image,
                                save_result_path=os.path.join(out_dir, f"e2e_{variant}.mp4"))
            wall = time.perf_counter() - t0
            tag = "warm-up (compiles)" if run == 0 else f"run {run}"
            log(f"{name} {tag}: {wall:.2f} s; {res.summary()}; steps {[round(s, 2) for s in res.step_times]}")
            if pipe.cache_report is not None:
                log(f"  cache: {pipe.cache_report.summary()}")
            if run > 0:
                results[f"{name}_run{run}"] = dict(wall_s=wall, timings=res.timings, step_times=res.step_times,
                                                   peak_GiB=res.peak_memory / 2**30, video_preset=preset,
                                                   cache=pipe.cache_report.summary() if pipe.cache_report else None)
                if run == args.runs:
                    rows.append((name, wall, res.timings, res.peak_memory / 2**30))
        if handle is not None:
            handle.remove()
        # Drop every reference to this variant's DiT before the next one is built (the patched
        # lease's default argument and dynamo's compiled-code caches hold it), or its memory
        # shows in the next variant's peak.
        wan_pipeline.lease = None
        pipe = dit = handle = res = None
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "bench_e2e.json"), "w") as f:
        json.dump(results, f, indent=1)
    run = "4-step, no CFG" if args.steps == 4 else f"{args.steps} steps, CFG {args.cfg}, feature_caching {args.cache}"
    log(f"\n{args.task.upper()} {args.size}x81, {run}, 14B random weights in RAM, T5 on the {'GPU' if args.t5 == 'gpu' else 'host (visits the GPU)'}")
    log(f"{'DiT (mp4: x264 medium unless named)':36s} {'total s':>8s} {'text':>6s} {'image':>6s} {'sampling':>9s} {'vae':>6s} {'save':>6s} {'peak GiB':>9s}")
    for v, wall, tm, pk in rows:
        log(f"{v:36s} {wall:8.2f} {tm.get('text_encode', 0):6.2f} {tm.get('image_encode', 0):6.2f} {tm.get('sampling', 0):9.2f} "
            f"{tm.get('vae_decode', 0):6.2f} {tm.get('save', 0):6.2f} {pk:9.2f}")


if __name__ == "__main__":
    main()
