"""The parts of the tiny random models (`tiny.py` writes Wan2.1 ones, `tiny22.py` Wan2.2 ones) and
how the parts both families share (umT5 + tokenizer, the Wan2.1 VAE, diffusers configs) are
written in each layout.

Weights are rounded once to numbers that bf16 and fp16 both represent exactly, so a file stored in
bf16 or fp16 (as its name says) equals its fp32 twin; they are scaled (fan-in, norms near 1) so that
the output is a real, non-constant video rather than NaN or a flat colour. Each network draws from
its own seeded generator, so adding a part never changes the values of another.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..models.config import WanConfig
from ..models.vae import WanVAE, WanVAEConfig
from ..models.vae22 import Wan22VAE, Wan22VAEConfig

__all__ = [
    "TINY_DIT",
    "TINY_T5",
    "TINY_CLIP",
    "TINY_VAE_DIM",
    "TINY_VAE22",
    "tiny_dit_config",
    "tiny_dit_state_dict",
    "tiny_dit22_config",
    "tiny_dit22_state_dict",
    "tiny_t5",
    "tiny_clip_tower",
    "tiny_vae_state_dict",
    "tiny_vae22_state_dict",
]

TINY_DIT = dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=32, text_dim=32, image_dim=80)
TINY_T5 = dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2)
TINY_CLIP = dict(
    hidden_size=80, num_attention_heads=1, intermediate_size=160, num_hidden_layers=3, image_size=224, patch_size=14
)
TINY_VAE_DIM = 8
TINY_VAE22 = Wan22VAEConfig(dim=8, dec_dim=16)  # the Wan2.2 VAE at toy width (z 48, 2x2 patch), as tests/test_vae22
MARK = {"wan_core_tiny": "random weights, for tests and demos only"}
# Offsets of the Wan2.2 DiTs' generator seeds, far from any Wan2.1 tiny seed: the two experts and the
# 5B never share weights with each other or with a Wan2.1 tiny model, so a swapped expert shows.
_DIT22_STREAM = {"high": 1_000_003, "low": 2_000_003, "dense": 3_000_003}


def exact_half(t: torch.Tensor) -> torch.Tensor:
    """Round to bf16 and flush values below fp16's normal range: the result is exact in bf16, fp16 and fp32."""
    t = t.detach().float().bfloat16().float()
    return t.masked_fill(t.abs() < 2.0**-14, 0.0).contiguous()


