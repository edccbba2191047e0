"""Loading the Wan2.1 DiT from every layout users bring.

Layouts (all mapped onto the official names, which are our module names):
- official Wan-AI: a folder with `config.json` and `diffusion_pytorch_model*.safetensors`
  (sharded with an index, or one file), or one `.safetensors` / `.pth` file;
- ComfyUI single files, with or without the `model.diffusion_model.` / `diffusion_model.` prefix;
- diffusers (`WanTransformer3DModel` names, e.g. a `*-Diffusers` repo's `transformer/` folder);
- lightx2v distill single files (official names).

The model is built on the meta device and the (memory-mapped) tensors are assigned, so no
second copy of the weights exists in RAM; each tensor is converted to its target dtype on its
way to the target device.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import torch

from ..models.config import WanConfig, config_from_json
from ..models.dit import FP32_PARAM_PATTERNS, WanModel
from .io import CheckpointError, read_metadata, read_state_dict

__all__ = [
    "PREFIXES",
    "detect_layout",
    "to_official",
    "official_to_diffusers",
    "find_dit_files",
    "build_model",
    "load_dit",
    "param_dtype",
    "save_dit",
]

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.")

# diffusers fragment -> official fragment, applied to the whole dotted name.
_DIFFUSERS_TO_OFFICIAL: list[tuple[str, str]] = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.add_k_proj\.", r"blocks.\1.cross_attn.k_img."),
    (r"^blocks\.(\d+)\.attn2\.add_v_proj\.", r"blocks.\1.cross_attn.v_img."),
    (r"^blocks\.(\d+)\.attn2\.norm_added_k\.", r"blocks.\1.cross_attn.norm_k_img."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),  # diffusers' norm2 is the (affine) cross-attention norm
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
]
_OFFICIAL_TO_DIFFUSERS: list[tuple[str, str]] = [
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^img_emb\.proj\.0\.", "condition_embedder.image_embedder.norm1."),
    (r"^img_emb\.proj\.1\.", "condition_embedder.image_embedder.ff.net.0.proj."),
    (r"^img_emb\.proj\.3\.", "condition_embedder.image_embedder.ff.net.2."),
    (r"^img_emb\.proj\.4\.", "condition_embedder.image_embedder.norm2."),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^blocks\.(\d+)\.self_attn\.o\.", r"blocks.\1.attn1.to_out.0."),
    (r"^blocks\.(\d+)\.self_attn\.([qkv])\.", r"blocks.\1.attn1.to_\2."),
    (r"^blocks\.(\d+)\.self_attn\.norm_([qk])\.", r"blocks.\1.attn1.norm_\2."),
    (r"^blocks\.(\d+)\.cross_attn\.o\.", r"blocks.\1.attn2.to_out.0."),
    (r"^blocks\.(\d+)\.cross_attn\.k_img\.", r"blocks.\1.attn2.add_k_proj."),
    (r"^blocks\.(\d+)\.cross_attn\.v_img\.", r"blocks.\1.attn2.add_v_proj."),
    (r"^blocks\.(\d+)\.cross_attn\.norm_k_img\.", r"blocks.\1.attn2.norm_added_k."),
    (r"^blocks\.(\d+)\.cross_attn\.([qkv])\.", r"blocks.\1.attn2.to_\2."),
    (r"^blocks\.(\d+)\.cross_attn\.norm_([qk])\.", r"blocks.\1.attn2.norm_\2."),
    (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
    (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
]
_COMPILED = {id(t): [(re.compile(a), b) for a, b in t] for t in (_DIFFUSERS_TO_OFFICIAL, _OFFICIAL_TO_DIFFUSERS)}


def _rename(name: str, table: list[tuple[str, str]]) -> str:
    for pat, rep in _COMPILED[id(table)]:
        new, n = pat.subn(rep, name)
        if n:
            return new
    return name


def _strip_prefix(keys: list[str]) -> str:
    """The prefix shared by the DiT keys of a ComfyUI/other file, or ''."""
    for p in PREFIXES:
        if any(k.startswith(p + "blocks.") for k in keys):
            return p
    return ""


def detect_layout(keys) -> str:
    """'official' or 'diffusers' (after prefix stripping); raises CheckpointError if neither."""
    keys = list(keys)
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys):
        return "diffusers"
    if any(k.startswith("blocks.") and ".self_attn." in k for k in keys) and any(
        k.startswith("patch_embedding.") for k in keys
    ):
        return "official"
    sample = ", ".join(keys[:5])
    raise CheckpointError(
        f"this does not look like a Wan2.1 DiT checkpoint (no 'blocks.N.self_attn.*' / 'patch_embedding.*' keys; "
        f"first keys: {sample or 'none'})"
    )


def to_official(sd: dict) -> dict:
    """Any supported DiT layout -> official names (values untouched, so mmap views survive)."""
    prefix = _strip_prefix(list(sd))
    if prefix:
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if detect_layout(sd) == "diffusers":
        sd = {_rename(k, _DIFFUSERS_TO_OFFICIAL): v for k, v in sd.items()}
    return sd


def official_to_diffusers(sd: dict) -> dict:
    return {_rename(k, _OFFICIAL_TO_DIFFUSERS): v for k, v in sd.items()}


def find_dit_files(path: str) -> tuple[list[str] | str, dict | None]:
    """A model folder or file -> (what to read, parsed config.json or None)."""
    if os.path.isdir(path):
        folder = path
        if os.path.isdir(os.path.join(path, "transformer")) and not any(
            f.startswith("diffusion_pytorch_model") for f in os.listdir(path)
        ):
            folder = os.path.join(path, "transformer")  # diffusers repo layout
        cfg = None
        cfg_path = os.path.join(folder, "config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
        for name in ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors"):
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name), cfg
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"no DiT weights (diffusion_pytorch_model*.safetensors) in folder {folder}")
        return [os.path.join(folder, f) for f in files], cfg
    if not os.path.exists(path):
        raise CheckpointError(f"DiT checkpoint not found: {path}")
    return path, None


def param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of a parameter: float32 for the small precision-sensitive ones, else `dtype`."""
    return torch.float32 if any(p in name for p in FP32_PARAM_PATTERNS) else dtype


