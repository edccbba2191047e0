"""Find the component files of a Wan2.1 model in a folder, whatever layout the user has.

Three folder layouts are recognised (file names from the public repositories):
- Wan-AI (`Wan-AI/Wan2.1-T2V-14B`, `-I2V-14B-480P`, ...): `diffusion_pytorch_model*.safetensors`
  (+ `config.json`), `models_t5_umt5-xxl-enc-bf16.pth`, `google/umt5-xxl/`, `Wan2.1_VAE.pth`,
  and for I2V `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`;
- ComfyUI (`ComfyUI/models`): `diffusion_models/*.safetensors`, `text_encoders/umt5_xxl_*`,
  `vae/wan_2.1_vae.safetensors`, `clip_vision/clip_vision_h.safetensors`;
- diffusers (`*-Diffusers`): `transformer/`, `text_encoder/`, `tokenizer/`, `vae/`, `image_encoder/`.
Any file can also be given explicitly, which wins over the search. A missing component is an
error that names it and every place that was searched.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from .io import CheckpointError, read_keys

__all__ = ["ModelFiles", "find_model_files", "MissingComponentError"]

WAN_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_VAE = "Wan2.1_VAE.pth"
WAN_CLIP = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
WAN_TOKENIZER = os.path.join("google", "umt5-xxl")


class MissingComponentError(CheckpointError, FileNotFoundError):
    """A component file of the model could not be found."""


@dataclass(frozen=True)
class ModelFiles:
    dit: str | tuple[str, ...]
    t5: str | None
    tokenizer: str | None  # None: embedded in the T5 file (ComfyUI) or beside it (Wan-AI)
    vae: str | None
    clip: str | None
    layout: str  # "wan" | "comfyui" | "diffusers" | "files"


def _first(*candidates: str) -> str | None:
    return next((c for c in candidates if c and os.path.exists(c)), None)


def _is_fp8(path: str) -> bool:
    try:
        return any(dtype.startswith("F8") for _, dtype in read_keys(path).values())
    except CheckpointError:
        return False


def _dit_task(path: str) -> str | None:
    try:
        keys = read_keys(path)
    except CheckpointError:
        return None
    if not any(k.endswith("self_attn.q.weight") or ".attn1.to_q." in k for k in keys):
        return None  # not a Wan DiT (another model in the same folder)
    return "i2v" if any(k.endswith("cross_attn.k_img.weight") or ".add_k_proj." in k for k in keys) else "t2v"


def _pick_comfy_dit(folder: str, task: str) -> str | None:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    fits = [f for f in files if _dit_task(f) == task]
    if len(fits) > 1:
        full = [f for f in fits if not _is_fp8(f)]
        fits = full or fits
    if len(fits) > 1:
        names = ", ".join(os.path.basename(f) for f in fits)
        raise MissingComponentError(f"{folder} holds several {task.upper()} DiT files ({names}); choose one with dit_path=")
    return fits[0] if fits else None


def _pick_comfy_t5(folder: str) -> str | None:
    files = sorted(glob.glob(os.path.join(folder, "umt5*.safetensors")))
    full = [f for f in files if not _is_fp8(f)]
    return (full or files or [None])[0]


def find_model_files(
    model_path: str | None,
    task: str = "t2v",
    dit: str | None = None,
    t5: str | None = None,
    tokenizer: str | None = None,
    vae: str | None = None,
    clip: str | None = None,
) -> ModelFiles:
    """Locate every component for `task` ('t2v' | 'i2v'); explicit paths win and must exist."""
    for name, p in (("dit_path", dit), ("t5_path", t5), ("tokenizer_path", tokenizer), ("vae_path", vae), ("clip_path", clip)):
        if p is not None and not os.path.exists(p):
            raise MissingComponentError(f"{name} does not exist: {p}")
    root = os.path.abspath(model_path) if model_path else None
    if root is not None and not os.path.isdir(root):
        raise MissingComponentError(f"model_path is not a folder: {model_path}")

    layout, looked = "files", {}
    if root is not None:
        j = lambda *p: os.path.join(root, *p)  # noqa: E731
        if os.path.isfile(j("model_index.json")) or os.path.isdir(j("transformer")):
            layout = "diffusers"
            looked = {
                "dit": [j("transformer")],
                "t5": [j("text_encoder", "model.safetensors.index.json"), j("text_encoder", "model.safetensors")],
                "tokenizer": [j("tokenizer")],
                "vae": [j("vae", "diffusion_pytorch_model.safetensors")],
                "clip": [j("image_encoder", "model.safetensors")],
            }
        elif os.path.isdir(j("diffusion_models")) or os.path.isdir(j("text_encoders")):
            layout = "comfyui"
            comfy_dit = _pick_comfy_dit(j("diffusion_models"), task) if dit is None else None
            looked = {
                "dit": [comfy_dit or j("diffusion_models", f"<a Wan2.1 {task.upper()} DiT>.safetensors")],
                "t5": [_pick_comfy_t5(j("text_encoders")) or j("text_encoders", "umt5_xxl_*.safetensors")],
                "tokenizer": [],
                "vae": [j("vae", "wan_2.1_vae.safetensors")] + sorted(glob.glob(j("vae", "wan*2.1*vae*.safetensors"))),
                "clip": [j("clip_vision", "clip_vision_h.safetensors")] + sorted(glob.glob(j("clip_vision", "*clip_vision_h*"))),
            }
        else:
            layout = "wan"
            has_dit = glob.glob(j("diffusion_pytorch_model*.safetensors*"))
            looked = {
                "dit": [root if has_dit else j("diffusion_pytorch_model*.safetensors")],
                "t5": [j(WAN_T5)],
                "tokenizer": [j(WAN_TOKENIZER)],
                "vae": [j(WAN_VAE)],
                "clip": [j(WAN_CLIP)],
            }

    def find(part: str, given: str | None, required: bool, label: str) -> str | None:
        if given is not None:
            return given
        found = _first(*looked.get(part, []))
        if found is None and required:
            where = ", ".join(looked.get(part, [])) or "nowhere (no model_path given)"
            raise MissingComponentError(f"{label} not found; looked for {where}; pass {part}_path=... to give the file")
        return found

    return ModelFiles(
        dit=find("dit", dit, True, "the DiT (diffusion model)"),
        t5=find("t5", t5, True, "the T5 text encoder"),
        tokenizer=find("tokenizer", tokenizer, False, "the T5 tokenizer"),
        vae=find("vae", vae, True, "the VAE"),
        clip=find("clip", clip, task == "i2v", "the CLIP image encoder (needed for i2v)"),
        layout=layout,
    )


def model_config_json(model_path: str | None) -> str | None:
    """The DiT architecture file of a model folder (Wan-AI: `config.json`; diffusers: `transformer/config.json`).

    LightX2V takes the architecture from `model_path` also when the weights come from a separate file
    (`dit_original_ckpt`, `dit_quantized_ckpt`): a file's shapes cannot tell the head count.
    """
    if not model_path or not os.path.isdir(model_path):
        return None
    for cand in (os.path.join(model_path, "config.json"), os.path.join(model_path, "transformer", "config.json")):
        if os.path.isfile(cand):
            return cand
    return None
