"""Reading Wan2.1 DiT LoRA files in every layout users bring, into one normalised structure.

A LoRA file is a flat dict of tensors. Whatever tool wrote it, each key is
`<prefix><target><suffix>`:
- prefix: none, `diffusion_model.`, `model.diffusion_model.`, `transformer.`, `base_model.model.`
  (PEFT), or a kohya one (`lora_unet_`, also `lora_unet__` from Wan-Fun, `lora_transformer_`,
  `lycoris_`) whose target is the dotted name with every `.` turned into `_` (some trainers do
  it only for the block part: `lora_unet_blocks_22.self_attn.k`);
- target: an official module name (`blocks.0.self_attn.q`), or its diffusers name
  (`blocks.0.attn1.to_q`, mapped with the DiT loader's own key map);
- suffix: the low-rank pair (`lora_down.weight`/`lora_up.weight`, `lora_A.weight`/`lora_B.weight`,
  `lora.down.weight`/`lora.up.weight`, `lora_A.default.weight`/..., `lora_A`/`lora_B`), `alpha`
  (scale = alpha / rank, 1 without it), `diff` (full weight delta), `diff_b` (bias delta),
  `diff_m` (on a block or the head: delta of its `modulation` tensor, the spelling LightX2V's
  extractor writes); ComfyUI-style `<name>.modulation.diff` means the same as `diff_m`.

`parse_lora` turns such a dict into a `LoraWeights`: one `LoraTarget` per official module name.
It checks the file against no model; `wan_core.layers.lora` does that when it applies the LoRA.
`save_lora` writes a normalised LoRA back in any of these layouts (tiny test files, the CLI's
and the nodes' tests), `random_lora` makes one for a config.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from ..models.config import WanConfig
from .dit import _DIFFUSERS_TO_OFFICIAL, _rename, official_to_diffusers
from .io import CheckpointError, read_state_dict

__all__ = [
    "LoraTarget",
    "LoraWeights",
    "LORA_LAYOUTS",
    "parse_lora",
    "load_lora",
    "save_lora",
    "random_lora",
    "kohya_to_dotted",
]

# Stripped from the front of a key (repeatedly: `base_model.model.transformer.` occurs).
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.", "model.")
# Kohya-style prefixes: the target that follows has `_` for `.`.
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")

# suffix -> role; checked longest first so `.lora_A.default.weight` wins over `.lora_A`.
_SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.default.weight": "down",
    ".lora_B.default.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_A": "down",
    ".lora_B": "up",
    ".alpha": "alpha",
    ".diff": "diff",
    ".diff_b": "diff_b",
    ".diff_m": "diff_m",
    # LoRA variants whose math differs from W + s * up @ down: refused, never half-applied.
    ".dora_scale": "unsupported",
    ".lora_mid.weight": "unsupported",
    ".hada_w1_a": "unsupported",
    ".lokr_w1": "unsupported",
}
_SUFFIX_ORDER = sorted(_SUFFIXES, key=len, reverse=True)

# Name parts that contain `_` (official and diffusers Wan names), so a kohya name can be re-dotted.
_COMPOUNDS = sorted(
    (
        tuple(w.split("_"))
        for w in (
            "self_attn cross_attn k_img v_img norm_q norm_k norm_k_img text_embedding time_embedding "
            "time_projection img_emb patch_embedding condition_embedder text_embedder time_embedder "
            "image_embedder linear_1 linear_2 time_proj to_q to_k to_v to_out add_k_proj add_v_proj "
            "norm_added_k proj_out scale_shift_table"
        ).split()
    ),
    key=len,
    reverse=True,
)

# Looks like a Wan2.1 DiT module name (used to tell "missing in this model" from "not a Wan name").
WAN_NAME = re.compile(
    r"^(blocks\.\d+(\..+)?|head(\..+)?|text_embedding\.\d+|time_embedding\.\d+|time_projection\.\d+"
    r"|img_emb\.proj\.\d+|patch_embedding)$"
)

_DIFFUSERS_HINTS = (".attn1.", ".attn2.", "condition_embedder.", "proj_out", ".ffn.net.", "scale_shift_table")


@dataclass
class LoraTarget:
    """Everything one LoRA file holds for one module (official name).

    name: e.g. 'blocks.0.self_attn.q'; for `diff_m` the module owning `modulation` ('blocks.0', 'head').
    down [r, in] and up [out, r] (conv: [r, in, *k] / [out, r, *k]); alpha (None: scale 1);
    diff: delta of `<name>.weight`; diff_b: of `<name>.bias`; diff_m: of `<name>.modulation`.
    """

    name: str
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    diff_m: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)  # the file's keys that fed this target

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank (ComfyUI's and LightX2V's rule); 1 when the file has no alpha."""
        return 1.0 if self.alpha is None or self.down is None else float(self.alpha) / self.rank

    @property
    def kinds(self) -> list[str]:
        out = ["lora"] if self.down is not None else []
        return out + [k for k in ("diff", "diff_b", "diff_m") if getattr(self, k) is not None]


