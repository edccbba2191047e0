"""The command line: `python -m wan_core <subcommand> ...` (also installed as `wan-core`).

    python -m wan_core demo                                   # tiny model, short video, CPU, no downloads
    python -m wan_core --model_cls wan2.1 --task t2v --model_path Wan2.1-T2V-14B \\
        --config_json configs/wan_t2v.json --prompt "..." --save_result_path out.mp4
    python -m wan_core tiny-model --task i2v --out tiny --layout comfyui
    python -m wan_core convert-fp8 Wan2.1-T2V-14B t2v_fp8.safetensors --lora distill_lora.safetensors
    python -m wan_core calibrate-cache --dit my_dit.safetensors --embeds prompt_embeds.safetensors

Without a subcommand the arguments are LightX2V's (`python -m lightx2v.infer ...`), i.e.
`generate`; the LoRA / FP8 / feature-caching / CPU-offload variants are config JSON keys
(`wan_core.pipeline`). Several GPUs: the same command under torchrun, with the config's
`parallel` block (LightX2V's `cfg_p_size`, `seq_p_size`, `seq_p_attn_type`):

    torchrun --nproc_per_node=2 -m wan_core --model_path Wan2.1-T2V-14B \
        --config_json configs/wan_t2v_dist_ulysses.json --prompt "..." --save_result_path out.mp4

Every process logs warnings only except the first, which shows the progress and writes the file.

Errors: a user error (a bad flag, key, path or value) is one line `error: ...` (exit 2), checked
before any model loads; `--debug` (anywhere on the line) or WAN_CORE_DEBUG=1 adds the traceback.
SIGTERM is handled like Ctrl-C: the run stops, no partial video is left (exit 130).
Adding a subcommand is one function decorated with `@subcommand(name, help)`: it receives its
argparse parser, adds its arguments, and returns the function that runs it. A tool that owns its
whole command line (`main(argv) -> int`) is mounted with `@passthrough(name, help)` instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable

__all__ = ["main", "build_parser", "subcommand", "passthrough"]

_SUBCOMMANDS: dict[str, tuple[str, Callable]] = {}
_PASSTHROUGH: dict[str, Callable[[], Callable[[list[str]], int]]] = {}  # name -> () -> main(argv)


def subcommand(name: str, help: str):
    """Register `setup(parser) -> run(args) -> int` as the subcommand `name`."""

    def register(setup: Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]):
        _SUBCOMMANDS[name] = (help, setup)
        return setup

    return register


def passthrough(name: str, help: str):
    """Register `get_main() -> main(argv) -> int` as the subcommand `name`: everything after the
    name is handed to that main unchanged (its own parser, its own --help)."""

    def register(get_main: Callable[[], Callable[[list[str]], int]]):
        _SUBCOMMANDS[name] = (help, None)
        _PASSTHROUGH[name] = get_main
        return get_main

    return register


_EPILOG = (
    "Without a subcommand the arguments are LightX2V's and run `generate`: "
    "python -m wan_core --model_path Wan2.1-T2V-14B --config_json cfg.json --prompt '...' is "
    "python -m wan_core generate --model_path ... (see `python -m wan_core generate --help`). "
    "--debug (or WAN_CORE_DEBUG=1) shows the traceback of an error."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wan_core", description="Wan2.1 text/image-to-video (wan_core engine)", epilog=_EPILOG
    )
    subs = parser.add_subparsers(dest="command", metavar="{" + ",".join(_SUBCOMMANDS) + "}")
    for name, (help_text, setup) in _SUBCOMMANDS.items():
        if setup is None:  # a passthrough tool: listed here, run by main() before parsing
            subs.add_parser(name, help=help_text, add_help=False)
            continue
        p = subs.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(run=setup(p))
    return parser


class _TqdmHandler(logging.Handler):
    """Log lines printed above a running progress bar instead of through it."""

    def emit(self, record):
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _is_main_process() -> bool:
    """False on the ranks > 0 of a torchrun world (they stay quiet: one progress bar, one log)."""
    return os.environ.get("RANK", "0") == "0"


def _setup_logging() -> None:
    log = logging.getLogger("wan_core")
    if not any(isinstance(h, _TqdmHandler) for h in log.handlers):
        h = _TqdmHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
    log.setLevel(logging.INFO if _is_main_process() else logging.WARNING)
    log.propagate = False
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"


# ----------------------------------------------------------------------------- generate


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model files (any of them overrides what model_path holds)")
    g.add_argument("--dit_path", help="DiT file, shard index or folder")
    g.add_argument("--high_noise_path", help="Wan2.2 A14B high-noise expert (file, shard index or folder)")
    g.add_argument("--low_noise_path", help="Wan2.2 A14B low-noise expert (file, shard index or folder)")
    g.add_argument("--t5_path", help="umT5-XXL encoder file")
    g.add_argument("--tokenizer_path", help="google/umt5-xxl tokenizer folder")
    g.add_argument("--vae_path", help="VAE file (Wan2.1; TI2V-5B: the Wan2.2 VAE)")
    g.add_argument("--clip_path", help="CLIP ViT-H/14 file (i2v)")
    g = p.add_argument_group("run")
    g.add_argument("--dtype", default="auto", help="bf16 | fp16 | fp32 | auto (bf16 on GPU, fp32 on CPU)")
    g.add_argument("--device", default="auto", help="cuda | cuda:N | cpu | auto")
    g.add_argument("--attention", default="auto", help="attention backend when the config names none (sdpa, sdpa_cudnn, flash_attn3, ...)")


# LightX2V flags that change nothing here: accepted, with a warning.
_IGNORED_FLAGS = ("use_prompt_enhancer", "warmup", "return_result_tensor")


@subcommand("generate", "Generate a video (LightX2V's flags and config JSON)")
def _generate_setup(p: argparse.ArgumentParser):
    p.add_argument("--model_cls", default="wan2.1",
                   help="wan2.1 | wan2.1_distill | wan2.2_moe (A14B) | wan2.2_moe_distill (A14B 4-step) | wan2.2 (TI2V-5B)")  # fmt: skip
    p.add_argument("--task", default="t2v", choices=["t2v", "i2v"])
    p.add_argument("--model_path", help="model folder (Wan-AI, ComfyUI models/ or diffusers layout)")
    p.add_argument("--config_json", help="LightX2V config JSON (infer_steps, target_height, sample_shift, ...)")
    p.add_argument("--prompt", default="")
    p.add_argument("--negative_prompt", default="", help="default: Wan's official negative prompt (used with CFG)")
    p.add_argument("--image_path", default="", help="input image (i2v)")
    p.add_argument("--seed", type=int, default=42, help="-1 draws a random seed")
    p.add_argument("--save_result_path", default="wan_core_result.mp4")
    p.add_argument("--save_latent", metavar="PATH", help="also save the final latent [1, 16, F, h, w] (torch.save, float32)")
    p.add_argument("--num_frames", dest="target_video_length", type=int, help="overrides target_video_length")
    p.add_argument("--target_shape", type=int, nargs=2, metavar=("H", "W"), help="overrides target_height/width")
    p.add_argument("--video_crf", type=int, help="x264 crf of the saved mp4, 0..51 (default 19; overrides video_crf)")
    p.add_argument("--video_preset", help="x264 speed preset of the saved mp4 (default medium; overrides video_preset)")
    p.add_argument("--allow-large", "--allow_large", dest="allow_large", action="store_true",
                   help="run even when the size estimate exceeds this machine's memory (config key allow_large_runs)")  # fmt: skip
    p.add_argument("--use_prompt_enhancer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--return_result_tensor", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--support_tasks", nargs="+", default=[], help=argparse.SUPPRESS)
    p.add_argument("--aspect_ratio", default="", help=argparse.SUPPRESS)
    _add_model_args(p)

    def run(args) -> int:
        from .inputs import check_prompt, check_save_path, check_seed
        from .models.conditioning import load_image
        from .pipeline import WanPipeline

        # the run's own inputs, before any model loads (the settings are checked by create_generator)
        check_seed(args.seed)
        check_prompt(args.prompt)
        check_prompt(args.negative_prompt, "negative_prompt")
        if _is_main_process():
            check_save_path(args.save_result_path, "--save_result_path")
        image = load_image(args.image_path) if args.task == "i2v" and args.image_path else None
        for flag in _IGNORED_FLAGS:
            if getattr(args, flag):
                warnings.warn(f"--{flag} is accepted for LightX2V compatibility and ignored", stacklevel=1)
        if args.support_tasks or args.aspect_ratio:
            warnings.warn("--support_tasks / --aspect_ratio are accepted for LightX2V compatibility and ignored", stacklevel=1)
        params = {}
        if args.target_video_length is not None:
            params["target_video_length"] = args.target_video_length
        if args.target_shape:
            params["target_height"], params["target_width"] = args.target_shape
        for key in ("video_crf", "video_preset"):
            if getattr(args, key) is not None:
                params[key] = getattr(args, key)
        if args.allow_large:
            params["allow_large_runs"] = True
        pipe = WanPipeline(
            args.model_path, args.model_cls, args.task, dit_path=args.dit_path, t5_path=args.t5_path,
            tokenizer_path=args.tokenizer_path, vae_path=args.vae_path, clip_path=args.clip_path,
            dtype=args.dtype, device=args.device, attention=args.attention,
            high_noise_path=args.high_noise_path, low_noise_path=args.low_noise_path,
        )  # fmt: skip
        # under torchrun, create_generator joins the world and builds the models on this rank's GPU
        pipe.create_generator(args.config_json, **params)
        main_rank = pipe.parallel_run is None or pipe.parallel_run.is_main
        result = pipe.generate(
            seed=args.seed, prompt=args.prompt, negative_prompt=args.negative_prompt,
            image_path=args.image_path or None, image=image, save_result_path=args.save_result_path, progress=main_rank,
            return_latent=bool(args.save_latent),
        )  # fmt: skip
        if main_rank and args.save_latent:
            import torch

            torch.save(result.latent, args.save_latent)
        pipe.close()  # a multi-process run: wait for every rank, then leave the process group
        if main_rank:
            print(f"saved {result.path}: {result.summary()}")
        return 0

    return run


# ----------------------------------------------------------------------------- tiny-model / demo


@subcommand("tiny-model", "Write a tiny random-weight model in a real file layout (tests, demos)")
def _tiny_setup(p: argparse.ArgumentParser):
    p.add_argument("--task", default="t2v", choices=["t2v", "i2v", "ti2v"], help="ti2v: Wan2.2 TI2V-5B")
    p.add_argument("--out", required=True, help="folder to write (the model_path)")
    p.add_argument("--layout", default="wan", choices=["wan", "comfyui", "diffusers"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", default="wan2.1", choices=["wan2.1", "wan2.2"], help="wan2.2: A14B experts, TI2V-5B")

    def run(args) -> int:
        from .loading.tiny import write_tiny_model

        path = write_tiny_model(args.out, args.task, args.layout, args.seed, family=args.family)
        print(f"wrote a tiny random {args.family} {args.task} model ({args.layout} layout) to {path}")
        return 0

    return run


def _demo_image(path: str) -> str:
    """A synthetic start image (colour gradient with a disc), so the i2v demo needs no file."""
    import numpy as np
    from PIL import Image

    h, w = 240, 416
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 23.0)], -1)
    img[(yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (h / 4) ** 2] = (1.0, 0.8, 0.2)
    Image.fromarray((img * 255).astype("uint8")).save(path)
    return path


# demo: (family, task) -> (tiny model task, model_cls, pipeline task)
_DEMO_MODELS = {
    ("wan2.1", "t2v"): ("t2v", "wan2.1_distill", "t2v"),
    ("wan2.1", "i2v"): ("i2v", "wan2.1_distill", "i2v"),
    ("wan2.2", "t2v"): ("t2v", "wan2.2_moe_distill", "t2v"),  # A14B: two experts, step split 2 of 4
    ("wan2.2", "i2v"): ("i2v", "wan2.2_moe_distill", "i2v"),
    ("wan2.2", "ti2v"): ("ti2v", "wan2.2", "i2v"),  # TI2V-5B with the demo image as frame 0
}


@subcommand("demo", "Generate a short video with a tiny random model on the CPU (no downloads)")
def _demo_setup(p: argparse.ArgumentParser):
    p.add_argument("--task", default="t2v", choices=["t2v", "i2v", "ti2v"],
                   help="ti2v: Wan2.2 TI2V-5B (text + the demo image; implies --family wan2.2)")  # fmt: skip
    p.add_argument("--family", default="wan2.1", choices=["wan2.1", "wan2.2"],
                   help="wan2.2: the two-expert A14B model (t2v, i2v) at 4 steps, or TI2V-5B (ti2v)")  # fmt: skip
    p.add_argument("--prompt", default="a red fox running through a snowy forest, cinematic")
    p.add_argument("--save_result_path", default="wan_core_demo.mp4")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache_dir", help="where the tiny model is kept (default ~/.cache/wan_core or $WAN_CORE_CACHE)")

    def run(args) -> int:
        from .loading.tiny import tiny_model_dir
        from .pipeline import WanPipeline
        from .sampling.schedulers import DISTILL_STEPS

        family = "wan2.2" if args.task == "ti2v" else args.family
        tiny_task, model_cls, task = _DEMO_MODELS[family, args.task]
        model = tiny_model_dir(tiny_task, root=args.cache_dir, family=family)
        print(f"tiny random-weight {family} model: {model}  (the video shows noise patterns: the weights are random)")
        pipe = WanPipeline(model, model_cls, task, device=args.device, dtype="fp32")
        steps = {} if model_cls == "wan2.2" else dict(denoising_step_list=list(DISTILL_STEPS))
        pipe.create_generator(
            target_video_length=args.frames, target_height=args.height, target_width=args.width,
            sample_shift=5.0, enable_cfg=False, infer_steps=4, **steps,
        )  # fmt: skip
        image = _demo_image(os.path.join(model, "demo_image.png")) if task == "i2v" else None
        result = pipe.generate(args.seed, args.prompt, image_path=image, save_result_path=args.save_result_path, progress=True)
        print(f"saved {result.path}: {result.summary()}")
        return 0

    return run


# ----------------------------------------------------------------------------- tools


@subcommand("convert-fp8", "Convert a DiT checkpoint (optionally with LoRAs merged) to per-channel FP8 safetensors")
def _convert_setup(p: argparse.ArgumentParser):
    from . import convert

    convert.add_arguments(p)
    return convert.run


@passthrough("calibrate-cache", "Fit TeaCache coefficients / MagCache ratios for a DiT (uncached sampling runs)")
def _calibrate_main():
    from .layers.cache.calibrate import main as calibrate_main

    return calibrate_main


# ----------------------------------------------------------------------------- entry


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe a mistake in the input (exit 2, message only)."""
    from .loading.io import CheckpointError
    from .models.tokenizer import TokenizerError
    from .options import FeatureNotAvailable

    return (OSError, ValueError, TypeError, CheckpointError, TokenizerError, FeatureNotAvailable, ImportError)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 2000 else text[:1997] + "..."


def _sigterm_as_interrupt():
    """SIGTERM (a scheduler, `kill`, `docker stop`) stops the run as Ctrl-C does: the same cleanup path.
    Returns the previous handler (None where signals cannot be set: not the main thread)."""
    import signal
    import threading

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("WAN_CORE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "generate")  # LightX2V style: flags only
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    previous = _sigterm_as_interrupt()
    try:
        if argv[0] in _PASSTHROUGH:
            _setup_logging()
            return _PASSTHROUGH[argv[0]]()(argv[1:])
        args = parser.parse_args(argv)
        _setup_logging()
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted: stopped, no partial video left", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError as e:  # re-worded by the pipeline: the offload settings that would fit
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 3
    except Exception as e:
        if debug:
            import traceback

            traceback.print_exc()
        user = isinstance(e, _user_errors())
        hint = "" if debug else " (--debug shows the traceback)"
        what = "" if user else f"{type(e).__name__}: "
        print(f"error: {what}{_one_line(e)}{'' if user else hint}", file=sys.stderr)
        return 2 if user else 1
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)
