"""Find the component files of a Wan2.1 or Wan2.2 model in a folder, whatever layout the user has.

Three folder layouts are recognised for Wan2.1 (file names from the public repositories):
- Wan-AI (`Wan-AI/Wan2.1-T2V-14B`, `-I2V-14B-480P`, ...): `diffusion_pytorch_model*.safetensors`
  (+ `config.json`), `models_t5_umt5-xxl-enc-bf16.pth`, `google/umt5-xxl/`, `Wan2.1_VAE.pth`,
  and for I2V `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`;
- ComfyUI (`ComfyUI/models`): `diffusion_models/*.safetensors`, `text_encoders/umt5_xxl_*`,
  `vae/wan_2.1_vae.safetensors`, `clip_vision/clip_vision_h.safetensors`;
- diffusers (`*-Diffusers`): `transformer/`, `text_encoder/`, `tokenizer/`, `vae/`, `image_encoder/`.
Wan2.2 (`family="wan2.2"`; A14B = two experts, TI2V-5B = one DiT with the Wan2.2 VAE, no CLIP):
- Wan-AI: `high_noise_model/`, `low_noise_model/` (TI2V-5B: the DiT at the root), the T5 as above,
  `Wan2.1_VAE.pth` (A14B) or `Wan2.2_VAE.pth` (5B);
- ComfyUI: `diffusion_models/wan2.2_{t2v,i2v}_{high,low}_noise_14B_*` (picked by the high/low noise
  name and by `in_dim`, so T2V and I2V experts may share the folder) or `wan2.2_ti2v_5B_*`,
  `vae/wan_2.1_vae.safetensors` or `vae/wan2.2_vae.safetensors`;
- diffusers: `transformer/` (high-noise), `transformer_2/` (low-noise); TI2V-5B `transformer/` only.
Any file can also be given explicitly, which wins over the search. A missing component is an
error that names it and every place that was searched. The files found or given are then checked
(headers and names only, `family.py`): a DiT of the other version, task or expert, swapped experts
or a VAE that does not fit the DiT is a one-line `ModelFamilyError` before anything is loaded.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from .family import (
    FAMILIES,
    FAMILY_TASKS,
    ModelFamilyError,
    check_dit_family,
    check_expert_pair,
    check_vae_fits,
    read_dit_facts,
)
from .io import CheckpointError, read_keys

__all__ = [
    "ModelFiles",
    "find_model_files",
    "check_model_files",
    "model_config_json",
    "MissingComponentError",
    "ModelFamilyError",
]

WAN_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_VAE = "Wan2.1_VAE.pth"
WAN22_VAE = "Wan2.2_VAE.pth"
WAN_CLIP = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
WAN_TOKENIZER = os.path.join("google", "umt5-xxl")


class MissingComponentError(CheckpointError, FileNotFoundError):
    """A component file of the model could not be found."""


@dataclass(frozen=True)
class ModelFiles:
    """The files of one model. A Wan2.2 A14B model has two experts (`dit_high`, `dit_low`) and no
    `dit`; every other model one `dit`. Wan2.2 has no CLIP (`clip` None)."""

    dit: str | tuple[str, ...] | None
    t5: str | None
    tokenizer: str | None  # None: embedded in the T5 file (ComfyUI) or beside it (Wan-AI)
    vae: str | None
    clip: str | None
    layout: str  # "wan" | "comfyui" | "diffusers" | "files"
    family: str = "wan2.1"  # "wan2.1" | "wan2.2"
    dit_high: str | tuple[str, ...] | None = None  # Wan2.2 A14B: the high-noise expert (t >= boundary)
    dit_low: str | tuple[str, ...] | None = None  # Wan2.2 A14B: the low-noise expert

    @property
    def experts(self) -> tuple[str | tuple[str, ...], str | tuple[str, ...]] | None:
        """(high, low) for a two-expert model, else None."""
        return (self.dit_high, self.dit_low) if self.dit_high is not None else None


def _first(*candidates: str) -> str | None:
    return next((c for c in candidates if c and os.path.exists(c)), None)


def _is_fp8(path: str) -> bool:
    try:
        return any(dtype.startswith("F8") for _, dtype in read_keys(path).values())
    except CheckpointError:
        return False


def _facts(path: str):
    try:
        return read_dit_facts(path)
    except CheckpointError:
        return None  # not a Wan DiT (another model in the same folder), or unreadable


def _one(folder: str, fits: list[str], label: str, arg: str) -> str | None:
    """The one file of `fits`; a full-precision file wins over FP8 ones; several is an error."""
    if len(fits) > 1:
        full = [f for f in fits if not _is_fp8(f)]
        fits = full or fits
    if len(fits) > 1:
        names = ", ".join(os.path.basename(f) for f in fits)
        raise MissingComponentError(f"{folder} holds several {label} files ({names}); choose one with {arg}=")
    return fits[0] if fits else None


def _pick_comfy_dit(folder: str, task: str) -> str | None:
    """A Wan2.1 DiT of `task` (Wan2.2 files in the same folder are passed over)."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    fits = [f for f in files if (x := _facts(f)) is not None and x.task == task and x.family != "wan2.2"]
    return _one(folder, fits, f"{task.upper()} DiT", "dit_path")