def randomize(named: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
    """Fan-in scaled weights, norms near 1, small biases; shapes from `named`."""
    out = {}
    for k, v in named.items():
        shape = tuple(v.shape)
        r = torch.randn(shape, generator=g)
        if k.endswith("gamma") or (k.endswith("weight") and len(shape) == 1):  # norm scales
            t = 1 + 0.15 * r
        elif k.endswith("bias") or len(shape) <= 1:
            t = 0.05 * r
        elif k.endswith("modulation"):
            t = 0.1 * r
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            t = r / fan_in**0.5
        out[k] = exact_half(t)
    return out


# ----------------------------------------------------------------------------- the networks


def tiny_dit_config(task: str) -> WanConfig:
    """A Wan2.1 DiT: T2V, or I2V with the CLIP branch."""
    return WanConfig(model_type=task, in_dim=36 if task == "i2v" else 16, **TINY_DIT)


def tiny_dit22_config(task: str) -> WanConfig:
    """A Wan2.2 DiT: an A14B expert (T2V; I2V with in_dim 36 and no CLIP branch) or the TI2V-5B model
    (48 latent channels in and out). No image width: no Wan2.2 model has a CLIP branch."""
    dims = {k: v for k, v in TINY_DIT.items() if k != "image_dim"}
    if task == "t2v":
        return WanConfig(model_type="t2v", in_dim=16, **dims)
    if task == "i2v":
        return WanConfig(model_type="i2v", clip_branch=False, in_dim=36, **dims)
    if task == "ti2v":
        return WanConfig(model_type="ti2v", in_dim=48, out_dim=48, **dims)
    raise ValueError(f"a Wan2.2 task is 't2v', 'i2v' or 'ti2v', got {task!r}")


def _meta_state_dict(cfg: WanConfig) -> dict[str, torch.Tensor]:
    from ..models.dit import WanModel

    with torch.device("meta"):
        return WanModel(cfg).state_dict()


def tiny_dit_state_dict(task: str, seed: int) -> dict[str, torch.Tensor]:
    return randomize(_meta_state_dict(tiny_dit_config(task)), torch.Generator().manual_seed(seed * 4 + 1))


def tiny_dit22_state_dict(task: str, seed: int, expert: str) -> dict[str, torch.Tensor]:
    """expert: 'high' / 'low' (the A14B experts: same shapes, different weights) or 'dense' (TI2V-5B)."""
    if (expert == "dense") != (task == "ti2v"):
        raise ValueError(
            f"a Wan2.2 {task} model has {'one dense DiT' if task == 'ti2v' else 'high/low experts'}, not {expert!r}"
        )
    g = torch.Generator().manual_seed(_DIT22_STREAM[expert] + seed)
    return randomize(_meta_state_dict(tiny_dit22_config(task)), g)


def tiny_t5(vocab_size: int, seed: int):
    """A transformers UMT5EncoderModel (fp32) with exactly-half-representable random weights."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=vocab_size, feed_forward_proj="gated-gelu", dropout_rate=0.0, **TINY_T5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 4 + 2)
        model = UMT5EncoderModel(cfg).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(exact_half(p))
    return model


def tiny_clip_tower(seed: int) -> dict[str, torch.Tensor]:
    """Canonical (transformers, no `vision_model.` prefix) names of a tiny ViT, random."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_act="gelu", layer_norm_eps=1e-5, **TINY_CLIP)
    with torch.device("meta"):
        model = CLIPVisionModel(cfg)
    tower = getattr(model, "vision_model", model)
    shapes = {k: v for k, v in tower.state_dict().items() if not k.endswith("position_ids")}
    sd = randomize(shapes, torch.Generator().manual_seed(seed * 4 + 3))
    sd["embeddings.class_embedding"] = exact_half(
        0.5 * torch.randn(TINY_CLIP["hidden_size"], generator=torch.Generator().manual_seed(seed))
    )
    return sd


def tiny_vae_state_dict(seed: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = WanVAE(WanVAEConfig(dim=TINY_VAE_DIM))
    return randomize(model.state_dict(), torch.Generator().manual_seed(seed * 4 + 4))


def tiny_vae22_state_dict(seed: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = Wan22VAE(TINY_VAE22)
    return randomize(model.state_dict(), torch.Generator().manual_seed(4_000_003 + seed))


# ----------------------------------------------------------------------------- files


def save(tensors: dict[str, torch.Tensor], path: str, dtype: torch.dtype | None = None) -> None:
    """One file: `.pth` as a torch pickle, else safetensors with the tiny-model mark."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in tensors.items()
    }
    if path.endswith(".pth"):
        torch.save(tensors, path)
    else:
        save_file(tensors, path, metadata=MARK)


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def write_t5(
    out: str, layout: str, t5, tok_dir: str, comfy_name: str = "text_encoders/umt5_xxl_fp16.safetensors"
) -> None:
    """The umT5 encoder and its tokenizer as the layout keeps them: Wan-AI's bf16 `.pth` beside
    `google/umt5-xxl/`, ComfyUI's fp16 file with the tokenizer inside (`spiece_model`), or
    diffusers' `text_encoder/` + `tokenizer/`."""
    if layout == "wan":
        from .t5 import transformers_to_wan

        save(transformers_to_wan(t5.state_dict()), os.path.join(out, "models_t5_umt5-xxl-enc-bf16.pth"), torch.bfloat16)
        shutil.copytree(tok_dir, os.path.join(out, "google", "umt5-xxl"), dirs_exist_ok=True)
    elif layout == "comfyui":
        with open(os.path.join(tok_dir, "spiece.model"), "rb") as f:
            spiece = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        t5_sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
        save({**{k: v.half() for k, v in t5_sd.items()}, "spiece_model": spiece}, os.path.join(out, comfy_name))
    else:
        t5.save_pretrained(os.path.join(out, "text_encoder"))
        shutil.copytree(tok_dir, os.path.join(out, "tokenizer"), dirs_exist_ok=True)


def _diffusers_names(official_keys, ref_keys, to_official) -> dict[str, str]:
    """official name -> diffusers name, by mapping diffusers' own names through our renamer."""
    mapped = to_official({k: k for k in ref_keys})
    if set(mapped) != set(official_keys):
        raise RuntimeError(
            f"the tiny VAE does not map onto diffusers' AutoencoderKLWan: {sorted(set(mapped) ^ set(official_keys))[:4]}"
        )
    return mapped


def write_diffusers_vae(out: str, vae_sd: dict[str, torch.Tensor], wan22: bool) -> None:
    """`vae/` of a diffusers folder: AutoencoderKLWan with the Wan2.1 or the Wan2.2 config."""
    from diffusers import AutoencoderKLWan

    if wan22:
        from .vae22 import diffusers22_to_official as to_official

        c = TINY_VAE22
        extra = dict(decoder_base_dim=c.dec_dim, is_residual=True, patch_size=c.patch_size, in_channels=3 * c.patch_size**2,
                     out_channels=3 * c.patch_size**2, scale_factor_spatial=c.spatial_ratio, scale_factor_temporal=c.temporal_ratio)  # fmt: skip
    else:
        from .vae import diffusers_to_official as to_official

        c, extra = WanVAEConfig(dim=TINY_VAE_DIM), {}
    vcfg = {
        "base_dim": c.dim,
        "z_dim": c.z_dim,
        "dim_mult": list(c.dim_mult),
        "num_res_blocks": c.num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": list(c.temperal_downsample),
        "dropout": 0.0,
        "latents_mean": list(c.latents_mean),
        "latents_std": list(c.latents_std),
        **extra,
    }
    with torch.device("meta"):
        ref = AutoencoderKLWan(**vcfg)
    names = _diffusers_names(vae_sd, ref.state_dict(), to_official)
    save({names[k]: v for k, v in vae_sd.items()}, os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"))
    write_json(os.path.join(out, "vae", "config.json"), {"_class_name": "AutoencoderKLWan", **vcfg})


def diffusers_transformer_config(cfg: WanConfig) -> dict:
    """`transformer/config.json` of a diffusers folder (WanTransformer3DModel)."""
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_dim,
        "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "image_dim": cfg.image_dim if cfg.clip_branch else None,
        "added_kv_proj_dim": cfg.dim if cfg.clip_branch else None,
        "rope_max_seq_len": 1024,
    }


def write_diffusers_scheduler(out: str, shift: float) -> None:
    write_json(
        os.path.join(out, "scheduler", "scheduler_config.json"),
        {
            "_class_name": "UniPCMultistepScheduler",
            "num_train_timesteps": 1000,
            "prediction_type": "flow_prediction",
            "use_flow_sigmas": True,
            "flow_shift": shift,
            "solver_order": 2,
            "solver_type": "bh2",
            "predict_x0": True,
            "lower_order_final": True,
            "final_sigmas_type": "zero",
            "timestep_spacing": "linspace",
        },
    )


def readable_by_all(root: str) -> None:
    """Files 0644, folders 0755: temporary folders and copies are created owner-only (0600 / 0700), and a
    model folder is read by other users (a ComfyUI service account, a container)."""
    os.chmod(root, 0o755)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), 0o755)
        for f in files:
            os.chmod(os.path.join(folder, f), 0o644)
