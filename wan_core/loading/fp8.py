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

What the loader builds: the block linears whose file weights are fp8 become `FP8Linear`
(e4m3 codes kept as they are, mmap views on the CPU, no dequantise/requantise round trip;
an e5m2 weight is requantised per channel to e4m3); with `quantize=True` block linears stored in
high precision are quantised too (a bf16 checkpoint becomes an FP8 model tensor by tensor, no
second copy of the model in RAM). fp8 weights of the layers kept in high precision (embeddings,
head, time/text/image projections) are dequantised to the model dtype. Activation scales in a
file (`scale_input`, `input_scale`) are not used: our kernels compute them per token at run time.
"""

from __future__ import annotations

import json

import torch

from ..layers.fp8 import FP8_DTYPE, FP8Linear, is_block_linear, quantize_weight, set_fp8_kernel
from ..models.config import WanConfig, config_from_json
from ..models.dit import WanModel
from .dit import PREFIXES, _check_keys, find_dit_files, param_dtype, to_official
from .io import CheckpointError, read_keys, read_metadata, read_state_dict

__all__ = ["FP8_LAYOUTS", "detect_fp8_layout", "fp8_state_dict", "build_fp8_model", "load_fp8_dit"]

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


def build_fp8_model(
    cfg: WanConfig,
    sd: dict[str, torch.Tensor],
    scales: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    quantize: bool = False,
    source: str = "state dict",
) -> WanModel:
    """Build on the meta device with FP8Linear where the block linears have fp8 weights (or all
    block linears with `quantize`), assign the tensors (converted one by one), kernel 'dequant'."""
    with torch.device("meta"):
        model = WanModel(cfg)
    fp8_names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and is_block_linear(n) and (n in scales or (quantize and f"{n}.weight" in sd))
    ]
    for n in fp8_names:
        lin = model.get_submodule(n)
        parent, _, child = n.rpartition(".")
        fp8 = FP8Linear(lin.in_features, lin.out_features, lin.bias is not None, dtype, device="meta")
        setattr(model.get_submodule(parent), child, fp8)
    expected = dict(model.state_dict())
    _check_keys(set(expected), set(sd) | {f"{n}.weight_scale" for n in fp8_names}, source)

    out: dict[str, torch.Tensor] = {}
    fp8_set = set(fp8_names)
    for k, v in sd.items():
        name = k[: -len(".weight")] if k.endswith(".weight") else None
        want = tuple(expected[k].shape)
        if tuple(v.shape) != want:
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, expected {want}")
        if name in fp8_set:
            if name in scales and v.dtype == FP8_DTYPE:
                codes, scale = v, scales[name]
            else:  # e5m2 codes, or a high-precision weight with quantize=True
                w = v.float() * scales[name] if name in scales else v
                codes, scale = quantize_weight(w.to(device))
            out[k] = codes.to(device)
            out[f"{name}.weight_scale"] = scale.to(device=device, dtype=torch.float32)
        elif name is not None and name in scales:  # fp8 weight of a layer we keep in high precision
            out[k] = (v.to(device).float() * scales[name].to(device)).to(param_dtype(k, dtype))
        else:
            out[k] = v.to(device=device, dtype=param_dtype(k, dtype))
    model.load_state_dict(out, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def load_fp8_dit(
    path: str | list[str],
    kernel: str = "auto",
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    quantize: bool = False,
    attention: str = "auto",
    cross_attention: str | None = None,
    task: str | None = None,
    config: dict | None = None,
) -> WanModel:
    """Load a Wan2.1 DiT whose block linears are FP8 (any layout of this module), ready to run.

    kernel: FP8 matmul kernel or LightX2V scheme (`wan_core.layers.fp8`), resolved once for `device`;
    dtype: compute dtype of everything that is not fp8; quantize: also quantise block linears
    the file holds in high precision (per-channel scales), e.g. to run a bf16 checkpoint in FP8;
    the rest as `wan_core.loading.dit.load_dit`.
    """
    if isinstance(path, (list, tuple)):
        files, folder_cfg = list(path), None
    else:
        files, folder_cfg = find_dit_files(path)
    source = str(path)
    first = files[0] if isinstance(files, list) else files
    meta = read_metadata(first) if str(first).endswith((".safetensors", ".sft", ".index.json")) else {}
    sd, scales, layout = fp8_state_dict(read_state_dict(files), meta, source)
    if not scales and not quantize:
        raise CheckpointError(
            f"{source}: no fp8 weights in this checkpoint (layout {layout}); load it with load_dit, "
            "or pass quantize=True to quantise its block linears on load"
        )
    cfg_json = config if config is not None else folder_cfg
    if cfg_json is None and "wan_config" in meta:
        cfg_json = json.loads(meta["wan_config"])
    cfg = config_from_json(cfg_json or {}, sd, source=f"the architecture config of {path}")
    if task is not None and task != cfg.model_type:
        raise CheckpointError(
            f"{source}: this is a {cfg.model_type.upper()} DiT (in_dim {cfg.in_dim}), but the task is {task}; "
            f"use a Wan2.1-{task.upper()} checkpoint"
        )
    model = build_fp8_model(cfg, sd, scales, dtype=dtype, device=device, quantize=quantize, source=source)
    model.set_attention(attention, cross_attention, device=device)
    model.set_block_ops("auto", device=device)  # fused single-pass ops on CUDA, plain torch elsewhere
    set_fp8_kernel(model, kernel, device)
    return model
