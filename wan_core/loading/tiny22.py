"""Tiny random-weight Wan2.2 models in the real file layouts (called by `tiny.write_tiny_model` with
`family="wan2.2"`; the text encoder is the Wan2.1 one, as in the real releases).

- `wan` (Wan-AI/Wan2.2-T2V-A14B, -I2V-A14B): `high_noise_model/` and `low_noise_model/`, each
  `config.json` + sharded `diffusion_pytorch_model-*.safetensors` + index; at the root
  `models_t5_umt5-xxl-enc-bf16.pth`, `google/umt5-xxl/`, `Wan2.1_VAE.pth`. TI2V-5B: the DiT at the
  root (sharded) and `Wan2.2_VAE.pth`. No CLIP file: no Wan2.2 model has a CLIP image encoder.
- `comfyui` (Comfy-Org/Wan_2.2_ComfyUI_Repackaged): `diffusion_models/wan2.2_{t2v,i2v}_{high,low}_noise_14B_fp16`
  or `wan2.2_ti2v_5B_fp16`, `vae/wan_2.1_vae` (A14B) or `vae/wan2.2_vae` (5B), `text_encoders/`.
- `diffusers` (Wan-AI/Wan2.2-*-Diffusers): `transformer/` = the high-noise expert, `transformer_2/` =
  the low-noise one, `model_index.json` with the pipeline's `boundary_ratio` (0.875 T2V, 0.9 I2V);
  TI2V-5B: `transformer/` only, `expand_timesteps: true`, the Wan2.2 VAE in diffusers' names.

The two experts have the same shapes and different random weights (their own seeds).
"""

from __future__ import annotations

import os

import torch

from .tiny_parts import (
    diffusers_transformer_config,
    save,
    tiny_dit22_config,
    tiny_dit22_state_dict,
    tiny_vae22_state_dict,
    tiny_vae_state_dict,
    write_diffusers_scheduler,
    write_diffusers_vae,
    write_json,
    write_t5,
)

__all__ = ["COMFY22_NAMES", "WAN22_EXPERT_FOLDERS", "DIFFUSERS_EXPERT_FOLDERS", "BOUNDARY_RATIO", "write_tiny22"]

COMFY22_NAMES = {
    ("t2v", "high"): "diffusion_models/wan2.2_t2v_high_noise_14B_fp16.safetensors",
    ("t2v", "low"): "diffusion_models/wan2.2_t2v_low_noise_14B_fp16.safetensors",
    ("i2v", "high"): "diffusion_models/wan2.2_i2v_high_noise_14B_fp16.safetensors",
    ("i2v", "low"): "diffusion_models/wan2.2_i2v_low_noise_14B_fp16.safetensors",
    ("ti2v", "dense"): "diffusion_models/wan2.2_ti2v_5B_fp16.safetensors",
    "vae21": "vae/wan_2.1_vae.safetensors",
    "vae22": "vae/wan2.2_vae.safetensors",
}
WAN22_EXPERT_FOLDERS = {"high": "high_noise_model", "low": "low_noise_model"}
DIFFUSERS_EXPERT_FOLDERS = {"high": "transformer", "low": "transformer_2"}
BOUNDARY_RATIO = {"t2v": 0.875, "i2v": 0.9}  # the official configs' `boundary` (WAN22.md)
_SHIFT = {"t2v": 12.0, "i2v": 5.0, "ti2v": 5.0}  # the official sample_shift


def _dits(task: str, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    experts = ("dense",) if task == "ti2v" else ("high", "low")
    return {e: tiny_dit22_state_dict(task, seed, e) for e in experts}


def _write_wan(out: str, task: str, seed: int, t5, tok_dir: str) -> None:
    from .dit import save_dit

    cfg = tiny_dit22_config(task)
    for expert, sd in _dits(task, seed).items():
        folder = out if expert == "dense" else os.path.join(out, WAN22_EXPERT_FOLDERS[expert])
        save_dit(sd, folder, layout="wan", cfg=cfg, shards=2)
    write_t5(out, "wan", t5, tok_dir)
    if task == "ti2v":
        save(tiny_vae22_state_dict(seed), os.path.join(out, "Wan2.2_VAE.pth"))
    else:
        save(tiny_vae_state_dict(seed), os.path.join(out, "Wan2.1_VAE.pth"))


def _write_comfyui(out: str, task: str, seed: int, t5, tok_dir: str) -> None:
    from .dit import save_dit

    cfg = tiny_dit22_config(task)
    os.makedirs(os.path.join(out, "diffusion_models"), exist_ok=True)
    for expert, sd in _dits(task, seed).items():  # fp16, as the file names say
        save_dit(
            {k: v.half() for k, v in sd.items()},
            os.path.join(out, COMFY22_NAMES[(task, expert)]),
            layout="comfyui",
            cfg=cfg,
        )
    write_t5(out, "comfyui", t5, tok_dir)
    if task == "ti2v":
        save(tiny_vae22_state_dict(seed), os.path.join(out, COMFY22_NAMES["vae22"]), torch.bfloat16)
    else:
        save(tiny_vae_state_dict(seed), os.path.join(out, COMFY22_NAMES["vae21"]), torch.bfloat16)


def _write_diffusers(out: str, task: str, seed: int, t5, tok_dir: str) -> None:
    from .dit import official_to_diffusers

    cfg = tiny_dit22_config(task)
    index = {
        "_class_name": "WanImageToVideoPipeline" if task == "i2v" else "WanPipeline",
        "_diffusers_version": "0.35.0",
        "boundary_ratio": BOUNDARY_RATIO.get(task),
        "expand_timesteps": task == "ti2v",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if task == "i2v":  # the I2V-A14B pipeline has no CLIP image encoder
        index |= {"image_encoder": [None, None], "image_processor": [None, None]}
    for expert, sd in _dits(task, seed).items():
        sub = "transformer" if expert == "dense" else DIFFUSERS_EXPERT_FOLDERS[expert]
        save(official_to_diffusers(sd), os.path.join(out, sub, "diffusion_pytorch_model.safetensors"))
        write_json(os.path.join(out, sub, "config.json"), diffusers_transformer_config(cfg))
        index[sub] = ["diffusers", "WanTransformer3DModel"]
    write_t5(out, "diffusers", t5, tok_dir)
    write_diffusers_vae(
        out, tiny_vae22_state_dict(seed) if task == "ti2v" else tiny_vae_state_dict(seed), wan22=task == "ti2v"
    )
    write_diffusers_scheduler(out, _SHIFT[task])
    write_json(os.path.join(out, "model_index.json"), index)


_WRITERS = {"wan": _write_wan, "comfyui": _write_comfyui, "diffusers": _write_diffusers}


def write_tiny22(out: str, task: str, layout: str, seed: int, t5, tok_dir: str) -> None:
    """Write the Wan2.2 `task` model ('t2v' | 'i2v': A14B experts, 'ti2v': 5B) in `layout` under `out`,
    with the given tiny umT5 and tokenizer folder (`tiny.write_tiny_model` makes them)."""
    _WRITERS[layout](out, task, seed, t5, tok_dir)
