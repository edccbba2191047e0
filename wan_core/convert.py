"""Converter: a high-precision Wan2.1 DiT checkpoint -> per-channel scaled FP8 safetensors.

The output is in the lightx2v layout (`X.weight` float8_e4m3fn [out, in] + `X.weight_scale`
float32 [out, 1] for each block linear; every other tensor as the model holds it: float32 for
the norms, modulation, head and time layers, the model dtype for the rest), official names, and
the architecture in the safetensors header (`wan_config`), so `load_fp8_dit` (and LightX2V's
`fp8-*` schemes) read it back. LoRAs can be merged into the high-precision weights first:
merging before the cast loses nothing beyond the cast itself (merging into FP8 codes would).

A tool, not a loader (it builds the FP8 layer and merges LoRAs), so it sits beside the CLI that
mounts it as `python -m wan_core convert-fp8 ...`:

  convert-fp8 SRC DST [--lora FILE[:STRENGTH]]... [--dtype bf16|fp32] [--layout single|comfyui]
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence

import torch

from .layers.fp8 import FP8Linear, quantize_model
from .loading.dit import load_dit, save_dit

__all__ = ["convert_to_fp8", "fp8_export_state_dict", "add_arguments", "run", "main"]

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def _merge_loras(model, loras: Sequence[tuple[str, float]]) -> None:
    try:
        lora = importlib.import_module("wan_core.layers.lora")
    except ImportError as e:
        raise RuntimeError(
            "merging LoRAs before the FP8 conversion needs wan_core.layers.lora (apply_loras), which this installation "
            "does not have; convert without --lora, or merge the LoRA into the bf16 checkpoint first"
        ) from e
    apply = getattr(lora, "apply_loras", None)
    if apply is None:
        raise RuntimeError("wan_core.layers.lora has no apply_loras(model, loras, mode='merge'); cannot merge LoRAs")
    # keep_originals=False: the merge is baked in for good, no copy of the touched weights is kept
    apply(model, list(loras), mode="merge", keep_originals=False)


def fp8_export_state_dict(model) -> dict[str, torch.Tensor]:
    """The tensors of a quantised model as the lightx2v layout stores them (CPU, contiguous)."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.detach().to("cpu").contiguous()
    if not any(isinstance(m, FP8Linear) for m in model.modules()):
        raise ValueError("the model has no FP8 linears to export")
    return out


def convert_to_fp8(
    src: str | list[str],
    dst: str,
    loras: Sequence[tuple[str, float]] | None = None,
    before_quantize: Callable[[torch.nn.Module], None] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    layout: str = "single",
    config: dict | None = None,
) -> str:
    """Convert a DiT checkpoint (any layout `load_dit` reads) to an FP8 file; returns its path.

    loras: [(file, strength)] merged into the weights before quantising (needs wan_core.layers.lora);
    before_quantize: a hook called with the loaded high-precision model (merging, edits);
    dtype: precision the model is held in before quantising (bf16 for a bf16 checkpoint keeps
    RAM at one model; float32 for float32 sources); layout: 'single' (plain official names, the
    lightx2v file) or 'comfyui' (`model.diffusion_model.` prefix).
    """
    if layout not in ("single", "comfyui"):
        raise ValueError(f"FP8 output layout must be 'single' or 'comfyui', got {layout!r}")
    model = load_dit(src, dtype=dtype, device="cpu", config=config)
    if loras:
        _merge_loras(model, loras)
    if before_quantize is not None:
        before_quantize(model)
    quantize_model(model, kernel="dequant")
    return save_dit(fp8_export_state_dict(model), dst, layout=layout, cfg=model.cfg)


def _lora_arg(s: str) -> tuple[str, float]:
    path, sep, tail = s.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass  # a ':' that is part of the path (C:\...)
    return s, 1.0


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("src", help="DiT checkpoint: Wan-AI folder, single file, ComfyUI or diffusers layout")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        type=_lora_arg,
        metavar="FILE[:STRENGTH]",
        help="LoRA merged into the weights before quantising (repeatable; strength 1 by default)",
    )
    p.add_argument(
        "--dtype", default="bf16", choices=sorted(_DTYPES), help="precision the weights are held in before quantising"
    )
    p.add_argument("--layout", default="single", choices=["single", "comfyui"], help="key layout of the output file")
    return p


def run(args: argparse.Namespace) -> int:
    out = convert_to_fp8(args.src, args.dst, loras=args.lora or None, dtype=_DTYPES[args.dtype], layout=args.layout)
    print(out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m wan_core convert-fp8",
        description="Convert a Wan2.1 DiT checkpoint to per-channel scaled FP8 (lightx2v layout).",
    )
    return run(add_arguments(p).parse_args(argv))
