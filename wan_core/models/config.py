"""DiT architecture configuration.

`WanConfig` describes a DiT architecture (frozen, the same for every run of a model); presets
cover the official Wan2.1 models and the Wan2.2 A14B experts and TI2V-5B, and `from_state_dict` reads the dimensions off tensor shapes so
that a checkpoint with a partial or missing `config.json` (some distill repositories ship one
without `in_dim`) still builds the right model. The run-time choices a model is built with
(dtype, attention backend, FP8, LoRA, offload) are the `ModelSpec` of `wan_core.spec`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["WanConfig", "PRESETS", "MODEL_TYPES", "config_from_json"]

MODEL_TYPES = ("t2v", "i2v", "ti2v")


@dataclass(frozen=True)
class WanConfig:
    # "t2v" | "i2v" (in_dim 36: noise + mask + image latent `y`) | "ti2v" (Wan2.2 5B: 48-channel latent, no `y`)
    model_type: str = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 2048
    ffn_dim: int = 8192
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 16
    num_layers: int = 32
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    image_dim: int = 1280  # CLIP feature width consumed by img_emb (i2v only)
    # The CLIP image cross-attention branch (img_emb, k_img/v_img): Wan2.1 I2V has it, the Wan2.2
    # I2V-A14B experts do not (they take `y` only). None: derived, True exactly for model_type "i2v".
    clip_branch: bool | None = None

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.clip_branch is None:
            object.__setattr__(self, "clip_branch", self.model_type == "i2v")
        elif self.clip_branch and self.model_type != "i2v":
            raise ValueError(f"a CLIP image branch needs model_type 'i2v', got {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.num_heads} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def is_i2v(self) -> bool:
        """Takes the image condition `y` (mask + first-frame latent) concatenated to the noise."""
        return self.model_type == "i2v"

    def replace(self, **kw) -> WanConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def preset(cls, name: str) -> WanConfig:
        key = name.lower().replace("_", "-")
        aliases = {"i2v-14b-480p": "i2v-14b", "i2v-14b-720p": "i2v-14b", "wan2.1-t2v-14b": "t2v-14b",
                   "wan2.2-t2v-a14b": "t2v-a14b", "wan2.2-i2v-a14b": "i2v-a14b", "wan2.2-ti2v-5b": "ti2v-5b"}
        key = aliases.get(key, key)
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return PRESETS[key]

    @classmethod
    def from_state_dict(cls, shapes: dict[str, Any], **overrides) -> WanConfig:
        """Infer the architecture from a state dict (tensors) or a name -> shape mapping.

        Keys must already be in the official layout (see `wan_core.loading.dit`). The task comes
        from the input channels and the image keys: k_img -> Wan2.1 I2V; 36 input channels
        without k_img -> a Wan2.2 I2V-A14B expert (no CLIP branch); 48 in and out (the Wan2.2
        VAE's latent) -> TI2V-5B. A Wan2.2 T2V-A14B expert has the Wan2.1 T2V-14B layout exactly,
        so it reads as that config (the same architecture).
        """

        def shape(k):
            v = shapes[k]
            return list(v.shape) if isinstance(v, torch.Tensor) else list(v)

        required = ["patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight", "head.head.weight"]
        missing = [k for k in required if k not in shapes]
        if missing:
            raise KeyError(f"not a Wan2.1 DiT state dict: missing {missing}")
        dim, in_dim, *patch = shape("patch_embedding.weight")
        text_dim = shape("text_embedding.0.weight")[1]
        freq_dim = shape("time_embedding.0.weight")[1]
        num_layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
        ffn_dim = shape("blocks.0.ffn.0.weight")[0]
        out_dim = shape("head.head.weight")[0] // (patch[0] * patch[1] * patch[2])
        clip = "blocks.0.cross_attn.k_img.weight" in shapes
        if clip or in_dim == out_dim + 20:  # noise + 4 mask + 16 image-latent channels
            model_type = "i2v"
        elif in_dim == out_dim == 48:
            model_type = "ti2v"
        else:
            model_type = "t2v"
        kw: dict[str, Any] = dict(
            model_type=model_type,
            clip_branch=clip,
            patch_size=tuple(patch),
            in_dim=in_dim,
            dim=dim,
            ffn_dim=ffn_dim,
            freq_dim=freq_dim,
            text_dim=text_dim,
            out_dim=out_dim,
            num_layers=num_layers,
            qk_norm="blocks.0.self_attn.norm_q.weight" in shapes,
            cross_attn_norm="blocks.0.norm3.weight" in shapes,
        )
        if clip and "img_emb.proj.1.weight" in shapes:
            kw["image_dim"] = shape("img_emb.proj.1.weight")[1]
        # Heads cannot be read off shapes: take the official value for known widths, else 128-wide heads.
        kw["num_heads"] = {5120: 40, 3072: 24, 1536: 12}.get(dim, max(1, dim // 128))
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


PRESETS: dict[str, WanConfig] = {
    "t2v-14b": WanConfig(model_type="t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "i2v-14b": WanConfig(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "t2v-1.3b": WanConfig(model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    # Wan2.2 (tests/reference/WAN22.md). Each A14B expert (high- and low-noise) has this architecture;
    # the T2V expert is the Wan2.1 T2V-14B one, the I2V expert drops the CLIP branch but keeps in_dim 36.
    "t2v-a14b": WanConfig(model_type="t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "i2v-a14b": WanConfig(model_type="i2v", clip_branch=False, in_dim=36, dim=5120, ffn_dim=13824, num_heads=40,
                          num_layers=40),
    "ti2v-5b": WanConfig(model_type="ti2v", in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24, num_layers=30),
}

_JSON_FIELDS = {f.name for f in dataclasses.fields(WanConfig)}
# diffusers' WanTransformer3DModel config names -> ours
_DIFFUSERS_CONFIG_KEYS = {
    "num_attention_heads": "num_heads",
    "in_channels": "in_dim",
    "out_channels": "out_dim",
    "image_dim": "image_dim",
}


def config_from_json(cfg: dict[str, Any], shapes: dict[str, Any] | None = None, source: str = "config.json") -> WanConfig:
    """A Wan-AI `config.json` (possibly missing fields) merged over what the tensors say.

    Tensor shapes win for everything they determine (they are what gets loaded), with a warning
    naming each field where the json says otherwise; the json supplies what shapes cannot
    (`num_heads`, `eps`, `text_len`). A `num_heads` that does not divide the file's width is
    ignored, with a warning. Without shapes, missing fields take the dataclass defaults.
    """
    import warnings

    cfg = {_DIFFUSERS_CONFIG_KEYS.get(k, k): v for k, v in cfg.items()}
    if cfg.get("qk_norm") == "rms_norm_across_heads":  # diffusers names the norm Wan has (over the width)
        cfg["qk_norm"] = True
    elif "qk_norm" in cfg and cfg["qk_norm"] is None:  # diffusers: no q/k norm
        cfg["qk_norm"] = False
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in _JSON_FIELDS}
    if "model_type" in given and given["model_type"] not in MODEL_TYPES:
        given.pop("model_type")  # flf2v / vace are not supported; shapes decide the task
    if given.get("image_dim", 0) is None:
        given.pop("image_dim")  # diffusers' "no image branch" (T2V, Wan2.2 I2V): the shapes say that
    if shapes is None:
        return WanConfig(**given)
    inferred = WanConfig.from_state_dict(shapes)
    keep = {k: given[k] for k in ("num_heads", "eps", "text_len") if k in given}
    clash = [f"{k} {given[k]!r} (file: {getattr(inferred, k)!r})" for k in sorted(given)
             if k not in keep and given[k] != getattr(inferred, k)]  # fmt: skip
    heads = keep.get("num_heads")
    if heads is not None and (not isinstance(heads, int) or heads < 1 or inferred.dim % heads):
        clash.append(f"num_heads {heads!r} (does not divide the file's dim {inferred.dim}; using {inferred.num_heads})")
        keep.pop("num_heads")
    if clash:
        warnings.warn(f"{source} does not match the checkpoint's tensors: {'; '.join(clash)}; loading what the file holds", stacklevel=3)
    return inferred.replace(**keep)

