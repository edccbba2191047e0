"""Tiny random-weight Wan models written in the real file layouts, for demos and tests.

A tiny model has the architecture of the real one at toy width (a 2-block DiT 64 wide, a 2-layer
umT5 32 wide with a trained 384-piece tokenizer, the Wan VAE at base width 8, a 3-block CLIP
tower 80 wide at the real 224 px / 257 tokens) and runs a whole generation on the CPU in
seconds. Every file is written the way the real one is, so the same loaders, discovery and
CLI paths run on it. Wan2.1 (this file):

- `wan`:       a Wan-AI folder (`config.json` + `diffusion_pytorch_model.safetensors`,
               `models_t5_umt5-xxl-enc-bf16.pth` + `google/umt5-xxl/`, `Wan2.1_VAE.pth`,
               `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`);
- `comfyui`:   `diffusion_models/`, `text_encoders/` (tokenizer inside as `spiece_model`), `vae/`,
               `clip_vision/` with the file names of ComfyUI's repackaged Wan2.1 files;
- `diffusers`: a `*-Diffusers` pipeline folder that `WanPipeline.from_pretrained` /
               `WanImageToVideoPipeline.from_pretrained` load (needs diffusers to write).

Wan2.2 (`family="wan2.2"`: the A14B expert pairs and TI2V-5B) is written by `tiny22.py`. All layouts
of one (family, task, seed) hold the same values (see `tiny_parts.py`).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

from .tiny_parts import (
    TINY_CLIP,
    TINY_DIT,
    TINY_T5,
    TINY_VAE_DIM,
    diffusers_transformer_config,
    exact_half,
    readable_by_all,
    save,
    tiny_clip_tower,
    tiny_dit22_config,
    tiny_dit22_state_dict,
    tiny_dit_config,
    tiny_dit_state_dict,
    tiny_t5,
    tiny_vae22_state_dict,
    tiny_vae_state_dict,
    write_diffusers_scheduler,
    write_diffusers_vae,
    write_json,
    write_t5,
)

__all__ = [
    "LAYOUTS",
    "FAMILIES",
    "TINY_DIT",
    "TINY_T5",
    "TINY_CLIP",
    "TINY_VAE_DIM",
    "COMFY_NAMES",
    "write_tiny_model",
    "tiny_model_dir",
    "tiny_dit_config",
    "tiny_dit_state_dict",
    "tiny_dit22_config",
    "tiny_dit22_state_dict",
    "tiny_t5",
    "tiny_clip_tower",
    "tiny_vae_state_dict",
    "tiny_vae22_state_dict",
]

LAYOUTS = ("wan", "comfyui", "diffusers")
FAMILIES = ("wan2.1", "wan2.2")
COMFY_NAMES = {
    "t2v": "diffusion_models/wan2.1_t2v_14B_bf16.safetensors",
    "i2v": "diffusion_models/wan2.1_i2v_480p_14B_bf16.safetensors",
    "t5": "text_encoders/umt5_xxl_fp16.safetensors",
    "vae": "vae/wan_2.1_vae.safetensors",
    "clip": "clip_vision/clip_vision_h.safetensors",
}


def _clip_to_wan(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Canonical tower names -> the `visual.*` names of Wan's open-clip file (q/k/v fused into to_qkv)."""
    dim = sd["embeddings.class_embedding"].shape[0]
    renames = {
        "layer_norm1": "norm1",
        "layer_norm2": "norm2",
        "self_attn.out_proj": "attn.proj",
        "mlp.fc1": "mlp.0",
        "mlp.fc2": "mlp.2",
    }
    out = {
        "visual.cls_embedding": sd["embeddings.class_embedding"].view(1, 1, dim),
        "visual.pos_embedding": sd["embeddings.position_embedding.weight"][None],  # [1, tokens, dim]
        "visual.patch_embedding.weight": sd["embeddings.patch_embedding.weight"],
        "visual.head": exact_half(torch.randn(dim, 16, generator=torch.Generator().manual_seed(seed)) / dim**0.5),
        "log_scale": torch.tensor(4.6052),
    }
    for k, v in sd.items():
        if k.startswith("pre_layrnorm."):
            out["visual.pre_norm." + k.split(".", 1)[1]] = v
        elif k.startswith("post_layernorm."):
            out["visual.post_norm." + k.split(".", 1)[1]] = v
        elif k.startswith("encoder.layers."):
            _, _, i, rest = k.split(".", 3)
            sub, kind = rest.rsplit(".", 1)
            if sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if sub.endswith("q_proj"):  # rows [q; k; v]
                    parts = [sd[f"encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                    out[f"visual.transformer.{i}.attn.to_qkv.{kind}"] = torch.cat(parts)
            else:
                out[f"visual.transformer.{i}.{renames[sub]}.{kind}"] = v
    return out


def _write_wan(out, task, dit_sd, cfg, t5, tok_dir, vae_sd, clip_sd, seed):
    from .dit import save_dit

    save_dit(dit_sd, out, layout="wan", cfg=cfg)
    write_t5(out, "wan", t5, tok_dir)
    save(vae_sd, os.path.join(out, "Wan2.1_VAE.pth"))
    if task == "i2v":
        save(_clip_to_wan(clip_sd, seed), os.path.join(out, "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"))


def _write_comfyui(out, task, dit_sd, cfg, t5, tok_dir, vae_sd, clip_sd, seed):
    from .dit import save_dit

    os.makedirs(os.path.join(out, "diffusion_models"), exist_ok=True)
    save_dit(
        {k: v.bfloat16() if v.is_floating_point() else v for k, v in dit_sd.items()},
        os.path.join(out, COMFY_NAMES[task]),
        layout="comfyui",
        cfg=cfg,
    )
    write_t5(out, "comfyui", t5, tok_dir, COMFY_NAMES["t5"])
    save(vae_sd, os.path.join(out, COMFY_NAMES["vae"]), torch.bfloat16)
    if task == "i2v":
        proj = exact_half(
            torch.randn(
                16, clip_sd["embeddings.class_embedding"].shape[0], generator=torch.Generator().manual_seed(seed)
            )
            / 9
        )
        tensors = {"vision_model." + k: v for k, v in clip_sd.items()} | {"visual_projection.weight": proj}
        save(tensors, os.path.join(out, COMFY_NAMES["clip"]), torch.float16)


def _write_diffusers(out, task, dit_sd, cfg, t5, tok_dir, vae_sd, clip_sd, seed):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from .dit import save_dit

    save_dit(dit_sd, out, layout="diffusers", cfg=cfg)
    write_json(os.path.join(out, "transformer", "config.json"), diffusers_transformer_config(cfg))
    write_t5(out, "diffusers", t5, tok_dir)
    write_diffusers_vae(out, vae_sd, wan22=False)
    write_diffusers_scheduler(out, 3.0 if task == "i2v" else 5.0)
    index = {
        "_class_name": "WanImageToVideoPipeline" if task == "i2v" else "WanPipeline",
        "_diffusers_version": "0.33.0",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if task == "i2v":
        model = CLIPVisionModel(CLIPVisionConfig(hidden_act="gelu", layer_norm_eps=1e-5, **TINY_CLIP))
        missing, unexpected = getattr(model, "vision_model", model).load_state_dict(clip_sd, strict=False)
        if unexpected or any(not k.endswith("position_ids") for k in missing):
            raise RuntimeError(f"tiny CLIP does not fit CLIPVisionModel: missing {missing}, unexpected {unexpected}")
        model.save_pretrained(os.path.join(out, "image_encoder"))
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
            os.path.join(out, "image_processor")
        )
        index["image_encoder"] = ["transformers", "CLIPVisionModel"]
        index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    write_json(os.path.join(out, "model_index.json"), index)


_WRITERS = {"wan": _write_wan, "comfyui": _write_comfyui, "diffusers": _write_diffusers}


def write_tiny_model(
    out: str | os.PathLike, task: str = "t2v", layout: str = "wan", seed: int = 0, family: str = "wan2.1"
) -> str:
    """Write a complete tiny random model for `task` in `layout` under `out`; returns `out` (the model_path).

    family 'wan2.1': task 't2v' | 'i2v'; 'wan2.2': 't2v' | 'i2v' (the A14B high- and low-noise experts,
    different weights) | 'ti2v' (TI2V-5B with the Wan2.2 VAE). The text encoder is the same in both.
    """
    from ..models.tokenizer import load_tokenizer, write_tiny_tokenizer

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    tasks = ("t2v", "i2v", "ti2v") if family == "wan2.2" else ("t2v", "i2v")
    if task not in tasks:
        raise ValueError(
            f"a tiny {family} model's task is one of {tasks}, got {task!r}"
            + (" (ti2v is Wan2.2: family wan2.2)" if task == "ti2v" else "")
        )
    if layout not in _WRITERS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "diffusers":
        try:
            import diffusers  # noqa: F401
        except ImportError as e:
            raise ImportError("writing the diffusers layout needs the diffusers package (pip install diffusers)") from e
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is an existing file: give a folder (new or existing) for the model")
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = write_tiny_tokenizer(os.path.join(tmp, "umt5-xxl"), seed=seed)
        t5 = tiny_t5(len(load_tokenizer(tok_dir)), seed)
        if family == "wan2.2":
            from .tiny22 import write_tiny22

            write_tiny22(out, task, layout, seed, t5, tok_dir)
        else:
            cfg = tiny_dit_config(task)
            dit_sd = tiny_dit_state_dict(task, seed)
            clip_sd = tiny_clip_tower(seed) if task == "i2v" else None
            _WRITERS[layout](out, task, dit_sd, cfg, t5, tok_dir, tiny_vae_state_dict(seed), clip_sd, seed)
    what = task if family == "wan2.1" else f"{family} {task}"
    with open(os.path.join(out, "TINY_RANDOM_MODEL.txt"), "w") as f:
        f.write(f"wan_core tiny random-weight {what} model, {layout} layout, seed {seed}: for tests and demos only.\n")
    readable_by_all(out)
    return out


def tiny_model_dir(task: str = "t2v", layout: str = "wan", root: str | None = None, family: str = "wan2.1") -> str:
    """A tiny model in a per-user cache folder (written on first use, atomically)."""
    root = root or os.environ.get("WAN_CORE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "wan_core")
    name = f"tiny-{task}-{layout}-v1" if family == "wan2.1" else f"tiny-{family}-{task}-{layout}-v1"
    path = os.path.join(root, name)
    if os.path.isfile(os.path.join(path, "TINY_RANDOM_MODEL.txt")):
        return path
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tiny-{task}-", dir=root)
    try:
        write_tiny_model(tmp, task, layout, family=family)
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race
            if not os.path.isfile(os.path.join(path, "TINY_RANDOM_MODEL.txt")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
