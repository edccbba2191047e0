"""Tiny random-weight Wan2.1 models written in the real file layouts, for demos and tests.

A tiny model has the architecture of the real one at toy width (a 2-block DiT 64 wide, a 2-layer
umT5 32 wide with a trained 384-piece tokenizer, the Wan VAE at base width 8, a 3-block CLIP
tower 80 wide at the real 224 px / 257 tokens) and runs a whole generation on the CPU in
seconds. Every file is written the way the real one is, so the same loaders, discovery and
CLI paths run on it:

- `wan`:       a Wan-AI folder (`config.json` + `diffusion_pytorch_model.safetensors`,
               `models_t5_umt5-xxl-enc-bf16.pth` + `google/umt5-xxl/`, `Wan2.1_VAE.pth`,
               `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`);
- `comfyui`:   `diffusion_models/`, `text_encoders/` (tokenizer inside as `spiece_model`), `vae/`,
               `clip_vision/` with the file names of ComfyUI's repackaged Wan2.1 files;
- `diffusers`: a `*-Diffusers` pipeline folder that `WanPipeline.from_pretrained` /
               `WanImageToVideoPipeline.from_pretrained` load (needs diffusers to write).

All layouts of one (task, seed) hold the same values: weights are rounded once to numbers that
bf16 and fp16 both represent exactly, so a file stored in bf16 or fp16 (as its name says) equals
its fp32 twin. Random weights are scaled (fan-in, norms near 1) so that the output is a real,
non-constant video rather than NaN or a flat colour.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from ..models.config import WanConfig
from ..models.vae import WanVAE, WanVAEConfig

__all__ = ["LAYOUTS", "TINY_DIT", "TINY_T5", "TINY_CLIP", "TINY_VAE_DIM", "write_tiny_model", "tiny_model_dir", "COMFY_NAMES"]

LAYOUTS = ("wan", "comfyui", "diffusers")
TINY_DIT = dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=32, text_dim=32, image_dim=80)
TINY_T5 = dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2)
TINY_CLIP = dict(hidden_size=80, num_attention_heads=1, intermediate_size=160, num_hidden_layers=3, image_size=224, patch_size=14)
TINY_VAE_DIM = 8
COMFY_NAMES = {
    "t2v": "diffusion_models/wan2.1_t2v_14B_bf16.safetensors",
    "i2v": "diffusion_models/wan2.1_i2v_480p_14B_bf16.safetensors",
    "t5": "text_encoders/umt5_xxl_fp16.safetensors",
    "vae": "vae/wan_2.1_vae.safetensors",
    "clip": "clip_vision/clip_vision_h.safetensors",
}
_MARK = {"wan_core_tiny": "random weights, for tests and demos only"}


def _exact_half(t: torch.Tensor) -> torch.Tensor:
    """Round to bf16 and flush values below fp16's normal range: the result is exact in bf16, fp16 and fp32."""
    t = t.detach().float().bfloat16().float()
    return t.masked_fill(t.abs() < 2.0**-14, 0.0).contiguous()


