"""Loading FP8 Wan2.1 DiT files in every layout users bring (FORMATS.md "FP8 weight layouts").

Layouts (`detect_fp8_layout` names them):
- "lightx2v": per-channel scaled e4m3, `X.weight` float8_e4m3fn [out, in] + `X.weight_scale`
  float32 [out, 1] (LightX2V's `scaled_fp8_e4m3` distill models; its "fp8-pertensor" files put
  a scalar in `X.weight_scale`, broadcast here).
- "comfyui_scaled": ComfyUI's per-tensor `fp8_scaled`: `X.weight` float8 + `X.scale_weight` (a
  float32 scalar), optionally `X.scale_input`, and a marker tensor `scaled_fp8` (its dtype is
  the weights' fp8 dtype; 2 elements mean "do not use the fp8 matmul"). As ComfyUI does, an fp8
  weight without `scale_weight` in such a file has scale 1.
- "comfyui_quant": newer ComfyUI mixed-precision files: per layer `X.comfy_quant`, UTF-8 JSON
  bytes stored as a uint8 tensor (e.g. {"format": "float8_e4m3fn"}), with `X.weight_scale`
  (a float32 scalar for the fp8 formats) and optionally `X.input_scale`; the same per-layer
  JSON may instead sit in the safetensors header under `_quantization_metadata` ({"layers":
  {name: {...}}}). Weights may be stored as uint8 bytes, reinterpreted as the named fp8 dtype.
- "plain_fp8": weights stored as float8_e4m3fn with no scale at all (scale 1).
- "none": no fp8 tensor (a bf16/fp16/fp32 checkpoint).
Keys may carry ComfyUI's `model.diffusion_model.` prefix or diffusers names (`to_official`).

What this module returns (`read_fp8_dit`, `fp8_state_dict`): official names, fp8 weights as
stored (e4m3/e5m2 codes, memory-mapped, nothing dequantised) and one float32 [out, 1] scale per
fp8 weight, whatever the layout. Activation scales in a file (`scale_input`, `input_scale`) are
dropped: our kernels compute them per token at run time. It builds nothing: the FP8 model (block
linears swapped for `FP8Linear`, quantise-on-load of a high-precision file) is built by the FP8
layer, `wan_core.layers.fp8_build.load_fp8_dit`, so the loaders import no layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..models.config import WanConfig, config_from_json
from .dit import PREFIXES, find_dit_files, to_official
from .io import CheckpointError, read_keys, read_metadata, read_state_dict

__all__ = ["FP8_LAYOUTS", "Fp8Checkpoint", "detect_fp8_layout", "fp8_state_dict", "read_fp8_dit"]

FP8_LAYOUTS = ("lightx2v", "comfyui_scaled", "comfyui_quant", "plain_fp8", "none")

_FP8_DTYPES = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
# Per-layer tensors that are not module parameters of ours: consumed (scales) or ignored (input scales).
_EXTRA_SUFFIXES = (".weight_scale", ".scale_weight", ".scale_input", ".input_scale", ".comfy_quant")


def _last(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _is_fp8_dtype_str(s: str) -> bool:
    # safetensors header dtypes ("F8_E4M3", "F8_E5M2") or torch dtypes ("torch.float8_e4m3fn")
    return s.upper().startswith("F8") or "float8" in s


def _layout_from(dtypes: dict[str, str], meta: dict[str, str]) -> str:
    keys = list(dtypes)
    if "_quantization_metadata" in meta or any(k.endswith(".comfy_quant") for k in keys):
        return "comfyui_quant"
    if any(_last(k) == "scaled_fp8" or k.endswith(".scale_weight") for k in keys):
        return "comfyui_scaled"
    if any(k.endswith(".weight_scale") for k in keys):
        return "lightx2v"
    if any(k.endswith(".weight") and _is_fp8_dtype_str(d) for k, d in dtypes.items()):
        return "plain_fp8"
    return "none"


def detect_fp8_layout(source) -> str:
    """Which FP8 layout a DiT file (path: header only, no tensor data read) or state dict holds.

    Returns one of FP8_LAYOUTS.
    """
    if isinstance(source, dict):
        dtypes = {k: str(v.dtype) if isinstance(v, torch.Tensor) else str(v[1]) for k, v in source.items()}
        return _layout_from(dtypes, {})
    files, _ = find_dit_files(source) if isinstance(source, str) else (source, None)
    dtypes = {k: d for k, (_, d) in read_keys(files).items()}
    first = files[0] if isinstance(files, list) else files
    meta = read_metadata(first) if str(first).endswith((".safetensors", ".sft", ".index.json")) else {}
    return _layout_from(dtypes, meta)


def _layer_quant_conf(raw: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, dict]:
    """comfy_quant per-layer JSON (tensors and/or header) keyed by the layer name as written."""
    conf: dict[str, dict] = {}
    if "_quantization_metadata" in meta:
        try:
            layers = json.loads(meta["_quantization_metadata"]).get("layers", {})
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"unreadable _quantization_metadata in the file header ({e})") from e
        conf.update({k: v for k, v in layers.items() if isinstance(v, dict)})
    for k in [k for k in raw if k.endswith(".comfy_quant")]:
        t = raw.pop(k)
        try:
            conf[k[: -len(".comfy_quant")]] = json.loads(bytes(t.to(torch.uint8).flatten().tolist()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{k}: not a JSON quantisation config ({e})") from e
    return conf


def _strip(name: str) -> str:
    for p in PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name


def _scale_as_column(scale: torch.Tensor, out_features: int, name: str) -> torch.Tensor:
    """A per-tensor scalar or per-channel vector -> float32 [out, 1]."""
    s = scale.float()
    if s.numel() == 1:
        return s.reshape(1, 1).expand(out_features, 1).contiguous()
    if s.numel() == out_features and (s.dim() == 1 or tuple(s.shape) == (out_features, 1)):
        return s.reshape(out_features, 1)
    raise CheckpointError(
        f"{name}: scale of shape {tuple(s.shape)} is neither per-tensor nor per-output-channel ({out_features}); "
        "block-wise FP8 scales are not supported"
    )


def fp8_state_dict(
    raw: dict[str, torch.Tensor], meta: dict[str, str] | None = None, source: str = "state dict"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """Any FP8 layout -> (official-named tensors, {linear name: float32 [out, 1] scale} of its fp8
    weights, layout). fp8 weights are returned as stored (e4m3/e5m2), with uint8 ComfyUI weights
    reinterpreted; scales are broadcast to per-channel. Nothing is dequantised here.
    """
    meta = meta or {}
    raw = dict(raw)
    layout = _layout_from({k: str(v.dtype) for k, v in raw.items()}, meta)
    for k in [k for k in raw if _last(k) == "scaled_fp8"]:
        raw.pop(k)  # the marker only says "this file is scaled fp8": the tensors say the rest
    quant_conf = {_strip(k): v for k, v in _layer_quant_conf(raw, meta).items()}
    sd = to_official(raw)

    scales: dict[str, torch.Tensor] = {}
    weight_names = [k[: -len(".weight")] for k in sd if k.endswith(".weight")]
    for name in weight_names:
        w = sd[f"{name}.weight"]
        conf = quant_conf.get(name)
        if conf is not None:
            fmt = conf.get("format")
            if fmt not in _FP8_DTYPES:
                raise CheckpointError(
                    f"{source}: layer {name} is quantised as {fmt!r}; only ComfyUI's float8_e4m3fn and float8_e5m2 "
                    "formats are supported"
                )
            if w.dtype == torch.uint8:
                w = w.view(_FP8_DTYPES[fmt])  # older files store the fp8 bytes as uint8
            if w.dtype != _FP8_DTYPES[fmt]:
                raise CheckpointError(f"{source}: {name}.weight is {w.dtype} but its comfy_quant says {fmt}")
            sd[f"{name}.weight"] = w
            if f"{name}.weight_scale" not in sd:
                raise CheckpointError(f"{source}: {name} is marked {fmt} (comfy_quant) but has no {name}.weight_scale")
        if w.dtype == torch.uint8:
            raise CheckpointError(
                f"{source}: {name}.weight is stored as uint8 without a comfy_quant format saying what it is"
            )
        if not w.dtype.is_floating_point or w.element_size() != 1:
            for suffix in (".weight_scale", ".scale_weight"):
                if f"{name}{suffix}" in sd:
                    raise CheckpointError(f"{source}: {name}{suffix} belongs to a weight of dtype {w.dtype}, not fp8")
            continue
        if f"{name}.weight_scale" in sd:
            s = sd.pop(f"{name}.weight_scale")
        elif f"{name}.scale_weight" in sd:
            s = sd.pop(f"{name}.scale_weight")
        elif layout in ("comfyui_scaled", "plain_fp8"):
            s = torch.ones(())  # ComfyUI initialises a missing scale_weight to 1; plain files have none
        else:
            raise CheckpointError(
                f"{source}: {name}.weight is {w.dtype} but {name}.weight_scale is missing "
                f"(a {layout} file needs a scale for every fp8 weight)"
            )
        scales[name] = _scale_as_column(s, w.shape[0], f"{source}: {name}")
    for k in [k for k in sd if k.endswith((".scale_input", ".input_scale"))]:
        sd.pop(k)  # static activation scales: we quantise activations per token at run time
    orphans = [k for k in sd if k.endswith(_EXTRA_SUFFIXES)]
    if orphans:
        raise CheckpointError(f"{source}: scale tensors without a matching fp8 weight: {orphans[:4]}")
    return sd, scales, layout


@dataclass(frozen=True)
class Fp8Checkpoint:
    """A DiT file read into our FP8 layout (`fp8_state_dict`) with its architecture: nothing built."""

    cfg: WanConfig
    sd: dict[str, torch.Tensor]  # official names; fp8 weights as stored, the rest as in the file
    scales: dict[str, torch.Tensor]  # {linear name: float32 [out, 1]} of the fp8 weights
    layout: str  # one of FP8_LAYOUTS
    source: str  # the path as given, for error messages


def read_fp8_dit(path: str | list[str], task: str | None = None, config: dict | None = None) -> Fp8Checkpoint:
    """Read a Wan2.1 DiT file in any layout of this module (a high-precision one gives no scales).

    task: 't2v' or 'i2v' to check that the checkpoint fits the run; config: a config.json dict
    overriding the folder's (else the folder's, else the `wan_config` header of our own files).
    """
    if isinstance(path, (list, tuple)):
        files, folder_cfg = list(path), None
    else:
        files, folder_cfg = find_dit_files(path)
    source = str(path)
    first = files[0] if isinstance(files, list) else files
    meta = read_metadata(first) if str(first).endswith((".safetensors", ".sft", ".index.json")) else {}
    sd, scales, layout = fp8_state_dict(read_state_dict(files), meta, source)
    cfg_json = config if config is not None else folder_cfg
    if cfg_json is None and "wan_config" in meta:
        cfg_json = json.loads(meta["wan_config"])
    cfg = config_from_json(cfg_json or {}, sd, source=f"the architecture config of {path}")
    if task is not None and task != cfg.model_type:
        raise CheckpointError(
            f"{source}: this is a {cfg.model_type.upper()} DiT (in_dim {cfg.in_dim}), but the task is {task}; "
            f"use a Wan2.1-{task.upper()} checkpoint"
        )
    return Fp8Checkpoint(cfg, sd, scales, layout, source)