def _check_keys(model_keys: set[str], sd_keys: set[str], source: str) -> None:
    missing = sorted(model_keys - sd_keys)
    unexpected = sorted(sd_keys - model_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:4]})")
        raise CheckpointError(f"{source}: the weights do not match the Wan2.1 DiT they describe: " + "; ".join(parts))


def build_model(
    cfg: WanConfig,
    sd: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    convert: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    source: str = "state dict",
) -> WanModel:
    """Build on the meta device and assign `sd` (official names); without `sd`, allocate empty weights.

    `convert(name, tensor)` may replace the default per-tensor conversion (to `param_dtype`).
    """
    with torch.device("meta"):
        model = WanModel(cfg)
    if sd is None:
        model = model.to_empty(device=device)
        for n, p in model.named_parameters():
            p.data = p.data.to(param_dtype(n, dtype))
        return model.eval().requires_grad_(False)
    expected = dict(model.state_dict())
    _check_keys(set(expected), set(sd), source)
    out = {}
    for k, v in sd.items():
        if convert is not None:
            out[k] = convert(k, v)
            continue
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        out[k] = v.to(device=device, dtype=param_dtype(k, dtype))
    model.load_state_dict(out, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def load_dit(
    path: str | list[str],
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    attention: str = "auto",
    cross_attention: str | None = None,
    task: str | None = None,
    config: dict | None = None,
) -> WanModel:
    """Load a Wan2.1 DiT from a folder, a file, a shard index or a list of shards.

    task: 't2v' or 'i2v' to check that the checkpoint fits the run (an I2V DiT cannot run a
    T2V task and vice versa); config: a config.json dict overriding the folder's. No layers: compile, LoRAs, offload are
    applied after (`wan_core.layers.stack`).
    """
    if isinstance(path, (list, tuple)):
        files, folder_cfg = list(path), None
    else:
        files, folder_cfg = find_dit_files(path)
    sd = to_official(read_state_dict(files))
    source = str(path)
    cfg_json = config if config is not None else folder_cfg
    if cfg_json is None:
        # Our own files (tiny demo models, converters) carry the config in the safetensors header.
        first = files[0] if isinstance(files, list) else files
        meta = read_metadata(first) if str(first).endswith(".safetensors") else {}
        if "wan_config" in meta:
            cfg_json = json.loads(meta["wan_config"])
    cfg = config_from_json(cfg_json or {}, sd, source=f"the architecture config of {source}")
    if task is not None and task != cfg.model_type:
        raise CheckpointError(
            f"{source}: this is a {cfg.model_type.upper()} DiT (in_dim {cfg.in_dim}), but the task is {task}; "
            f"use a Wan2.1-{task.upper()} checkpoint"
        )
    model = build_model(cfg, sd, dtype=dtype, device=device, source=source)
    model.set_attention(attention, cross_attention, device=device)
    model.set_block_ops("auto", device=device)  # fused single-pass ops on CUDA, plain torch elsewhere
    return model


def save_dit(
    sd: dict[str, torch.Tensor],
    out: str,
    layout: str = "wan",
    cfg: WanConfig | None = None,
    shards: int = 1,
) -> str:
    """Write an official-named DiT state dict in a real layout users bring (for tests, the tiny
    demo models and converters). Returns the path to hand to `load_dit`.

    layout 'wan': a Wan-AI folder (config.json + diffusion_pytorch_model*.safetensors, an index
    when sharded); 'comfyui': one file with the `model.diffusion_model.` prefix;
    'diffusers': a diffusers `transformer/` folder; 'single': one plain file (lightx2v style).
    """
    from safetensors.torch import save_file as _save

    sd = {k: v.contiguous() for k, v in sd.items()}
    meta = {"wan_config": json.dumps({k: getattr(cfg, k) for k in _CONFIG_JSON_KEYS})} if cfg is not None else None

    def save_file(tensors, path):
        _save(tensors, path, metadata=meta)

    if layout == "comfyui":
        path = out if out.endswith(".safetensors") else out + ".safetensors"
        save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, path)
        return path
    if layout == "single":
        path = out if out.endswith(".safetensors") else out + ".safetensors"
        save_file(sd, path)
        return path
    if layout == "diffusers":
        folder = os.path.join(out, "transformer")
        os.makedirs(folder, exist_ok=True)
        save_file(official_to_diffusers(sd), os.path.join(folder, "diffusion_pytorch_model.safetensors"))
        if cfg is not None:
            with open(os.path.join(folder, "config.json"), "w") as f:
                json.dump({"_class_name": "WanTransformer3DModel", "num_attention_heads": cfg.num_heads}, f)
        return out
    if layout != "wan":
        raise ValueError(f"unknown DiT layout {layout!r}: choose wan, comfyui, diffusers or single")
    os.makedirs(out, exist_ok=True)
    if cfg is not None:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"_class_name": "WanModel", **{k: getattr(cfg, k) for k in _CONFIG_JSON_KEYS}}, f, indent=1)
    if shards <= 1:
        save_file(sd, os.path.join(out, "diffusion_pytorch_model.safetensors"))
        return out
    names = list(sd)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in names[i * per : (i + 1) * per]}
        save_file(part, os.path.join(out, fname))
        weight_map.update(dict.fromkeys(part, fname))
    with open(os.path.join(out, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    return out


_CONFIG_JSON_KEYS = ("model_type", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim", "num_heads", "num_layers", "eps")
