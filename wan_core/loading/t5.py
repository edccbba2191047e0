"""Key maps for the umT5-XXL text encoder, from every layout users bring onto transformers names.

Our text encoder is transformers' `UMT5EncoderModel`, so the canonical names are the transformers
ones (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q.weight`, ...). Layouts:
- Wan's `models_t5_umt5-xxl-enc-bf16.pth`: the official module names (`token_embedding`,
  `blocks.N.attn.q`, `blocks.N.ffn.gate.0` / `fc1` / `fc2`, `blocks.N.pos_embedding.embedding`,
  `norm`); lightx2v's quantized variants of it add `X.weight_scale` next to int8/fp8 weights;
- ComfyUI's `umt5_xxl_fp16.safetensors` / `umt5_xxl_fp8_e4m3fn_scaled.safetensors`: transformers
  names, possibly behind a prefix, possibly without the tied `encoder.embed_tokens` copy, with the
  sentencepiece model as a uint8 tensor `spiece_model`; the fp8 file stores float8 weights with a
  per-tensor `X.scale_weight` and a `scaled_fp8` marker tensor.
Quantized weights are dequantized on load (`weight * scale`, computed in fp32, then cast once to
the compute dtype); float weights already in the compute dtype stay memory-mapped views.
`load_text_encoder` reads a file of any of these layouts (and finds its tokenizer) into a
`wan_core.models.text_encoder.WanTextEncoder`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from ..models.text_encoder import WanTextEncoder, build_umt5_encoder
from ..models.tokenizer import TEXT_LEN, TokenizerError, load_tokenizer
from .io import CheckpointError, read_state_dict

__all__ = [
    "UMT5Checkpoint",
    "wan_key_to_transformers",
    "transformers_key_to_wan",
    "detect_layout",
    "wan_to_transformers",
    "transformers_to_wan",
    "convert_umt5_state_dict",
    "load_umt5_checkpoint",
    "find_tokenizer",
    "load_text_encoder",
]

# Wan name -> transformers name. The gated FFN: Wan's `gate.0` is the GELU branch (`wi_0`), its
# `fc1` the linear branch (`wi_1`), its `fc2` the output projection (`wo`).
_WAN_TO_HF: list[tuple[str, str]] = [
    (r"^token_embedding\.weight$", "shared.weight"),
    (r"^norm\.weight$", "encoder.final_layer_norm.weight"),
    (r"^blocks\.(\d+)\.norm1\.weight$", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"^blocks\.(\d+)\.attn\.([qkvo])\.weight$", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (
        r"^blocks\.(\d+)\.pos_embedding\.embedding\.weight$",
        r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    (r"^blocks\.(\d+)\.norm2\.weight$", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"^blocks\.(\d+)\.ffn\.gate\.0\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (r"^blocks\.(\d+)\.ffn\.fc1\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (r"^blocks\.(\d+)\.ffn\.fc2\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
]
_HF_TO_WAN: list[tuple[str, str]] = [
    (r"^shared\.weight$", "token_embedding.weight"),
    (r"^encoder\.final_layer_norm\.weight$", "norm.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$", r"blocks.\1.norm1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight$", r"blocks.\1.attn.\2.weight"),
    (
        r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$",
        r"blocks.\1.pos_embedding.embedding.weight",
    ),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$", r"blocks.\1.norm2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight$", r"blocks.\1.ffn.gate.0.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight$", r"blocks.\1.ffn.fc1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight$", r"blocks.\1.ffn.fc2.weight"),
]
_TIED = "encoder.embed_tokens.weight"  # transformers' second name for shared.weight

# A key that exists in one layout only, to find the layout and the prefix in front of the names.
_ANCHORS = {
    "wan": "blocks.0.ffn.gate.0.weight",
    "transformers": "encoder.block.0.layer.0.SelfAttention.q.weight",
}
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI per-tensor / lightx2v per-channel
_DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")  # activation scales, format tags
_DROPPED_NAMES = ("scaled_fp8",)  # ComfyUI's marker tensor
_IGNORED_HF_PREFIXES = ("decoder.", "lm_head.")  # a full encoder-decoder checkpoint: keep the encoder


def _rename(key: str, table: list[tuple[str, str]]) -> str | None:
    for pattern, replacement in table:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    return None


def wan_key_to_transformers(key: str) -> str | None:
    """The transformers name of a Wan T5 key, None if the key is not part of the encoder."""
    return _rename(key, _WAN_TO_HF)


def transformers_key_to_wan(key: str) -> str | None:
    """The Wan name of a transformers UMT5 encoder key (the tied `encoder.embed_tokens` -> None)."""
    return _rename(key, _HF_TO_WAN)


def detect_layout(keys) -> tuple[str, str]:
    """("wan" | "transformers", prefix) of a umT5 encoder state dict; CheckpointError otherwise."""
    keys = list(keys)
    for layout, anchor in _ANCHORS.items():
        for k in keys:
            if k.endswith(anchor):
                prefix = k[: -len(anchor)]
                if prefix == "" or prefix.endswith("."):
                    return layout, prefix
    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    raise CheckpointError(
        "not a umT5 text encoder checkpoint: it has neither Wan's T5 names "
        f"('{_ANCHORS['wan']}') nor transformers' UMT5 names ('{_ANCHORS['transformers']}'); "
        f"first keys: {shown}"
    )


def wan_to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Wan-layout state dict (no prefix, no scales) to transformers names, tied copy included."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        new = wan_key_to_transformers(k)
        if new is None:
            raise CheckpointError(f"unexpected key in a Wan T5 checkpoint: {k}")
        out[new] = v
    if "shared.weight" in out:
        out[_TIED] = out["shared.weight"]
    return out


def transformers_to_wan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers UMT5 encoder names to Wan's (the tied copy is dropped)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k == _TIED:
            continue
        new = transformers_key_to_wan(k)
        if new is None:
            raise CheckpointError(f"unexpected key in a transformers UMT5 encoder state dict: {k}")
        out[new] = v
    return out


def _is_quantized(t: torch.Tensor) -> bool:
    return not t.dtype.is_floating_point or t.dtype in (
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        getattr(torch, "float8_e4m3fnuz", torch.float8_e4m3fn),
        getattr(torch, "float8_e5m2fnuz", torch.float8_e5m2),
    )


def _dequantize(name: str, weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """weight * scale in fp32, cast once to `dtype`; scale is a scalar, `[out]` or `[out, 1]`."""
    w = weight.to(torch.float32)
    if scale is None:
        return w.to(dtype)  # plain fp8 file: scale 1
    s = scale.to(torch.float32)
    if s.numel() == 1:
        s = s.reshape(())
    elif s.numel() == w.shape[0] and w.ndim == 2:
        s = s.reshape(w.shape[0], 1)  # per output channel: [out] or [out, 1] -> [out, 1]
    else:
        raise CheckpointError(
            f"{name}: scale of shape {list(scale.shape)} does not fit a weight of shape {list(weight.shape)} "
            "(only per-tensor and per-output-channel scales are supported)"
        )
    return (w * s).to(dtype)


@dataclass
class UMT5Checkpoint:
    """A umT5 encoder state dict in transformers names (tied copy included) plus what came with it."""

    state_dict: dict[str, torch.Tensor]
    layout: str  # "wan" | "transformers"
    prefix: str
    spiece_model: bytes | None  # ComfyUI's embedded sentencepiece model, if any
    quantized: bool  # the file stored quantized weights (now dequantized)


def convert_umt5_state_dict(
    sd: dict[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> UMT5Checkpoint:
    """Any supported layout -> transformers names, dequantized, on `device`, in `dtype`.

    `dtype` / `device` None: keep each tensor's own. Each tensor moves to `device` before it is
    cast or dequantized (no full-size intermediate copy on the host); tensors already in place
    are passed through untouched (memory-mapped views stay views).
    """
    spiece = None
    for k in list(sd):
        if k == "spiece_model" or k.endswith(".spiece_model"):
            spiece = sd[k].detach().contiguous().view(torch.uint8).numpy().tobytes()
    layout, prefix = detect_layout(k for k in sd if not k.endswith("spiece_model"))

    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith("spiece_model"):
            continue
        if not k.startswith(prefix):
            raise CheckpointError(f"unexpected key outside the '{prefix}' prefix of the T5 weights: {k}")
        name = k[len(prefix) :]
        if name in _DROPPED_NAMES or name.endswith(_DROPPED_SUFFIXES):
            continue
        scale_suffix = next((s for s in _SCALE_SUFFIXES if name.endswith(s)), None)
        if scale_suffix is not None:
            scales[name[: -len(scale_suffix)] + ".weight"] = v
            continue
        weights[name] = v

    if "shared.weight" in weights:
        weights.pop(_TIED, None)  # the tied copy is the same tensor: convert it once
    quantized = False
    out: dict[str, torch.Tensor] = {}
    for name, v in weights.items():
        if layout == "wan":
            new = wan_key_to_transformers(name)
        elif name.startswith(_IGNORED_HF_PREFIXES):
            scales.pop(name, None)
            continue
        else:
            new = name if name == _TIED or transformers_key_to_wan(name) is not None else None
        if new is None:
            raise CheckpointError(f"unexpected key in a umT5 encoder checkpoint ({layout} layout): {prefix}{name}")
        scale = scales.pop(name, None)
        if device is not None:
            v = v.to(device)
            scale = scale.to(device) if scale is not None else None
        if _is_quantized(v) or scale is not None:
            quantized = True
            v = _dequantize(prefix + name, v, scale, dtype or torch.bfloat16)
        elif dtype is not None and v.dtype != dtype:
            v = v.to(dtype)
        out[new] = v
    if scales:
        raise CheckpointError(f"scale tensors without a matching weight: {sorted(scales)[:5]}")

    if "shared.weight" not in out and _TIED in out:
        out["shared.weight"] = out[_TIED]
    if "shared.weight" in out:
        out[_TIED] = out["shared.weight"]  # one tensor under both names: tied, never copied
    return UMT5Checkpoint(out, layout, prefix, spiece, quantized)


def load_umt5_checkpoint(
    path, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> UMT5Checkpoint:
    """Read (memory-mapped) and convert a umT5 encoder file: see `convert_umt5_state_dict`."""
    return convert_umt5_state_dict(read_state_dict(path), dtype, device)


def find_tokenizer(checkpoint) -> str | None:
    """The `google/umt5-xxl` folder beside a Wan-AI checkpoint file, if there is one."""
    if not isinstance(checkpoint, (str, os.PathLike)):
        return None
    folder = os.path.join(os.path.dirname(os.path.abspath(os.fspath(checkpoint))), "google", "umt5-xxl")
    return folder if os.path.isdir(folder) else None


def load_text_encoder(
    checkpoint,
    tokenizer=None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    text_len: int = TEXT_LEN,
) -> WanTextEncoder:
    """Load the encoder from a checkpoint file (any supported layout) and find its tokenizer.

    `tokenizer`: a `google/umt5-xxl` folder, a `spiece.model` file, sentencepiece bytes or a
    `UMT5Tokenizer`. If None: the `spiece_model` tensor inside the checkpoint (ComfyUI files),
    else the `google/umt5-xxl` folder beside the checkpoint (Wan-AI model folders), else a
    TokenizerError. The tokenizer is resolved before any weight is converted.
    """
    raw = read_state_dict(checkpoint)
    detect_layout(k for k in raw if not k.endswith("spiece_model"))  # not a T5 file: fail here
    if tokenizer is None:
        embedded = next((v for k, v in raw.items() if k.endswith("spiece_model")), None)
        tokenizer = embedded if embedded is not None else find_tokenizer(checkpoint)
    if tokenizer is None:
        raise TokenizerError(
            f"{checkpoint}: no tokenizer given, none embedded in the file (ComfyUI 'spiece_model') and no "
            "google/umt5-xxl folder beside it; pass tokenizer=<path to the google/umt5-xxl folder>"
        )
    tok = load_tokenizer(tokenizer, text_len)
    ckpt = convert_umt5_state_dict(raw, dtype=dtype, device=device)
    return WanTextEncoder(build_umt5_encoder(ckpt.state_dict), tok)