def _pick_comfy22(folder: str, task: str, wanted: list[str]) -> dict[str, str | None]:
    """Wan2.2 DiTs of `task` in a ComfyUI folder, for each of `wanted`: 'high' / 'low' (A14B: by the
    high/low noise names, the task by `in_dim`), 'dit' (TI2V-5B). Files named Wan2.1 are passed over."""
    if not wanted:
        return {}
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    found = [x for f in files if (x := _facts(f)) is not None and x.task == task and x.family != "wan2.1"]
    label = {
        "dit": "TI2V-5B DiT",
        "high": f"high-noise {task.upper()} expert",
        "low": f"low-noise {task.upper()} expert",
    }
    arg = {"dit": "dit_path", "high": "high_noise_path", "low": "low_noise_path"}
    return {w: _one(folder, [x.path for x in found if w == "dit" or x.role == w], label[w], arg[w]) for w in wanted}


def _pick_comfy_t5(folder: str) -> str | None:
    files = sorted(glob.glob(os.path.join(folder, "umt5*.safetensors")))
    full = [f for f in files if not _is_fp8(f)]
    return (full or files or [None])[0]


def _check_arguments(family: str, task: str, dit, clip, high, low) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if task not in FAMILY_TASKS[family]:
        raise ValueError(f"a {family} task is one of {FAMILY_TASKS[family]}, got {task!r}")
    experts = family == "wan2.2" and task != "ti2v"
    if experts and dit is not None:
        raise ValueError(
            f"Wan2.2 {task.upper()}-A14B runs two experts: give them as high= and low= (not one dit): {dit}"
        )
    if not experts and (high is not None or low is not None):
        what = "TI2V-5B is one DiT: give it as dit=" if family == "wan2.2" else "Wan2.1 has one DiT: give it as dit="
        raise ValueError(f"high=/low= are the Wan2.2 A14B experts; {what}")
    if family == "wan2.2" and clip is not None:
        raise ValueError(f"Wan2.2 uses no CLIP image encoder: leave clip out ({clip})")


