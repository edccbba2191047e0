"""Which Wan model a file is (Wan2.1 or Wan2.2, which task, which Wan2.2 expert, which VAE), told from
file headers, config files and names only, so that a wrong file is a one-line error before any
weights are read.

What tells them apart:
- tensor shapes (robust): the CLIP image branch (`img_emb`, `k_img`) exists only in Wan2.1 I2V;
  `in_dim` 36 without it is the Wan2.2 I2V-A14B expert; 48 latent channels in and out is Wan2.2
  TI2V-5B. A VAE's latent channels (the conv around the latent) are 16 (Wan2.1 VAE, also the A14B
  experts') or 48 (Wan2.2 VAE, TI2V-5B only).
- T2V: the Wan2.1 T2V-14B DiT and a Wan2.2 T2V-A14B expert have identical key sets and shapes, and
  the released `config.json` files hold the same fields and values, so such files can only be told
  apart by their names and places: `high_noise_model/` / `low_noise_model/` folders, a diffusers
  folder whose `model_index.json` names `transformer_2` / `boundary_ratio` / `expand_timesteps`
  (Wan2.2) or none of them (Wan2.1), and names with wan2.1 / wan2.2 / high_noise / low_noise. A T2V
  file without such a hint passes every check.
- the expert (high- or low-noise) also only by names: the folders above, `high_noise` / `low_noise`
  in a file name, diffusers' `transformer/` (high) and `transformer_2/` (low).
Names are read from the file or folder itself and, while that name is one a layout fixes
(`diffusion_pytorch_model*`, `transformer_2`, `high_noise_model`, ...), from the folders above it:
never from far-away folders, whose names say nothing about the file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from .dit import find_dit_files, to_official
from .io import CheckpointError, read_keys
from .vae import KNOWN_PREFIXES

__all__ = [
    "FAMILIES",
    "FAMILY_TASKS",
    "ModelFamilyError",
    "DitFacts",
    "path_hints",
    "read_dit_facts",
    "vae_latent_channels",
    "check_dit_family",
    "check_expert_pair",
    "check_vae_fits",
]

FAMILIES = ("wan2.1", "wan2.2")
FAMILY_TASKS = {"wan2.1": ("t2v", "i2v"), "wan2.2": ("t2v", "i2v", "ti2v")}
_NAME = {"wan2.1": "Wan2.1", "wan2.2": "Wan2.2"}

_V21 = re.compile(r"wan[-_ ]?2[._-]?1(?![0-9])", re.I)
_V22 = re.compile(r"wan[-_ ]?2[._-]?2(?![0-9])|ti2v|a14b|high[-_ ]?noise|low[-_ ]?noise", re.I)
# `high_noise` (Wan-AI, ComfyUI, LightX2V) or a lone HIGH / LOW word (e.g. `Wan2_2-T2V-A14B-HIGH_fp8_*`)
_HIGH = re.compile(r"high[-_ ]?noise|(?<![a-z])high(?![a-z])", re.I)
_LOW = re.compile(r"low[-_ ]?noise|(?<![a-z])low(?![a-z])", re.I)
# names a layout fixes: the folder above tells more
_GENERIC = re.compile(
    r"^(diffusion_pytorch_model.*|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|transformer(_2)?|high_noise_model|low_noise_model)$"
)
_DESC = {
    ("wan2.1", "t2v"): "a Wan2.1 T2V DiT",
    ("wan2.1", "i2v"): "a Wan2.1 I2V DiT",
    ("wan2.2", "t2v"): "a Wan2.2 T2V-A14B expert",
    ("wan2.2", "i2v"): "a Wan2.2 I2V-A14B expert",
    ("wan2.2", "ti2v"): "the Wan2.2 TI2V-5B DiT",
}
_FIX = {
    ("wan2.1", "t2v"): "give a Wan2.1-T2V DiT (e.g. wan2.1_t2v_14B_bf16.safetensors)",
    (
        "wan2.1",
        "i2v",
    ): "give a Wan2.1-I2V DiT (it has the CLIP image branch; e.g. wan2.1_i2v_480p_14B_bf16.safetensors)",
    (
        "wan2.2",
        "t2v",
    ): "give the Wan2.2 T2V-A14B experts (high_noise_model/ + low_noise_model/, or wan2.2_t2v_high_noise_* + wan2.2_t2v_low_noise_*)",
    (
        "wan2.2",
        "i2v",
    ): "give the Wan2.2 I2V-A14B experts (high_noise_model/ + low_noise_model/, or wan2.2_i2v_high_noise_* + wan2.2_i2v_low_noise_*)",
    ("wan2.2", "ti2v"): "give the Wan2.2 TI2V-5B DiT (e.g. wan2.2_ti2v_5B_fp16.safetensors)",
}


class ModelFamilyError(CheckpointError):
    """A file of the other Wan version, task or expert, or a VAE that does not fit the DiT."""


@dataclass(frozen=True)
class Hints:
    family: str | None = None
    family_why: str = ""
    role: str | None = None  # "high" | "low"
    role_why: str = ""


def _diffusers_index(folder: str) -> dict | None:
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _given(entry) -> bool:
    """A model_index.json component entry that names a class (not `[null, null]`)."""
    return isinstance(entry, (list, tuple)) and any(e is not None for e in entry)


def path_hints(path: str | os.PathLike) -> Hints:
    """The Wan version and the expert a file's (or folder's) names tell; None where they tell nothing."""
    p = os.path.abspath(os.fspath(path))
    family = role = None
    family_why = role_why = ""
    for _ in range(3):
        name = os.path.basename(p)
        index = None
        if name in ("transformer", "transformer_2"):
            index, top = _diffusers_index(os.path.dirname(p)), name
        elif os.path.isdir(p):
            index, top = _diffusers_index(p), "transformer"  # a diffusers root: its DiT is transformer/
        if index is not None:
            two = _given(index.get("transformer_2"))
            v22 = two or index.get("boundary_ratio") is not None or bool(index.get("expand_timesteps"))
            why = f"the model_index.json beside it {'names transformer_2 / boundary_ratio / expand_timesteps' if v22 else 'has no transformer_2'}"
            if family is None:
                family, family_why = ("wan2.2" if v22 else "wan2.1"), why
            if role is None and two:
                role, role_why = ("high" if top == "transformer" else "low"), f"diffusers' {top}/"
        if role is None and bool(_HIGH.search(name)) != bool(_LOW.search(name)):
            role, role_why = ("high" if _HIGH.search(name) else "low"), f"'{name}' in its path"
        if family is None and bool(_V21.search(name)) != bool(_V22.search(name)):
            family, family_why = ("wan2.1" if _V21.search(name) else "wan2.2"), f"'{name}' in its path"
        if not _GENERIC.match(name):
            break
        p = os.path.dirname(p)
    return Hints(family, family_why, role, role_why)


@dataclass(frozen=True)
class DitFacts:
    """What a DiT file's header, config and names say (official tensor names)."""

    path: str
    in_dim: int
    out_dim: int
    clip: bool  # has the CLIP image branch (Wan2.1 I2V)
    arch: tuple  # shapes that fix the architecture, compared between the two experts
    task: str  # "t2v" | "i2v" | "ti2v", from the shapes
    family: str | None
    family_why: str
    role: str | None
    role_why: str

    @property
    def desc(self) -> str:
        return _DESC.get((self.family, self.task), f"a {self.task.upper()} DiT")


