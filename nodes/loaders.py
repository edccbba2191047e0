"""Loader nodes: they describe a model (a `wan_core.spec.ModelSpec`), they do not build it.

The spec is built lazily by the first node that needs weights (text encode, sampling, decode)
and cached by `wan_core.model_cache`, so re-running a graph does not reload 28 GB, and a LoRA
strength change rebuilds only what the LoRA touches.

Which model a DiT file is (Wan2.1 T2V / I2V, a Wan2.2 A14B expert, TI2V-5B) is read off its
header and name (`read_dit_facts`): the Wan2.2 I2V expert needs no CLIP file, TI2V-5B needs the
Wan2.2 VAE. As in ComfyUI's own Wan2.2 templates, the two A14B experts are two loaders (each with
its own LoRAs); the two-expert sampler gives each its role (high / low noise).
"""

from __future__ import annotations

import os

from wan_core.api import (
    ATTENTION_BACKENDS,
    FP8_KERNELS,
    RADIAL_KERNELS,
    CheckpointError,
    ModelFamilyError,
    ModelSpec,
    OffloadOptions,
    RadialOptions,
    check_vae_fits,
    find_model_files,
    read_dit_facts,
)

from . import compat
from .types import CATEGORY, WAN_MODEL, WAN_OFFLOAD, WAN_RADIAL

FROM_FOLDER = "(from model folder)"
NONE = "(none)"
DTYPES = ["auto", "bf16", "fp16", "fp32"]
ATTENTION = ["auto", *ATTENTION_BACKENDS]
TASKS = ["auto", "t2v", "i2v", "ti2v"]
RESIDUALS = ["auto", "float32", "bfloat16"]  # ModelSpec.residual_dtype
EXPERT_FOLDERS = ("high_noise_model", "low_noise_model")  # a Wan-AI Wan2.2 A14B folder's two experts


def is_wan_folder(path: str) -> bool:
    """A Wan-AI model folder: config.json beside diffusion_pytorch_model*.safetensors."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return "config.json" in names and any(n.startswith("diffusion_pytorch_model") for n in names)


def is_a14b_folder(path: str) -> bool:
    """A Wan-AI Wan2.2 A14B folder: `high_noise_model/` and `low_noise_model/`, each a model folder."""
    return all(is_wan_folder(os.path.join(path, e)) for e in EXPERT_FOLDERS)


def dit_choices() -> list[str]:
    """Wan-AI folders ('name/'; A14B: 'name/high_noise_model/' and 'name/low_noise_model/') and single
    DiT files found in diffusion_models/."""
    folders = compat.list_model_dirs("diffusion_models", is_wan_folder)
    a14b = compat.list_model_dirs("diffusion_models", is_a14b_folder)
    experts = [f"{d}{e}/" for d in a14b for e in EXPERT_FOLDERS]
    files = [f for f in compat.list_model_files("diffusion_models") if not any(f.startswith(d) for d in folders + a14b)]
    return sorted(folders + experts) + files


def dit_facts(dit: str, dit_path: str):
    """What the DiT's header and names say (`read_dit_facts`: task, Wan version, CLIP branch)."""
    try:
        return read_dit_facts(dit_path)
    except CheckpointError as e:
        raise CheckpointError(f"DiT {dit!r}: {e}") from e


def _component(kind: str, choice: str, from_folder: str | None) -> str | None:
    """Resolve one of text_encoder / vae / clip_vision: a file of its ComfyUI folder, or the Wan-AI folder's."""
    if choice == NONE:
        return None
    if choice == FROM_FOLDER:
        return from_folder
    return compat.resolve_model_path(kind, choice)


