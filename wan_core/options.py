"""Run settings in LightX2V's vocabulary: `GenerationConfig` read from a config JSON and/or keywords.

A LightX2V user's config files work unchanged. Every key falls in one of four groups:
- used: sampling, size, attention, component file paths, LoRA (`lora_configs`), FP8 DiT
  (`dit_quantized`, `dit_quantized_ckpt`, `dit_quant_scheme`), feature caching
  (`feature_caching` with its Tea/Mag keys, kept in `GenerationConfig.cache`), CPU offload
  (`cpu_offload`, `offload_granularity`, `t5_cpu_offload` / `text_encoder_cpu_offload`,
  `clip_cpu_offload`, `vae_cpu_offload`; ours: `vram_budget_gb`, `offload_resident_blocks`,
  `offload_prefetch`; see `wan_core.layers.offload.OffloadOptions`) and several GPUs (`parallel`:
  `cfg_p_size`, `seq_p_size`, `seq_p_attn_type`; ours: `ulysses_p_size`, `ring_p_size`; see
  `wan_core.layers.parallel.ParallelConfig`; it runs under torchrun), Radial Attention
  (`self_attn_1_type: "radial_attn"` with the reference's `decay_factor`, `dense_layers`,
  `dense_timesteps`; see `wan_core.kernels.radial_attention.RadialOptions`; with `dit_quantized`
  its kept blocks run in 8 bits, as fast mode's attention);
- pending: keys of features that land later (disk offload, quantized T5/CLIP, ...). They
  are parsed; asking for anything but their default raises `FeatureNotAvailable` naming the key.
  A feature that lands moves its keys from `PENDING` into the used group;
- ignored: keys that change nothing here (memory housekeeping, prompt-enhancer servers,
  LightX2V-internal kernel choices); accepted with one warning;
- unknown: anything else; accepted with a warning that names them (typos show up here).
Every used key has a type (`typed_value`): yes/no keys take JSON true/false or the strings
"true"/"false" (a non-empty string is not "yes"), numbers must be JSON numbers; anything else is a
ValueError naming the key, raised before any model loads.

Differences from LightX2V, on purpose: `enable_cfg` missing means "CFG if sample_guide_scale != 1"
(LightX2V's config path defaults it to false, its Python API to guidance != 1; every shipped
config sets it); a `denoising_step_list` selects the step-distill schedule whatever the model_cls;
`lora_configs` together with `dit_quantized` runs the LoRA as low-rank branches beside the FP8
linears (LightX2V refuses merging a LoRA into a quantized model); feature caching is allowed with
`wan2.1_distill` too (LightX2V's distill runner refuses it; it rarely pays off at 4 steps); a
`dit_quant_scheme` this machine cannot run (sgl-kernel missing, a CPU) falls back to the best FP8
kernel it has, with a warning, as attention backends named in a config do. `t5_cpu_offload`
(and the CLIP / VAE flags) keep the model in host memory and move it to the GPU for its stage
(LightX2V runs T5 on the CPU instead); `offload_granularity` "phase" runs as "block"
(`wan_core.layers.offload`); `seq_p_attn_type` "ulysses-4090" runs as "ulysses". Under torchrun with no
`parallel` key (or `parallel: false`), every process joins one Ulysses group over the whole world
(LightX2V would run the same video on every process).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FeatureNotAvailable", "GenerationConfig", "PENDING", "IGNORED", "CACHE_KEYS", "KWARG_ALIASES",
    "DEFAULT_NEGATIVE_PROMPT", "parallel_dict",
]  # fmt: skip

# Official Wan2.1 default negative prompt (wan/configs/shared_config.py `sample_neg_prompt`).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)


class FeatureNotAvailable(NotImplementedError):
    """A setting asks for a feature that wan_core does not have yet."""


# key -> (feature, predicate "the value asks for the feature")
PENDING: dict[str, tuple[str, Any]] = {
    "lazy_load": ("disk offload (lazy loading of blocks from disk)", bool),
    "unload_modules": ("disk offload (module unloading)", bool),
    "t5_quantized": ("quantized T5", bool),
    "clip_quantized": ("quantized CLIP", bool),
    "changing_resolution": ("changing resolution", bool),
    "enable_dynamic_cfg": ("dynamic CFG", bool),
    "video_frame_interpolation": ("frame interpolation", bool),
    "use_tae": ("the tiny autoencoder (TAE)", bool),
    "resize_mode": ("image resize modes", bool),
}
# Keys that only qualify a pending feature: accepted silently (they ask for nothing by themselves).
_QUALIFIERS = {
    "offload_ratio", "seq_parallel", "cfg_parallel", "t5_quantized_ckpt", "t5_quant_scheme", "clip_quantized_ckpt", "clip_quant_scheme", "residual_diff_threshold",
    "resolution_rate", "changing_resolution_steps", "cfg_scale", "tae_path", "seq_p_size", "seq_p_attn_type",
    "cfg_p_size",
}  # fmt: skip
# LightX2V caching methods wan_core does not have (Tea and Mag it has).
_LIGHTX2V_CACHE_METHODS = ("TaylorSeer", "Ada", "Custom", "FirstBlock", "DualBlock", "DynamicBlock")
# Feature-caching keys (LightX2V's, plus wan_core.layers.cache's extras): kept as given in `GenerationConfig.cache`
# and read by `wan_core.layers.cache.cache_from_config`.
CACHE_KEYS = {
    "teacache_thresh", "use_ret_steps", "coefficients", "teacache_indicator", "teacache_start_step",
    "teacache_end_step", "teacache_max_skips", "magcache_thresh", "magcache_K", "magcache_retention_ratio",
    "magcache_ratios", "magcache_calibration", "magcache_start_step", "magcache_end_step", "cache_model",
}  # fmt: skip
# Keys that change nothing in wan_core.
IGNORED = {
    "use_prompt_enhancer", "sub_servers", "prompt_enhancer", "do_mm_calib", "use_bfloat16", "use_compile",
    "clean_cuda_cache", "rope_type", "rms_norm_type", "layer_norm_type", "modulate_type", "rotary_chunk",
    "warmup", "return_result_tensor", "model_cls", "task", "model_path", "config_json", "seed", "prompt",
    "negative_prompt", "image_path", "save_result_path", "use_image_encoder", "max_area", "num_channels_latents",
    "vae_stride", "patch_size", "norm_modulate_backend", "double_precision_rope", "enable_reuse", "aspect_ratio",
    "audio_fps", "distilled_sigma_values", "support_tasks", "target_shape",
}  # fmt: skip
# LightX2V `create_generator(...)` keyword names -> config keys.
KWARG_ALIASES = {
    "num_frames": "target_video_length",
    "height": "target_height",
    "width": "target_width",
    "guidance_scale": "sample_guide_scale",
    "text_encoder_cpu_offload": "t5_cpu_offload",  # LightX2V's newer name for the same switch
}


# The type of every field that `from_dict` reads: a wrong type is a ValueError naming the key, before any work.
_BOOL = {"use_tiling_vae", "lora_dynamic_apply", "dit_quantized", "cpu_offload", "allow_large_runs"}
_OPT_BOOL = {"enable_cfg", "t5_cpu_offload", "clip_cpu_offload", "vae_cpu_offload"}
_INT = {
    "infer_steps", "target_video_length", "target_height", "target_width", "text_len", "video_crf", "offload_prefetch",
    "dense_layers", "dense_timesteps",
}  # fmt: skip
_OPT_INT = {"offload_resident_blocks", "boundary_step_index"}
_NUMBER = {"sample_shift", "fps", "decay_factor"}
_OPT_NUMBER = {"vram_budget_gb", "boundary"}
_STR = {"sample_solver", "video_preset", "offload_granularity", "feature_caching"}
_OPT_STR = {
    "self_attn_1_type", "cross_attn_1_type", "cross_attn_2_type", "dit_original_ckpt", "t5_original_ckpt",
    "t5_tokenizer_path", "vae_path", "clip_original_ckpt", "dit_quantized_ckpt", "dit_quant_scheme",
    "high_noise_original_ckpt", "low_noise_original_ckpt", "high_noise_quantized_ckpt", "low_noise_quantized_ckpt",
}  # fmt: skip


def _shown(v) -> str:
    """A value as the user wrote it in JSON (null, true, "512"), cut short."""
    if v is None or isinstance(v, (bool, str)):
        text = json.dumps(v, ensure_ascii=False)
    else:
        text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _yes_no(key: str, v, source: str = "config"):
    """A yes/no key: JSON true/false, or the strings "true"/"false" (any case); anything else is refused.

    A non-empty string is not "true" here: `"enable_cfg": "false"` must not turn CFG on.
    """
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise ValueError(f"{source}: {key} must be true or false, got {_shown(v)}")


def typed_value(key: str, v, source: str = "config"):
    """`v` checked (and normalised: 16.0 -> 16, "false" -> False) as the type of config key `key`."""
    if v is None and key in _OPT_BOOL | _OPT_INT | _OPT_NUMBER | _OPT_STR | {"denoising_step_list", "lora_configs", "parallel"}:
        return None
    if key in _BOOL | _OPT_BOOL:
        return _yes_no(key, v, source)
    if key in _INT | _OPT_INT:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{source}: {key} must be an integer, got {_shown(v)}")
        return v
    if key in _NUMBER | _OPT_NUMBER:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"{source}: {key} must be a number, got {_shown(v)}")
        return int(v) if isinstance(v, float) and v.is_integer() and key == "fps" else v
    if key in _STR | _OPT_STR:
        if not isinstance(v, str):
            raise ValueError(f"{source}: {key} must be a string, got {_shown(v)}")
        return v
    if key == "sample_guide_scale":  # one scale, or [high-noise, low-noise] for Wan2.2 A14B (LightX2V's order)
        if isinstance(v, (list, tuple)):
            if len(v) != 2:
                raise ValueError(f"{source}: sample_guide_scale must be a number or a list of two [high, low], got {_shown(v)}")
            return [typed_value("sample_shift", g, source) for g in v]
        try:
            return typed_value("sample_shift", v, source)
        except ValueError:
            raise ValueError(f"{source}: sample_guide_scale must be a number, got {_shown(v)}") from None
    if key == "denoising_step_list":
        if not isinstance(v, list) or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in v):
            raise ValueError(f"{source}: denoising_step_list must be a list of timesteps like [1000, 750, 500, 250], got {_shown(v)}")
        return [int(t) if isinstance(t, float) and t.is_integer() else t for t in v]
    return v


def parallel_dict(v) -> dict:
    """A `parallel` value as the dict `wan_core.layers.parallel.ParallelConfig.from_dict` reads ({} for false/None).

    LightX2V's consumer-card Ulysses variant ("ulysses-4090": all-to-all without peer-to-peer
    links) runs as plain Ulysses; NCCL picks the transport here.
    """
    if v is None or v is False:
        return {}
    if not isinstance(v, Mapping):
        raise ValueError(f"'parallel' must be false or an object like {{'seq_p_size': 4, 'cfg_p_size': 2}}, got {v!r}")
    out = dict(v)
    kind = str(out.get("seq_p_attn_type", "")).lower().replace("-", "_")
    if kind == "ulysses_4090":
        out["seq_p_attn_type"] = "ulysses"
    return out


@dataclass
class GenerationConfig:
    """What one generation does. Field names are LightX2V's config keys; defaults are its Wan2.1 T2V ones."""

    infer_steps: int = 50
    target_video_length: int = 81
    target_height: int = 480
    target_width: int = 832
    text_len: int = 512
    self_attn_1_type: str | None = None  # None: the pipeline's own choice ('auto')
    cross_attn_1_type: str | None = None  # text cross-attention
    cross_attn_2_type: str | None = None  # image cross-attention (I2V); wan_core uses one backend for both
    # self_attn_1_type "radial_attn" (block-sparse): the reference's options. LightX2V fixes decay 0.2 and
    # keeps every step and layer sparse (these defaults); the reference's 50-step runs: 12 dense steps, 1 dense layer
    decay_factor: float = 0.2
    dense_layers: int = 0  # the first N blocks dense
    dense_timesteps: int = 0  # the first N sampling steps dense
    sample_guide_scale: float | list[float] = 5.0  # Wan2.2 A14B: [high-noise, low-noise], LightX2V's order
    sample_shift: float = 5.0
    enable_cfg: bool | None = None  # None: sample_guide_scale != 1
    denoising_step_list: list[int] | None = None  # step distillation, e.g. [1000, 750, 500, 250]
    # Wan2.2 A14B expert switch: `boundary` (t >= boundary * 1000 -> high-noise expert; wan2.2_moe) or
    # `boundary_step_index` (steps before it -> high-noise expert; wan2.2_moe_distill, ComfyUI's templates)
    boundary: float | None = None
    boundary_step_index: int | None = None
    sample_solver: str = "unipc"  # official Wan key; LightX2V always runs UniPC
    fps: int = 16
    # the mp4 written to save_result_path (wan_core keys; LightX2V writes x264 medium, crf 23)
    video_crf: int = 19
    video_preset: str = "medium"  # x264 speed preset, wan_core.video.X264_PRESETS
    use_tiling_vae: bool = False  # memory-bounded (tiled) VAE decode
    # component files (LightX2V keys); relative paths are taken from the model folder
    dit_original_ckpt: str | None = None
    t5_original_ckpt: str | None = None
    t5_tokenizer_path: str | None = None
    vae_path: str | None = None
    clip_original_ckpt: str | None = None
    # Wan2.2 A14B experts given as files (LightX2V keys; the *_quantized_ckpt ones with dit_quantized)
    high_noise_original_ckpt: str | None = None
    low_noise_original_ckpt: str | None = None
    high_noise_quantized_ckpt: str | None = None
    low_noise_quantized_ckpt: str | None = None
    # LoRA: [{"path": ..., "strength": 1.0}, ...], relative paths taken from the model folder;
    # lora_dynamic_apply (LightX2V: keep the LoRA as a run-time branch) -> low-rank branches everywhere
    lora_configs: list[dict] | None = None
    lora_dynamic_apply: bool = False
    # FP8 DiT: dit_quantized_ckpt (an FP8 file in any layout wan_core reads; absent: the model's own DiT,
    # quantised on load if it is bf16) run with dit_quant_scheme (LightX2V name or wan_core kernel)
    dit_quantized: bool = False
    dit_quantized_ckpt: str | None = None
    dit_quant_scheme: str | None = None
    # feature caching: "NoCaching" | "Tea" | "Mag", its other keys (CACHE_KEYS) as given in `cache`
    feature_caching: str = "NoCaching"
    cache: dict[str, Any] = field(default_factory=dict)
    # CPU offload (`wan_core.layers.offload`): the DiT by "model" or "block" ("phase" runs as block); the
    # component flags default to cpu_offload; vram_budget_gb chooses the resident blocks
    # (exclusive with offload_resident_blocks: blocks kept on the GPU for good, 0 = all stream)
    cpu_offload: bool = False
    offload_granularity: str = "block"
    t5_cpu_offload: bool | None = None
    clip_cpu_offload: bool | None = None
    vae_cpu_offload: bool | None = None
    vram_budget_gb: float | None = None
    offload_resident_blocks: int | None = None
    offload_prefetch: int = 1
    # several GPUs (`wan_core.layers.parallel`, under torchrun): {"cfg_p_size", "seq_p_size", "seq_p_attn_type", ...}
    parallel: dict[str, Any] | bool | None = None
    # ours: run beyond the memory estimate of `wan_core.inputs.check_run_size` (CLI --allow-large)
    allow_large_runs: bool = False
    # keys of features not built yet, as given (see PENDING)
    pending: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived
    @property
    def cfg_enabled(self) -> bool:
        if self.enable_cfg is not None:
            return bool(self.enable_cfg)
        scales = self.sample_guide_scale if isinstance(self.sample_guide_scale, list) else [self.sample_guide_scale]
        return any(g != 1 for g in scales)

    @property
    def guidance(self) -> float:
        """The CFG scale actually applied (1.0 = one DiT evaluation per step); one model's."""
        if isinstance(self.sample_guide_scale, list):
            raise ValueError("sample_guide_scale is a [high, low] list, which only the Wan2.2 A14B models (wan2.2_moe) use")
        return float(self.sample_guide_scale) if self.cfg_enabled else 1.0

    @property
    def guidances(self) -> tuple[float, float]:
        """(high-noise, low-noise) CFG scales of a Wan2.2 A14B run; one number applies to both."""
        g = self.sample_guide_scale
        high, low = (g if isinstance(g, list) else [g, g])
        return (float(high), float(low)) if self.cfg_enabled else (1.0, 1.0)

    @property
    def max_area(self) -> int:
        """Pixel area an I2V video is fitted to (480P: 480 * 832, 720P: 720 * 1280)."""
        return int(self.target_height) * int(self.target_width)

    def scheduler(self):
        from .sampling.schedulers import scheduler_from_config

        return scheduler_from_config(dataclasses.asdict(self))

    def cache_config(self) -> dict[str, Any]:
        """The keys `wan_core.layers.cache.cache_from_config` reads (method, run length, Tea/Mag settings)."""
        return {"feature_caching": self.feature_caching, "infer_steps": len(self.scheduler()), **self.cache}

    def offload_options(self):
        """The offload settings (`wan_core.layers.offload.OffloadOptions`, which checks them) these keys ask for."""
        from .layers.offload import OffloadOptions

        keys = ("cpu_offload", "offload_granularity", "t5_cpu_offload", "clip_cpu_offload", "vae_cpu_offload",
                "vram_budget_gb", "offload_resident_blocks", "offload_prefetch")  # fmt: skip
        return OffloadOptions.from_config({k: getattr(self, k) for k in keys if getattr(self, k) is not None})

    def parallel_config(self, world_size: int | None = None):
        """The degrees (`wan_core.layers.parallel.ParallelConfig`) `parallel` asks for in a world of `world_size`."""
        from .layers.parallel.group import ParallelConfig

        return ParallelConfig.from_dict(parallel_dict(self.parallel), world_size=world_size)

    def uses_radial(self) -> bool:
        """Whether self_attn_1_type names the radial (block-sparse) backend."""
        from .kernels.attention import ALIASES

        name = (self.self_attn_1_type or "").lower()
        return ALIASES.get(name, name) == "radial_attn"

    def radial_options(self):
        """decay_factor / dense_layers / dense_timesteps as a (checked) `kernels.radial_attention.RadialOptions`."""
        from .kernels.radial_attention import RadialOptions

        return RadialOptions(self.decay_factor, self.dense_layers, self.dense_timesteps)

    def lora_list(self) -> list[tuple[str, float]]:
        """`lora_configs` as [(path as written, strength)]; ValueError for a malformed entry."""
        out = []
        for i, item in enumerate(self.lora_configs or []):
            if not isinstance(item, Mapping) or not isinstance(item.get("path"), str) or not item["path"]:
                raise ValueError(f"lora_configs[{i}] must be an object like {{'path': 'x.safetensors', 'strength': 1.0}}, got {item!r}")
            strength = item.get("strength", 1.0)
            if isinstance(strength, bool) or not isinstance(strength, (int, float)):
                raise ValueError(f"lora_configs[{i}].strength must be a number, got {strength!r}")
            out.append((item["path"], float(strength)))
        return out

    # ------------------------------------------------------------------ checks
    def check(self, task: str = "t2v") -> None:
        """ValueError for an impossible run, FeatureNotAvailable for a feature that is not built yet."""
        for f in dataclasses.fields(self):  # a config made from keywords has not been through from_dict
            if f.name not in ("pending", "cache"):
                setattr(self, f.name, typed_value(f.name, getattr(self, f.name)))
        for key, value in self.pending.items():
            feature, asks = PENDING[key]
            if asks(value):
                raise FeatureNotAvailable(
                    f"config key {key!r} = {value!r} asks for {feature}, which is not available yet in wan_core; "
                    f"remove the key (or set it to its default) to run without it"
                )
        n = self.target_video_length
        if not isinstance(n, int) or n < 1 or (n - 1) % 4:
            raise ValueError(f"target_video_length must be 4n+1 (1, 5, ..., 81), got {n!r}")
        h, w = self.target_height, self.target_width
        if not all(isinstance(v, int) and v > 0 for v in (h, w)):
            raise ValueError(f"target_height / target_width must be positive integers, got {h!r} x {w!r}")
        if task == "t2v" and (h % 16 or w % 16):
            raise ValueError(
                f"target_height and target_width must be multiples of 16 for t2v, got {h}x{w} "
                f"(e.g. {h // 16 * 16}x{w // 16 * 16}); i2v fits the image to the area instead"
            )
        if self.text_len < 1:
            raise ValueError(f"text_len must be positive, got {self.text_len}")
        if not self.fps > 0:
            raise ValueError(f"fps must be a positive number of frames per second, got {self.fps!r}")
        if self.cfg_enabled and min(self.guidances) < 0:
            warnings.warn(
                f"sample_guide_scale={self.sample_guide_scale} is negative: guidance pushes the video away from "
                "the prompt (towards the negative prompt); Wan uses 5.0", stacklevel=2,
            )  # fmt: skip
        from .video import check_encoding

        check_encoding(self.video_crf, self.video_preset)
        if self.lora_configs is not None and not isinstance(self.lora_configs, list):
            raise ValueError(f"lora_configs must be a list of {{'path', 'strength'}} objects, got {self.lora_configs!r}")
        self.lora_list()
        if self.dit_quantized:
            _check_scheme(self.dit_quant_scheme or "fp8")
        from .layers.cache import CACHE_METHODS

        method = self.feature_caching or "NoCaching"
        if method in _LIGHTX2V_CACHE_METHODS:
            raise FeatureNotAvailable(
                f"feature_caching {method!r} (a LightX2V caching method) is not available yet in wan_core; "
                f"available: {', '.join(CACHE_METHODS)}"
            )
        if method not in CACHE_METHODS:
            raise ValueError(f"feature_caching {method!r} is not a caching method; choose one of {CACHE_METHODS}")
        self.scheduler()  # scheduler keys (steps, shift, denoising_step_list) raise their own ValueErrors
        self.offload_options()  # checked by OffloadOptions itself
        pc = self.parallel_config()  # key names and types (the world size is checked when the run joins it)
        self.radial_options()  # ranges, checked by RadialOptions
        if self.uses_radial() and pc.ring > 1:
            raise ValueError(
                "self_attn_1_type 'radial_attn' needs every video token in one attention call, but 'parallel' asks "
                f"for ring attention (ring degree {pc.ring}), which splits the sequence: use seq_p_attn_type 'ulysses'"
            )

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], source: str = "config") -> GenerationConfig:
        """Parse LightX2V config keys (plus `create_generator` keyword aliases); warns on unknown keys."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"pending", "cache"}
        kw: dict[str, Any] = {}
        pending: dict[str, Any] = {}
        cache: dict[str, Any] = {}
        unknown, ignored = [], []
        for key, value in cfg.items():
            key = KWARG_ALIASES.get(key, key)
            if key == "attn_mode":  # LightX2V create_generator: one backend for all three
                for k in ("self_attn_1_type", "cross_attn_1_type", "cross_attn_2_type"):
                    kw[k] = value
            elif key in fields:
                kw[key] = value
            elif key in CACHE_KEYS:
                cache[key] = value
            elif key in PENDING:
                pending[key] = value
            elif key in _QUALIFIERS:
                pass
            elif key in IGNORED:
                ignored.append(key)
            else:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{source}: unknown keys ignored: {', '.join(sorted(unknown))}", stacklevel=2)
        notable = sorted(set(ignored) - {"model_cls", "task", "model_path", "config_json", "seed", "prompt",
                                         "negative_prompt", "image_path", "save_result_path"})  # fmt: skip
        if notable:
            warnings.warn(f"{source}: keys accepted but without effect in wan_core: {', '.join(notable)}", stacklevel=2)
        if "feature_caching" in kw and kw["feature_caching"] is None:
            kw.pop("feature_caching")
        kw = {k: typed_value(k, v, source) for k, v in kw.items()}
        pending = {k: _yes_no(k, v, source) if PENDING[k][1] is bool and isinstance(v, str) else v
                   for k, v in pending.items()}  # fmt: skip
        return cls(**kw, cache=cache, pending=pending)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> GenerationConfig:
        return cls.from_dict(read_json(path), source=os.fspath(path))

    def updated(self, params: Mapping[str, Any], source: str = "parameters") -> GenerationConfig:
        """A copy with `params` (config keys or create_generator keywords) laid over these settings."""
        merged = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("pending", "cache")}
        merged.update(self.pending)
        merged.update(self.cache)
        # drop unset path keys so that they do not count as given
        merged = {k: v for k, v in merged.items() if v is not None or k in params}
        out = GenerationConfig.from_dict({**merged, **params}, source=source)
        return out


def _check_scheme(name) -> None:
    """A `dit_quant_scheme` wan_core can run (FP8 per-channel); ValueError naming the supported ones."""
    from .layers.fp8 import resolve_kernel

    if not isinstance(name, str):
        raise ValueError(f"dit_quant_scheme must be a string such as 'fp8-sgl', got {name!r}")
    try:
        resolve_kernel(name, "meta")  # names only: whether this device can run it is checked at load
    except (ImportError, RuntimeError):
        pass  # a known kernel this machine cannot run: the pipeline falls back with a warning


def read_json(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config JSON not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config JSON must hold an object of keys, got {type(data).__name__}")
    return data