def read_dit_facts(path) -> DitFacts:
    """Read a DiT's header (a file, folder, shard index or list of shards) and its names; no tensor data.

    CheckpointError if it is no readable Wan DiT."""
    if isinstance(path, (list, tuple)):
        files, cfg, first = list(path), None, os.fspath(path[0])
    else:
        files, cfg = find_dit_files(os.fspath(path))
        first = os.fspath(path)
    shapes = to_official({k: tuple(shape) for k, (shape, _) in read_keys(files).items()})
    try:
        pe, head = shapes["patch_embedding.weight"], shapes["head.head.weight"]
    except KeyError as e:
        raise CheckpointError(f"{first}: not a Wan DiT (no {e.args[0]})") from e
    patch = pe[2] * pe[3] * pe[4] if len(pe) == 5 else 4
    in_dim, out_dim = pe[1], head[0] // patch
    clip = any(k.startswith("img_emb.") or ".k_img." in k for k in shapes)
    n_blocks = 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")), default=-1)
    arch = (pe, head, n_blocks, shapes.get("blocks.0.ffn.0.weight"), shapes.get("text_embedding.0.weight"), clip)
    task = "i2v" if clip or in_dim == out_dim + 20 else "ti2v" if in_dim == out_dim == 48 else "t2v"
    hints = path_hints(first)
    family, why = hints.family, hints.family_why
    if clip:
        family, why = "wan2.1", "it has the CLIP image branch: img_emb / k_img"
    elif task == "i2v":
        family, why = "wan2.2", f"in_dim {in_dim}, no CLIP image branch: no img_emb / k_img"
    elif task == "ti2v":
        family, why = "wan2.2", "48 latent channels in and out"
    elif cfg and cfg.get("model_type") == "ti2v":
        family, why = "wan2.2", "its config.json says model_type ti2v"
    return DitFacts(first, in_dim, out_dim, clip, arch, task, family, why, hints.role, hints.role_why)