def make_spec(
    dit: str,
    text_encoder: str,
    vae: str,
    clip_vision: str,
    task: str = "auto",
    dtype: str = "auto",
    attention: str = "auto",
    offload: OffloadOptions | None = None,
    fp8: str | None = None,
    radial: RadialOptions | None = None,
    residual: str = "auto",
) -> ModelSpec:
    """Check the picked files and describe the model; nothing is read but file headers.
    radial (from WanRadialAttention) turns radial_attn on with its options: attention 'auto' becomes
    radial_attn, another backend named is an error."""
    attention = radial_attention(attention, radial)
    dit_path = compat.resolve_model_path("diffusion_models", dit)
    facts = dit_facts(dit, dit_path)
    found = facts.task
    wan22 = facts.family == "wan2.2" or found == "ti2v"  # a T2V file may not say (it then runs as either)
    if task == "auto":
        task = found
    elif task != found:
        raise CheckpointError(
            f"DiT {dit!r} is a {found.upper()} model but task is set to {task}; set task to 'auto' or '{found}'"
        )
    needs_clip = found == "i2v" and facts.clip  # Wan2.1 I2V; the Wan2.2 models have no CLIP image encoder
    if wan22 and clip_vision not in (NONE, FROM_FOLDER):
        raise ValueError(f"DiT {dit!r} is {facts.desc}, which uses no CLIP image encoder: set clip_vision to {NONE}")
    tokenizer = None
    in_folder = dict.fromkeys(("t5", "vae", "clip"))
    if os.path.isdir(dit_path):  # a Wan-AI folder: its own files unless others are picked
        given = dict(
            t5=None if text_encoder == FROM_FOLDER else compat.resolve_model_path("text_encoders", text_encoder),
            vae=None if vae == FROM_FOLDER else compat.resolve_model_path("vae", vae),
        )
        if os.path.basename(os.path.normpath(dit_path)) in EXPERT_FOLDERS:  # an A14B expert: the rest is beside it
            root = os.path.dirname(os.path.normpath(dit_path))
            high, low = (os.path.join(root, e) for e in EXPERT_FOLDERS)
            files = find_model_files(root, task, family="wan2.2", high=high, low=low, **given)
        elif wan22:
            files = find_model_files(dit_path, task, family="wan2.2", **given)
        else:
            clip = None if clip_vision in (FROM_FOLDER, NONE) else compat.resolve_model_path("clip_vision", clip_vision)
            files = find_model_files(dit_path, task, clip=clip, **given)
        in_folder = {"t5": files.t5, "vae": files.vae, "clip": files.clip}
        tokenizer = files.tokenizer
    elif FROM_FOLDER in (text_encoder, vae):
        raise FileNotFoundError(
            f"'{FROM_FOLDER}' needs a Wan-AI model folder as the DiT; {dit!r} is a single file: "
            "pick the text encoder and VAE files from models/text_encoders and models/vae"
        )
    t5_path = _component("text_encoders", text_encoder, in_folder["t5"])
    vae_path = _component("vae", vae, in_folder["vae"])
    clip_path = _component("clip_vision", clip_vision, in_folder["clip"]) if needs_clip else None
    if needs_clip and clip_path is None:
        raise FileNotFoundError(
            f"DiT {dit!r} is an image-to-video model: pick its CLIP vision file (clip_vision_h.safetensors) in clip_vision"
        )
    if vae_path is not None:
        try:  # TI2V-5B needs the Wan2.2 VAE, every other model the Wan2.1 one
            check_vae_fits(facts, vae_path)
        except ModelFamilyError:
            raise
        except CheckpointError:
            pass  # a VAE header that cannot be read: the VAE loader names what is wrong with it
    spec = ModelSpec(
        dit=dit_path,
        t5=t5_path,
        vae=vae_path,
        tokenizer=tokenizer,
        clip=clip_path,
        task=task,
        dtype=dtype,
        attention=attention,
        radial=radial,
        fp8=fp8,
        offload=offload or OffloadOptions(),
        residual_dtype=residual,
    )
    return spec