def _randomize(named: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
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
        out[k] = _exact_half(t)
    return out


# ----------------------------------------------------------------------------- the four networks


def tiny_dit_config(task: str) -> WanConfig:
    return WanConfig(model_type=task, in_dim=36 if task == "i2v" else 16, **TINY_DIT)


def tiny_dit_state_dict(task: str, seed: int) -> dict[str, torch.Tensor]:
    from ..models.dit import WanModel

    with torch.device("meta"):
        model = WanModel(tiny_dit_config(task))
    return _randomize(model.state_dict(), torch.Generator().manual_seed(seed * 4 + 1))


def tiny_t5(vocab_size: int, seed: int):
    """A transformers UMT5EncoderModel (fp32) with exactly-half-representable random weights."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=vocab_size, feed_forward_proj="gated-gelu", dropout_rate=0.0, **TINY_T5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 4 + 2)
        model = UMT5EncoderModel(cfg).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(_exact_half(p))
    return model


def tiny_clip_tower(seed: int) -> dict[str, torch.Tensor]:
    """Canonical (transformers, no `vision_model.` prefix) names of a tiny ViT, random."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_act="gelu", layer_norm_eps=1e-5, **TINY_CLIP)
    with torch.device("meta"):
        model = CLIPVisionModel(cfg)
    tower = getattr(model, "vision_model", model)
    shapes = {k: v for k, v in tower.state_dict().items() if not k.endswith("position_ids")}
    sd = _randomize(shapes, torch.Generator().manual_seed(seed * 4 + 3))
    sd["embeddings.class_embedding"] = _exact_half(0.5 * torch.randn(TINY_CLIP["hidden_size"], generator=torch.Generator().manual_seed(seed)))
    return sd


def tiny_vae_state_dict(seed: int) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = WanVAE(WanVAEConfig(dim=TINY_VAE_DIM))
    return _randomize(model.state_dict(), torch.Generator().manual_seed(seed * 4 + 4))


# ----------------------------------------------------------------------------- layout writers


def _save(tensors: dict[str, torch.Tensor], path: str, dtype: torch.dtype | None = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    if path.endswith(".pth"):
        torch.save(tensors, path)
    else:
        save_file(tensors, path, metadata=_MARK)


def _clip_to_wan(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Canonical tower names -> the `visual.*` names of Wan's open-clip file (q/k/v fused into to_qkv)."""
    dim = sd["embeddings.class_embedding"].shape[0]
    renames = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2"}
    out = {
        "visual.cls_embedding": sd["embeddings.class_embedding"].view(1, 1, dim),
        "visual.pos_embedding": sd["embeddings.position_embedding.weight"][None],  # [1, tokens, dim]
        "visual.patch_embedding.weight": sd["embeddings.patch_embedding.weight"],
        "visual.head": _exact_half(torch.randn(dim, 16, generator=torch.Generator().manual_seed(seed)) / dim**0.5),
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
    from .t5 import transformers_to_wan

    save_dit(dit_sd, out, layout="wan", cfg=cfg)
    _save(transformers_to_wan(t5.state_dict()), os.path.join(out, "models_t5_umt5-xxl-enc-bf16.pth"), torch.bfloat16)
    shutil.copytree(tok_dir, os.path.join(out, "google", "umt5-xxl"), dirs_exist_ok=True)
    _save(vae_sd, os.path.join(out, "Wan2.1_VAE.pth"))
    if task == "i2v":
        _save(_clip_to_wan(clip_sd, seed), os.path.join(out, "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"))


def _write_comfyui(out, task, dit_sd, cfg, t5, tok_dir, vae_sd, clip_sd, seed):
    from .dit import save_dit

    os.makedirs(os.path.join(out, "diffusion_models"), exist_ok=True)
    save_dit({k: v.bfloat16() if v.is_floating_point() else v for k, v in dit_sd.items()}, os.path.join(out, COMFY_NAMES[task]), layout="comfyui", cfg=cfg)
    with open(os.path.join(tok_dir, "spiece.model"), "rb") as f:
        spiece = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    t5_sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    _save({**{k: v.half() for k, v in t5_sd.items()}, "spiece_model": spiece}, os.path.join(out, COMFY_NAMES["t5"]))
    _save(vae_sd, os.path.join(out, COMFY_NAMES["vae"]), torch.bfloat16)
    if task == "i2v":
        proj = _exact_half(torch.randn(16, clip_sd["embeddings.class_embedding"].shape[0], generator=torch.Generator().manual_seed(seed)) / 9)
        tensors = {"vision_model." + k: v for k, v in clip_sd.items()} | {"visual_projection.weight": proj}
        _save(tensors, os.path.join(out, COMFY_NAMES["clip"]), torch.float16)


def _diffusers_vae_names() -> dict[str, str]:
    """official VAE name -> diffusers AutoencoderKLWan name, for the tiny config."""
    from diffusers import AutoencoderKLWan

    from .vae import diffusers_to_official

    with torch.device("meta"):
        ref = AutoencoderKLWan(base_dim=TINY_VAE_DIM)
    keys = list(ref.state_dict())
    return {official: diff for official, diff in diffusers_to_official({k: k for k in keys}).items()}


def _write_diffusers(out, task, dit_sd, cfg, t5, tok_dir, vae_sd, clip_sd, seed):
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        raise ImportError("writing the diffusers layout needs the diffusers package (pip install diffusers)") from e
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from .dit import save_dit

    save_dit(dit_sd, out, layout="diffusers", cfg=cfg)
    tcfg = {
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
        "image_dim": cfg.image_dim if cfg.is_i2v else None,
        "added_kv_proj_dim": cfg.dim if cfg.is_i2v else None,
        "rope_max_seq_len": 1024,
    }
    _json(os.path.join(out, "transformer", "config.json"), tcfg)
    t5.save_pretrained(os.path.join(out, "text_encoder"))
    shutil.copytree(tok_dir, os.path.join(out, "tokenizer"), dirs_exist_ok=True)
    names = _diffusers_vae_names()
    _save({names[k]: v for k, v in vae_sd.items()}, os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"))
    vcfg = WanVAEConfig(dim=TINY_VAE_DIM)
    _json(
        os.path.join(out, "vae", "config.json"),
        {
            "_class_name": "AutoencoderKLWan",
            "base_dim": vcfg.dim,
            "z_dim": vcfg.z_dim,
            "dim_mult": list(vcfg.dim_mult),
            "num_res_blocks": vcfg.num_res_blocks,
            "attn_scales": [],
            "temperal_downsample": list(vcfg.temperal_downsample),
            "dropout": 0.0,
            "latents_mean": list(vcfg.latents_mean),
            "latents_std": list(vcfg.latents_std),
        },
    )
    _json(
        os.path.join(out, "scheduler", "scheduler_config.json"),
        {
            "_class_name": "UniPCMultistepScheduler",
            "num_train_timesteps": 1000,
            "prediction_type": "flow_prediction",
            "use_flow_sigmas": True,
            "flow_shift": 3.0 if task == "i2v" else 5.0,
            "solver_order": 2,
            "solver_type": "bh2",
            "predict_x0": True,
            "lower_order_final": True,
            "final_sigmas_type": "zero",
            "timestep_spacing": "linspace",
        },
    )
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
    _json(os.path.join(out, "model_index.json"), index)


def _json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


_WRITERS = {"wan": _write_wan, "comfyui": _write_comfyui, "diffusers": _write_diffusers}


def write_tiny_model(out: str | os.PathLike, task: str = "t2v", layout: str = "wan", seed: int = 0) -> str:
    """Write a complete tiny random model for `task` in `layout` under `out`; returns `out` (the model_path)."""
    from ..models.tokenizer import load_tokenizer, write_tiny_tokenizer

    if task not in ("t2v", "i2v"):
        raise ValueError(f"task must be 't2v' or 'i2v', got {task!r}")
    if layout not in _WRITERS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is an existing file: give a folder (new or existing) for the model")
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = write_tiny_tokenizer(os.path.join(tmp, "umt5-xxl"), seed=seed)
        t5 = tiny_t5(len(load_tokenizer(tok_dir)), seed)
        cfg = tiny_dit_config(task)
        dit_sd = tiny_dit_state_dict(task, seed)
        clip_sd = tiny_clip_tower(seed) if task == "i2v" else None
        _WRITERS[layout](out, task, dit_sd, cfg, t5, tok_dir, tiny_vae_state_dict(seed), clip_sd, seed)
    with open(os.path.join(out, "TINY_RANDOM_MODEL.txt"), "w") as f:
        f.write(f"wan_core tiny random-weight {task} model, {layout} layout, seed {seed}: for tests and demos only.\n")
    _readable_by_all(out)
    return out


def _readable_by_all(root: str) -> None:
    """Files 0644, folders 0755: temporary folders and copies are created owner-only (0600 / 0700), and a
    model folder is read by other users (a ComfyUI service account, a container)."""
    os.chmod(root, 0o755)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), 0o755)
        for f in files:
            os.chmod(os.path.join(folder, f), 0o644)


def tiny_model_dir(task: str = "t2v", layout: str = "wan", root: str | None = None) -> str:
    """A tiny model in a per-user cache folder (written on first use, atomically)."""
    root = root or os.environ.get("WAN_CORE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "wan_core")
    path = os.path.join(root, f"tiny-{task}-{layout}-v1")
    if os.path.isfile(os.path.join(path, "TINY_RANDOM_MODEL.txt")):
        return path
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tiny-{task}-", dir=root)
    try:
        write_tiny_model(tmp, task, layout)
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race
            if not os.path.isfile(os.path.join(path, "TINY_RANDOM_MODEL.txt")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