def find_model_files(
    model_path: str | None,
    task: str = "t2v",
    dit: str | None = None,
    t5: str | None = None,
    tokenizer: str | None = None,
    vae: str | None = None,
    clip: str | None = None,
    *,
    family: str = "wan2.1",
    high: str | None = None,
    low: str | None = None,
    check: bool = True,
) -> ModelFiles:
    """Locate every component for `family` ('wan2.1' | 'wan2.2') and `task` ('t2v' | 'i2v', Wan2.2
    also 'ti2v'); explicit paths win and must exist. Wan2.2 A14B takes its experts as `high` / `low`
    (each found in the folder when not given), TI2V-5B its DiT as `dit`. With `check`, the files are
    then checked against each other (`check_model_files`: headers and names, no weights read)."""
    _check_arguments(family, task, dit, clip, high, low)
    given = (
        ("dit_path", dit),
        ("t5_path", t5),
        ("tokenizer_path", tokenizer),
        ("vae_path", vae),
        ("clip_path", clip),
        ("high", high),
        ("low", low),
    )
    for name, p in given:
        if p is not None and not os.path.exists(p):
            raise MissingComponentError(f"{name} does not exist: {p}")
    root = os.path.abspath(model_path) if model_path else None
    if root is not None and not os.path.isdir(root):
        raise MissingComponentError(f"model_path is not a folder: {model_path}")
    wan22, experts = family == "wan2.2", family == "wan2.2" and task != "ti2v"
    name = f"Wan2.2 {task.upper()}-{'A14B' if experts else '5B'}" if wan22 else f"Wan2.1 {task.upper()}"

    layout, looked = "files", {}
    if root is not None:
        j = lambda *p: os.path.join(root, *p)  # noqa: E731
        if os.path.isfile(j("model_index.json")) or os.path.isdir(j("transformer")):
            layout = "diffusers"
            looked = {
                "dit": [j("transformer")],
                "dit_high": [j("transformer")],
                "dit_low": [j("transformer_2")],
                "t5": [j("text_encoder", "model.safetensors.index.json"), j("text_encoder", "model.safetensors")],
                "tokenizer": [j("tokenizer")],
                "vae": [j("vae", "diffusion_pytorch_model.safetensors")],
                "clip": [j("image_encoder", "model.safetensors")],
            }
        elif os.path.isdir(j("diffusion_models")) or os.path.isdir(j("text_encoders")):
            layout = "comfyui"
            if wan22:
                wanted = [w for w, g in ((("high", high), ("low", low)) if experts else (("dit", dit),)) if g is None]
                picks = _pick_comfy22(j("diffusion_models"), task, wanted)
                what = {
                    "dit": "wan2.2_ti2v_5B_*",
                    "high": f"wan2.2_{task}_high_noise_*",
                    "low": f"wan2.2_{task}_low_noise_*",
                }
                dits = {
                    f"dit_{k}" if k != "dit" else k: [v or j("diffusion_models", f"<{what[k]}>.safetensors")]
                    for k, v in picks.items()
                }
                vae_names = (
                    (["wan2.2_vae.safetensors"], ["*2.2*vae*.safetensors", "*2_2*vae*.safetensors"])
                    if task == "ti2v"
                    else None
                )
            else:
                comfy_dit = _pick_comfy_dit(j("diffusion_models"), task) if dit is None else None
                dits = {"dit": [comfy_dit or j("diffusion_models", f"<a Wan2.1 {task.upper()} DiT>.safetensors")]}
                vae_names = None
            names, patterns = vae_names or (["wan_2.1_vae.safetensors"], ["wan*2.1*vae*.safetensors"])
            looked = {
                **dits,
                "t5": [_pick_comfy_t5(j("text_encoders")) or j("text_encoders", "umt5_xxl_*.safetensors")],
                "tokenizer": [],
                "vae": [j("vae", n) for n in names] + sorted(f for p in patterns for f in glob.glob(j("vae", p))),
                "clip": [j("clip_vision", "clip_vision_h.safetensors")]
                + sorted(glob.glob(j("clip_vision", "*clip_vision_h*"))),
            }
        else:
            layout = "wan"
            has_dit = glob.glob(j("diffusion_pytorch_model*.safetensors*"))
            looked = {
                "dit": [root if has_dit else j("diffusion_pytorch_model*.safetensors")],
                "dit_high": [j("high_noise_model")],
                "dit_low": [j("low_noise_model")],
                "t5": [j(WAN_T5)],
                "tokenizer": [j(WAN_TOKENIZER)],
                "vae": [j(WAN22_VAE if wan22 and task == "ti2v" else WAN_VAE)],
                "clip": [j(WAN_CLIP)],
            }

    def find(part: str, given: str | None, required: bool, label: str, arg: str | None = None) -> str | None:
        if given is not None:
            return given
        found = _first(*looked.get(part, []))
        if found is None and required:
            where = ", ".join(looked.get(part, [])) or "nowhere (no model_path given)"
            raise MissingComponentError(
                f"{label} not found; looked for {where}; pass {arg or part + '_path'}=... to give the file"
            )
        return found

    vae_label = ("the Wan2.2 VAE" if task == "ti2v" else "the Wan2.1 VAE (Wan2.2 A14B uses it)") if wan22 else "the VAE"
    files = ModelFiles(  # the diffusion model(s) first: a folder of another model is named by what it lacks most
        dit=None if experts else find("dit", dit, True, f"the {name} DiT (diffusion model)"),
        dit_high=find("dit_high", high, True, f"the {name} high-noise expert", "high_noise_path") if experts else None,
        dit_low=find("dit_low", low, True, f"the {name} low-noise expert", "low_noise_path") if experts else None,
        t5=find("t5", t5, True, "the T5 text encoder"),
        tokenizer=find("tokenizer", tokenizer, False, "the T5 tokenizer"),
        vae=find("vae", vae, True, vae_label),
        clip=None if wan22 else find("clip", clip, task == "i2v", "the CLIP image encoder (needed for i2v)"),
        layout=layout,
        family=family,
    )
    if check:
        check_model_files(files, task)
    return files


def check_model_files(files: ModelFiles, task: str) -> None:
    """ModelFamilyError if the files do not make one `files.family` `task` model: a DiT of the other
    version or task, the experts swapped or mixed, a VAE whose latent channels are not the DiT's
    (`family.py`; headers and names only). A DiT whose header cannot be read is left to the loader,
    which names what is wrong with it."""
    try:
        if files.experts is not None:
            facts = check_expert_pair(*files.experts, task)[0]
        elif files.dit is not None:
            facts = check_dit_family(files.dit, files.family, task)
        else:
            return
    except ModelFamilyError:
        raise
    except CheckpointError:
        return
    if files.vae is not None:
        try:
            check_vae_fits(facts, files.vae)
        except ModelFamilyError:
            raise
        except CheckpointError:
            return


def model_config_json(model_path: str | None, expert: str | None = None) -> str | None:
    """The DiT architecture file of a model folder (Wan-AI: `config.json`; diffusers: `transformer/config.json`;
    a Wan2.2 A14B expert, `expert` 'high' | 'low': `high_noise_model/config.json`, `transformer/config.json` /
    `low_noise_model/config.json`, `transformer_2/config.json`).

    LightX2V takes the architecture from `model_path` also when the weights come from a separate file
    (`dit_original_ckpt`, `dit_quantized_ckpt`, `high_noise_original_ckpt`, ...): a file's shapes cannot tell the head count.
    """
    if not model_path or not os.path.isdir(model_path):
        return None
    folders = {
        None: ("", "transformer"),
        "high": ("high_noise_model", "transformer"),
        "low": ("low_noise_model", "transformer_2"),
    }
    if expert not in folders:
        raise ValueError(f"expert must be 'high', 'low' or None, got {expert!r}")
    for cand in (os.path.join(model_path, f, "config.json") for f in folders[expert]):
        if os.path.isfile(cand):
            return cand
    return None