@dataclass
class LoraWeights:
    """A parsed LoRA: targets by official module name (only names shaped like a Wan2.1 DiT module),
    plus the keys that are no LoRA part of such a module (`unknown_keys`)."""

    targets: dict[str, LoraTarget]
    source: str = "state dict"
    layout: str = "official"  # 'official' | 'diffusers' | 'kohya' | 'kohya-diffusers'
    unknown_keys: list[str] = field(default_factory=list)


def kohya_to_dotted(stem: str) -> str:
    """'blocks_0_cross_attn_k_img' -> 'blocks.0.cross_attn.k_img' (longest known compound first)."""
    tokens = stem.split("_")
    parts: list[str] = []
    i = 0
    while i < len(tokens):
        for comp in _COMPOUNDS:
            if tuple(tokens[i : i + len(comp)]) == comp:
                parts.append("_".join(comp))
                i += len(comp)
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def _split(key: str) -> tuple[str, str, bool] | None:
    """key -> (target stem, role, kohya?) or None when no known suffix ends the key."""
    k = key
    for _ in range(3):
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
                break
        else:
            break
    kohya = False
    for p in _KOHYA_PREFIXES:
        if k.startswith(p):
            k, kohya = k[len(p) :].lstrip("_"), True
            break
    for suf in _SUFFIX_ORDER:
        if k.endswith(suf) and len(k) > len(suf):
            return k[: -len(suf)], _SUFFIXES[suf], kohya
    return None


def _diffusers_to_official(stem: str) -> str:
    """A diffusers module (or parameter) name -> official, through the DiT loader's key map."""
    new = _rename(stem + ".weight", _DIFFUSERS_TO_OFFICIAL)
    if new != stem + ".weight":
        return new[: -len(".weight")]
    return _rename(stem, _DIFFUSERS_TO_OFFICIAL)


def parse_lora(sd: dict[str, torch.Tensor], source: str = "state dict") -> LoraWeights:
    """A LoRA state dict in any supported layout -> `LoraWeights` (tensors untouched, no copies).

    Raises CheckpointError for an incomplete low-rank pair or an unsupported LoRA variant
    (DoRA, LoCon mid, LoHa, LoKr): applying those as plain LoRA would be silently wrong.
    """
    parsed: list[tuple[str, str, str, bool]] = []
    unknown: list[str] = []
    for key in sd:
        s = _split(key)
        if s is None:
            unknown.append(key)
        else:
            parsed.append((key, *s))
    kohya = any(kh for *_, kh in parsed)
    # kohya stems are all-underscore ('blocks_0_self_attn_q') or, from some trainers, mixed
    # ('blocks_22.self_attn.k'): re-dot each dotted part.
    stems = [".".join(map(kohya_to_dotted, st.split("."))) if kh else st for _, st, _, kh in parsed]
    diffusers = any(h in st or st.startswith(h.lstrip(".")) for st in stems for h in _DIFFUSERS_HINTS)
    unsupported = [key for key, _, role, _ in parsed if role == "unsupported"]
    if unsupported:
        raise CheckpointError(
            f"{source}: unsupported LoRA variant (keys such as {unsupported[:3]}); only plain LoRA "
            "(up/down, alpha) and diff / diff_b / diff_m are supported"
        )
    targets: dict[str, LoraTarget] = {}
    for (key, _, role, _), stem in zip(parsed, stems):
        name = _diffusers_to_official(stem) if diffusers else stem
        if role == "diff" and (name == "modulation" or name.endswith(".modulation")):
            name, role = name[: -len("modulation")].rstrip("."), "diff_m"  # ComfyUI-style '<m>.modulation.diff'
        t = targets.setdefault(name, LoraTarget(name))
        value = sd[key]
        if role == "alpha":
            t.alpha = float(value.float().item())
        else:
            if getattr(t, role) is not None:
                raise CheckpointError(f"{source}: two keys give the {role} of {name} (second: {key})")
            setattr(t, role, value)
        t.keys.append(key)
    for t in list(targets.values()):
        if not WAN_NAME.match(t.name):  # another model's part (a text encoder, another architecture)
            unknown.extend(t.keys)
            del targets[t.name]
            continue
        if (t.down is None) != (t.up is None):
            have, lack = ("lora_up", "lora_down") if t.down is None else ("lora_down", "lora_up")
            raise CheckpointError(f"{source}: {t.name} has {have} but no {lack} (keys {t.keys})")
        if t.down is not None and t.down.shape[0] != t.up.shape[1]:
            raise CheckpointError(
                f"{source}: {t.name}: lora_down has rank {t.down.shape[0]} but lora_up has rank {t.up.shape[1]}"
            )
        if not t.kinds:  # an alpha with nothing to scale
            unknown.extend(t.keys)
            del targets[t.name]
    layout = ("kohya-" if kohya else "") + ("diffusers" if diffusers else "official")
    return LoraWeights(targets, source=source, layout=layout.replace("kohya-official", "kohya"), unknown_keys=unknown)


def load_lora(path: str | os.PathLike) -> LoraWeights:
    """Read (memory-mapped) and parse a LoRA file (.safetensors, or a weights-only .pth)."""
    path = os.fspath(path)
    return parse_lora(read_state_dict(path), source=path)