def _check_family_task(family: str, task: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if task not in FAMILY_TASKS[family]:
        raise ValueError(f"a {family} task is one of {FAMILY_TASKS[family]}, got {task!r}")


def check_dit_family(path, family: str, task: str, what: str = "the DiT") -> DitFacts:
    """ModelFamilyError unless the DiT at `path` fits a `family` `task` run (headers and names only).

    Robust by shapes for I2V (CLIP branch or not) and TI2V (48 channels); a T2V file is refused only
    when its names or folder say it is of the other version (the key sets are identical), and passes
    when nothing says. Returns what was read (for the VAE check)."""
    _check_family_task(family, task)
    facts = read_dit_facts(path)
    got_family = facts.family or family
    if (got_family, facts.task) == (family, task):
        return facts
    why = f" ({facts.family_why})" if facts.family and facts.family_why else f" (in_dim {facts.in_dim})"
    same_keys = (
        " (Wan2.1 and Wan2.2 T2V files have the same tensors: only the name tells them apart)"
        if facts.task == task == "t2v"
        else ""
    )
    raise ModelFamilyError(
        f"{what} {facts.path} is {facts.desc}{why}, but a {_NAME[family]} {task.upper()} run needs "
        f"{_DESC[(family, task)]}{same_keys}: {_FIX[(family, task)]}"
    )


def check_expert_pair(high, low, task: str) -> tuple[DitFacts, DitFacts]:
    """ModelFamilyError unless `high` and `low` are the high- and low-noise experts of one Wan2.2 A14B
    `task` model: each a Wan2.2 expert (`check_dit_family`), not the same file, not swapped (by names:
    `high_noise_model/`, `high_noise` in a file name, diffusers `transformer/` vs `transformer_2/`), and
    of one architecture (shapes). Headers and names only."""
    if task not in ("t2v", "i2v"):
        raise ValueError(f"an expert pair is Wan2.2 A14B T2V or I2V, not {task!r} (TI2V-5B is one DiT)")
    fh = check_dit_family(high, "wan2.2", task, what="the high-noise expert")
    fl = check_dit_family(low, "wan2.2", task, what="the low-noise expert")
    if fh.role == "low" and fl.role == "high":
        raise ModelFamilyError(
            f"the experts are swapped: the high-noise expert given is a low-noise file ({fh.role_why}: {fh.path}) and the "
            f"low-noise expert a high-noise file ({fl.role_why}: {fl.path}); swap them (high = {fl.path}, low = {fh.path})"
        )
    for facts, slot, other in ((fh, "high", "low"), (fl, "low", "high")):
        if facts.role == other:
            raise ModelFamilyError(
                f"the {slot}-noise expert given is a {other}-noise file ({facts.role_why}: {facts.path}); "
                f"give the {slot}_noise file as the {slot}-noise expert (LightX2V: {slot}_noise_original_ckpt)"
            )
    if os.path.realpath(fh.path) == os.path.realpath(fl.path):
        raise ModelFamilyError(
            f"the same file is given as both experts ({fh.path}): give the high-noise expert as high and the low-noise one as low"
        )
    if fh.arch != fl.arch:
        raise ModelFamilyError(
            f"the two experts have different architectures (high: in_dim {fh.in_dim}, width {fh.arch[0][0]}, {fh.arch[2]} blocks; "
            f"low: in_dim {fl.in_dim}, width {fl.arch[0][0]}, {fl.arch[2]} blocks): {fh.path} / {fl.path}; "
            "give the two experts of one Wan2.2 A14B model"
        )
    return fh, fl


def vae_latent_channels(path) -> int | None:
    """The latent channels of a VAE file (the conv on the latent: official `conv2`, diffusers
    `post_quant_conv`), from its header; None if it is no Wan VAE."""
    keys = read_keys(path)
    for prefix in ("", *KNOWN_PREFIXES):
        for conv, anchor in (
            ("conv2.weight", "encoder.conv1.weight"),
            ("post_quant_conv.weight", "encoder.conv_in.weight"),
        ):
            if prefix + conv in keys and prefix + anchor in keys:
                return keys[prefix + conv][0][0]
    return None


def check_vae_fits(dit, vae) -> None:
    """ModelFamilyError unless the VAE's latent channels are the DiT's (`dit`: a path or `DitFacts`):
    TI2V-5B works on the Wan2.2 VAE's 48, every other Wan DiT (the A14B experts too) on the Wan2.1
    VAE's 16. Headers only."""
    facts = dit if isinstance(dit, DitFacts) else read_dit_facts(dit)
    z = vae_latent_channels(vae)
    if z is None or z == facts.out_dim:
        return
    name = {16: "the Wan2.1 VAE", 48: "the Wan2.2 VAE"}.get(z, "a VAE")
    need = {
        16: "the Wan2.1 VAE (Wan2.1_VAE.pth / vae/wan_2.1_vae.safetensors)",
        48: "the Wan2.2 VAE (Wan2.2_VAE.pth / vae/wan2.2_vae.safetensors)",
    }
    fix = need.get(facts.out_dim, f"a VAE with {facts.out_dim} latent channels")
    only = "; the Wan2.2 VAE is TI2V-5B's only" if z == 48 else ""
    raise ModelFamilyError(
        f"the VAE {os.fspath(vae)} is {name} ({z} latent channels), but {facts.desc} ({facts.path}) works on "
        f"{facts.out_dim}: give {fix}{only}"
    )