def radial_attention(attention: str, radial: RadialOptions | None) -> str:
    """The self-attention a loader asks for, given its `radial` input."""
    if radial is None:
        return attention
    if attention not in ("auto", "radial_attn"):
        raise ValueError(
            f"the radial input (Wan Radial Attention) sets radial_attn's options, but the loader's attention is "
            f"{attention!r}: set attention to radial_attn or auto, or disconnect the radial input"
        )
    return "radial_attn"


def _loader_inputs() -> dict:
    return {
        "required": {
            "dit": (
                dit_choices(),
                {
                    "tooltip": "A DiT file from models/diffusion_models (Wan2.1, a Wan2.2 high- or low-noise expert, "
                    "Wan2.2 TI2V-5B), or a Wan-AI model folder there"
                },
            ),
            "text_encoder": (
                [FROM_FOLDER, *compat.list_model_files("text_encoders")],
                {"tooltip": "umT5-XXL from models/text_encoders (e.g. umt5_xxl_fp16.safetensors)"},
            ),
            "vae": (
                [FROM_FOLDER, *compat.list_model_files("vae")],
                {"tooltip": "wan_2.1_vae.safetensors from models/vae (Wan2.2 TI2V-5B: wan2.2_vae.safetensors)"},
            ),
            "clip_vision": (
                [NONE, FROM_FOLDER, *compat.list_model_files("clip_vision")],
                {"tooltip": "Wan2.1 I2V only: clip_vision_h.safetensors from models/clip_vision (Wan2.2 uses none)"},
            ),
            "task": (
                TASKS,
                {"default": "auto", "tooltip": "auto: read off the DiT (I2V: image input channels; TI2V-5B: 48)"},
            ),
            "dtype": (DTYPES, {"default": "auto", "tooltip": "auto: bf16 on a GPU, fp32 on the CPU"}),
            "attention": (ATTENTION, {"default": "auto"}),
        },
        "optional": {
            "offload": (WAN_OFFLOAD, {"tooltip": "from WanOffloadConfig"}),
            "radial": (
                WAN_RADIAL,
                {"tooltip": "from WanRadialAttention: block-sparse self-attention (radial_attn) with its options"},
            ),
            "residual": (
                RESIDUALS,
                {"default": "auto", "tooltip": "the residual stream between the DiT's blocks: auto = bfloat16 with FP8 "
                 "linears (as ComfyUI and LightX2V run it; faster), float32 otherwise (the official model's)"},
            ),
        },
    }


class WanModelLoader:
    """Pick the model files; returns a model description that later nodes build once and cache."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (WAN_MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    DESCRIPTION = (
        "Wan2.1 T2V/I2V (+ CLIP for I2V), a Wan2.2 A14B high- or low-noise expert (one loader each, into the "
        "two-expert sampler) or Wan2.2 TI2V-5B (with wan2.2_vae): DiT + umT5 + VAE, from ComfyUI's model folders "
        "or a Wan-AI folder."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return _loader_inputs()

    def load(self, dit, text_encoder, vae, clip_vision, **options):
        """options: the optional widgets and inputs (task, dtype, attention, offload, radial, residual), as make_spec names them."""
        return (make_spec(dit, text_encoder, vae, clip_vision, **options),)


class WanFP8Loader:
    """Like WanModelLoader, with the DiT's block linears in FP8: an FP8 file as it is, or a bf16 file quantized on load."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (WAN_MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    DESCRIPTION = (
        "Wan2.1 with FP8 DiT linears: lightx2v scaled_fp8_e4m3, ComfyUI fp8_scaled or plain e4m3fn files, "
        "or a bf16 file quantized on load (per-channel scales)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        spec = _loader_inputs()
        spec["required"]["fp8_kernel"] = (
            list(FP8_KERNELS),
            {
                "default": "auto",
                "tooltip": "auto: torch._scaled_mm with fast accumulation on Ada/Hopper (scaled_mm: without), dequantize elsewhere",
            },
        )
        return spec

    def load(self, dit, text_encoder, vae, clip_vision, fp8_kernel="auto", **options):
        return (make_spec(dit, text_encoder, vae, clip_vision, fp8=fp8_kernel, **options),)