# ---- writing (tests, tiny demo files) -------------------------------------------------------

# name -> (key prefix, target naming, low-rank suffixes): the layouts of FORMATS.md.
LORA_LAYOUTS: dict[str, tuple[str, str, tuple[str, str]]] = {
    "lightx2v": ("diffusion_model.", "official", (".lora_down.weight", ".lora_up.weight")),
    "plain": ("", "official", (".lora_down.weight", ".lora_up.weight")),
    "comfyui": ("model.diffusion_model.", "official", (".lora_A.weight", ".lora_B.weight")),
    "peft": ("base_model.model.", "official", (".lora_A.weight", ".lora_B.weight")),
    "kohya": ("lora_unet_", "kohya", (".lora_down.weight", ".lora_up.weight")),
    "diffusers": ("transformer.", "diffusers", (".lora_A.weight", ".lora_B.weight")),
    "diffusers-plain": ("", "diffusers", (".lora_down.weight", ".lora_up.weight")),
}


def _out_name(name: str, naming: str) -> str:
    if naming == "diffusers":
        return next(iter(official_to_diffusers({name + ".weight": None})))[: -len(".weight")]
    if naming == "kohya":
        return name.replace(".", "_")
    return name


def lora_state_dict(lora: LoraWeights, layout: str = "lightx2v", dtype: torch.dtype | None = None) -> dict:
    """A normalised LoRA -> the flat state dict of one of `LORA_LAYOUTS`."""
    if layout not in LORA_LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}: choose one of {sorted(LORA_LAYOUTS)}")
    prefix, naming, (down_s, up_s) = LORA_LAYOUTS[layout]
    out: dict[str, torch.Tensor] = {}

    def put(key, t):
        out[key] = (t if dtype is None else t.to(dtype)).contiguous()

    for t in lora.targets.values():
        n = prefix + _out_name(t.name, naming)
        if t.down is not None:
            put(n + down_s, t.down)
            put(n + up_s, t.up)
            if t.alpha is not None:
                out[n + ".alpha"] = torch.tensor(float(t.alpha))
        for kind in ("diff", "diff_b"):
            if getattr(t, kind) is not None:
                put(n + "." + kind, getattr(t, kind))
        if t.diff_m is not None:  # the block/head name is the same in every naming
            m = prefix + (t.name.replace(".", "_") if naming == "kohya" else t.name)
            put(m + ".diff_m", t.diff_m)
    return out


def save_lora(
    lora: LoraWeights, path: str | os.PathLike, layout: str = "lightx2v", dtype: torch.dtype | None = None
) -> str:
    """Write a normalised LoRA as a .safetensors file in one of `LORA_LAYOUTS`; returns the path."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    save_file(lora_state_dict(lora, layout, dtype), path)
    return path


def random_lora(
    cfg: WanConfig,
    rank: int = 4,
    seed: int = 0,
    alpha: float | None = 3.0,
    targets: str | list[str] = "linears",
    diffs: bool = True,
    magnitude: float = 0.05,
) -> LoraWeights:
    """A random LoRA that fits `cfg` (tests and demo files).

    targets: 'linears' (every nn.Linear of the DiT), 'blocks' (the block linears only) or a list
    of module names. diffs: add `diff_b` on every targeted linear with a bias, `diff` on the
    affine norms (norm3, norm_q, norm_k) and on the first target, and `diff_m` on every block
    and the head, as LightX2V's distill LoRAs carry.
    """
    from ..models.dit import WanModel

    with torch.device("meta"):
        model = WanModel(cfg)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * magnitude

    modules = dict(model.named_modules())
    if isinstance(targets, str):
        names = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
        if targets == "blocks":
            names = [n for n in names if n.startswith("blocks.")]
        elif targets != "linears":
            raise ValueError(f"targets must be 'linears', 'blocks' or a list of names, not {targets!r}")
    else:
        names = list(targets)
    out: dict[str, LoraTarget] = {}
    for n in names:
        m = modules[n]
        t = out.setdefault(n, LoraTarget(n))
        t.down, t.up, t.alpha = rnd(rank, m.in_features), rnd(m.out_features, rank) * 4, alpha
        if diffs and m.bias is not None:
            t.diff_b = rnd(m.out_features)
    if diffs:
        if names:
            w = modules[names[0]].weight
            out[names[0]].diff = rnd(*w.shape)
        for n, m in modules.items():
            if re.search(r"(norm3|norm_q|norm_k)$", n) and getattr(m, "weight", None) is not None:
                t = out.setdefault(n, LoraTarget(n))
                t.diff = rnd(*m.weight.shape)
                if getattr(m, "bias", None) is not None:
                    t.diff_b = rnd(*m.bias.shape)
            if hasattr(m, "modulation") and isinstance(m.modulation, torch.nn.Parameter):
                out.setdefault(n, LoraTarget(n)).diff_m = rnd(*m.modulation.shape)
    return LoraWeights(out, source=f"random_lora(seed={seed})")