class WanLoraApply:
    """Add a LoRA from models/loras with a strength; chain several. Strength changes do not reload the base."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (WAN_MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    DESCRIPTION = (
        "Adds a LoRA (every Wan LoRA layout: lora_up/down, lora_A/B, alpha, diff, diff_b, diff_m, kohya names)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (WAN_MODEL,),
                "lora": (compat.list_model_files("loras"), {"tooltip": "a LoRA file from models/loras"}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
            }
        }

    def apply(self, model: ModelSpec, lora: str, strength: float):
        path = compat.resolve_model_path("loras", lora)
        if strength == 0.0:
            return (model,)
        return (model.replace(loras=(*model.loras, (path, float(strength)))),)


class WanOffloadConfig:
    """CPU offload settings for the DiT (and the encoders / VAE); plug into a loader's `offload` input."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (WAN_OFFLOAD,)
    RETURN_NAMES = ("offload",)
    FUNCTION = "make"
    DESCRIPTION = (
        "Keep the DiT in CPU memory and stream it to the GPU by model or by block (for 16-24 GB cards); "
        "the text encoder, CLIP and the VAE go to the GPU only for their stage."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "granularity": (
                    ["none", "model", "block"],
                    {
                        "default": "block",
                        "tooltip": "block: the least GPU memory; model: the whole DiT on the GPU while sampling",
                    },
                ),
                "vram_budget_gb": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1024.0,
                        "step": 0.5,
                        "tooltip": "block: use at most this much GPU memory (keeps as many blocks resident as fit; "
                        "about your card's size minus 1.5). 0: every block streams",
                    },  # fmt: skip
                ),
                "offload_encoders": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "text encoder, CLIP and VAE in CPU memory, on the GPU only while they run",
                    },
                ),
            }
        }

    def make(self, granularity: str, vram_budget_gb: float, offload_encoders: bool = True):
        enc = bool(offload_encoders)  # checked by OffloadOptions itself
        return (OffloadOptions(granularity, vram_budget_gb, text_encoder=enc, image_encoder=enc, vae=enc),)


class WanRadialAttention:
    """Radial Attention's options; plug into a loader's `radial` input to run its self-attention block-sparse."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (WAN_RADIAL,)
    RETURN_NAMES = ("radial",)
    FUNCTION = "make"
    DESCRIPTION = (
        "Block-sparse self-attention (Radial Attention, LightX2V's radial_attn): each frame attends to a band of "
        "the others that narrows with their distance in time; ~2x faster forwards at 720p. The first layers and "
        "steps can stay dense (the reference's 50-step recipe: 1 dense layer, 12 dense steps)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "decay_factor": (
                    "FLOAT",
                    {
                        "default": 0.2,
                        "min": 0.01,
                        "max": 16.0,
                        "step": 0.05,
                        "tooltip": "width of the band kept between frames 2 or more apart (smaller: sparser); 0.2 as LightX2V",
                    },
                ),
                "dense_layers": (
                    "INT",
                    {"default": 0, "min": 0, "max": 100, "tooltip": "the first N transformer blocks attend densely"},
                ),
                "dense_timesteps": (
                    "INT",
                    {"default": 0, "min": 0, "max": 1000, "tooltip": "the first N sampling steps attend densely"},
                ),
                "kernel": (
                    list(RADIAL_KERNELS),
                    {
                        "default": "auto",
                        "tooltip": "auto: the 8-bit sparse kernel for an FP8 model on an Ada/Hopper GPU, "
                        "else the model dtype's (bf16); fp8 / bf16: that one",
                    },
                ),
            }
        }

    def make(self, decay_factor: float, dense_layers: int, dense_timesteps: int, kernel: str = "auto"):
        return (RadialOptions(float(decay_factor), int(dense_layers), int(dense_timesteps), kernel),)
