"""The Python door: `WanPipeline`, shaped like LightX2V's `LightX2VPipeline`.

    pipe = WanPipeline(model_path="Wan2.1-T2V-14B", model_cls="wan2.1", task="t2v")
    pipe.create_generator(config_json="configs/wan_t2v.json")      # or keywords: infer_steps=4, ...
    result = pipe.generate(seed=42, prompt="...", save_result_path="out.mp4")
    result.frames      # [T, H, W, 3] float in [0, 1]; result.timings, result.peak_memory

`create_generator` reads the settings (LightX2V config keys, see `wan_core.options`), finds the
component files (`wan_core.loading.discover`), and builds the models through `wan_core.model_cache`,
so a second pipeline over the same files shares them (each run leases the DiT at its own LoRAs). `generate` runs the stages, each also public
for the ComfyUI nodes: `encode_text` -> (`encode_image`) -> `sample` -> `decode`.

The seed's four variants, as LightX2V configures them (keys in a config JSON or keywords):

    base:             nothing extra (UniPC, 50 steps, CFG)
    distill LoRA:     lora_configs=[{"path": "wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors", "strength": 1.0}]
    merged distill:   dit_original_ckpt="wan2.1_t2v_14b_lightx2v_4step.safetensors"
    distill + FP8:    dit_quantized=True, dit_quantized_ckpt="..._scaled_fp8_e4m3_lightx2v_4step.safetensors",
                      dit_quant_scheme="fp8-sgl"
    (model_cls "wan2.1_distill" gives the distill variants their 4-step schedule [1000, 750, 500, 250])

Relative paths are taken as given when they exist, else from the model folder (also by file name,
and from its `loras/` / `diffusion_models/` subfolders). LightX2V's `enable_lora`, `enable_quantize`,
`enable_cache`, `enable_offload` and `enable_parallel` (before `create_generator`) and `switch_lora`
(after) work too; feature caching (`feature_caching` "Tea" / "Mag") is attached around each
sampling run and reported in the result.

Memory (16-24 GB cards): `cpu_offload=True, offload_granularity="block"` keeps the DiT in host
memory and streams its blocks through the GPU (`vram_budget_gb=14` lets it keep as many blocks
resident as fit); T5 / CLIP / VAE follow `cpu_offload` unless their own flags say otherwise
(`t5_cpu_offload`, ...). A CUDA out-of-memory error in the sampling loop is re-raised with the
offload settings that would fit (`wan_core.layers.offload.explain_oom`).

Several GPUs: run the script (or `python -m wan_core`) under `torchrun --nproc_per_node=N`, with
`parallel={"seq_p_size": N, "seq_p_attn_type": "ulysses"}` (or `cfg_p_size=2` x ...); without a
`parallel` key every process joins one Ulysses group. Each process builds the models on its own
GPU; all hold the same latent after every step, every process decodes, the first one writes the
file. `pipe.close()` leaves the process group the pipeline joined.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .inputs import check_attention, check_device, check_prompt, check_run_size, check_save_path, check_seed
from .kernels.attention import resolve_name
from .loading.discover import find_model_files
from .model_cache import build_image_encoder, build_text_encoder, build_vae, component_loaded, lease
from .models.conditioning import I2VCondition, TI2VCondition, load_image, prepare_i2v, prepare_ti2v
from .options import DEFAULT_NEGATIVE_PROMPT, GenerationConfig, parallel_dict, read_json
from .pipeline_calls import LightX2VCalls
from .pipeline_setup import arch_config, attention_choice, fp8_choice, residual_choice, sync
from .progress import progress_bar, timed_build
from .sampling.denoise import NO_EXPERT_CACHE, denoise
from .sampling.experts import Experts
from .sampling.first_frame import FirstFrame
from .sampling.loop import Cond, StepInfo, latent_geometry, latent_shape, make_noise
from .sampling.schedulers import DISTILL_STEPS
from .spec import ModelSpec
from .vae_frames import decode_frames
from .wan22 import MOE_CLASSES, WAN22_CLASSES, expert_loras, expert_switch, model_defaults

__all__ = ["WanPipeline", "GenerationResult", "MODEL_CLASSES"]

log = logging.getLogger("wan_core.pipeline")

MODEL_CLASSES = ("wan2.1", "wan2.1_distill", *WAN22_CLASSES)
VAE_TILE = 32  # latent pixels per tile when `use_tiling_vae` is on (256 video pixels)


@dataclass
class GenerationResult:
    """What `generate` returns."""

    frames: torch.Tensor  # [T, H, W, 3] float32 in [0, 1], on the CPU
    seed: int
    latent: torch.Tensor | None = None  # [1, 16 (TI2V-5B: 48), F_lat, h, w] float32, when asked for
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    step_times: list[float] = field(default_factory=list)  # seconds per denoising step
    peak_memory: int | None = None  # bytes of GPU memory at peak (None on the CPU)
    path: str | None = None  # the video file written, if any
    cache: dict | None = None  # feature caching report (`CacheReport.to_dict()`), when caching was on

    def summary(self) -> str:
        t, h, w, _ = self.frames.shape
        parts = [f"{t} frames {w}x{h}, seed {self.seed}"]
        parts += [f"{k.replace('_', ' ')} {v:.2f} s" for k, v in self.timings.items()]
        if self.cache is not None:
            parts.append(f"{self.cache['skipped']} of {self.cache['evaluations']} DiT evaluations skipped by the cache")
        if self.peak_memory is not None:
            parts.append(f"peak GPU memory {self.peak_memory / 2**30:.2f} GiB")
        return "; ".join(parts)


class WanPipeline(LightX2VCalls):
    """Wan2.1 / Wan2.2 T2V / I2V generation from a model folder or individual files.

    model_path: a Wan-AI, ComfyUI `models` or diffusers folder (see `wan_core.loading.discover`); any of
    dit_path / t5_path / tokenizer_path / vae_path / clip_path gives (or overrides) one file.
    model_cls: 'wan2.1' or 'wan2.1_distill' (the latter defaults to the 4-step distill schedule); Wan2.2
    'wan2.2_moe' / 'wan2.2_moe_distill' (A14B, two experts: high_noise_path / low_noise_path) or
    'wan2.2' (TI2V-5B), with their official defaults (`wan_core.wan22`).
    dtype / device / attention: 'auto' = bf16 on GPU (fp32 on CPU), CUDA if present, the best
    SDPA backend. `attention` given here is strict; backends named in a config JSON fall back
    to it with a warning when their package is missing.
    """

    def __init__(
        self,
        model_path: str | None = None,
        model_cls: str = "wan2.1",
        task: str = "t2v",
        *,
        dit_path: str | None = None,
        t5_path: str | None = None,
        tokenizer_path: str | None = None,
        vae_path: str | None = None,
        clip_path: str | None = None,
        dtype: str | torch.dtype = "auto",
        vae_dtype: str | torch.dtype | None = None,
        device: str = "auto",
        attention: str = "auto",
        high_noise_path: str | None = None,
        low_noise_path: str | None = None,
    ):
        if model_cls not in MODEL_CLASSES:
            raise ValueError(f"model_cls {model_cls!r} is not supported; wan_core runs {', '.join(MODEL_CLASSES)}")
        if task not in ("t2v", "i2v"):
            raise ValueError(f"task must be 't2v' or 'i2v', got {task!r}")
        self.moe = model_cls in MOE_CLASSES  # Wan2.2 A14B: two experts
        if self.moe and dit_path is not None:
            raise ValueError(f"{model_cls} has two experts: give high_noise_path= and low_noise_path=, not dit_path=")
        if not self.moe and (high_noise_path or low_noise_path):
            raise ValueError(f"high_noise_path / low_noise_path are for the two-expert Wan2.2 A14B models, not {model_cls}")
        if model_path is None and dit_path is None and not (high_noise_path and low_noise_path):
            raise ValueError("give model_path (a model folder) or the component files (dit_path, t5_path, vae_path, ...)")
        check_device(device)
        self.model_path, self.model_cls, self.task = model_path, model_cls, task
        self.paths = dict(dit=dit_path, t5=t5_path, tokenizer=tokenizer_path, vae=vae_path, clip=clip_path,
                          high=high_noise_path, low=low_noise_path)  # fmt: skip
        self.spec_low: ModelSpec | None = None  # the low-noise expert of a two-expert run
        self.dtype, self.vae_dtype, self.device, self.attention = dtype, vae_dtype, device, attention
        self.config: GenerationConfig | None = None
        self.spec: ModelSpec | None = None
        self.cache_report = None  # CacheReport of the last sampling run (feature caching on)
        self._enabled: dict = {}  # keys set by enable_lora / enable_quantize / enable_cache / ...
        self.parallel_run = None  # wan_core.layers.parallel.DistributedRun of a multi-process run
        self._owns_group = False  # this pipeline initialised the process group (close() leaves it)

    # ------------------------------------------------------------------ setup
    def _candidates(self, value: str, subfolders: tuple[str, ...] = ()) -> list[str]:
        out = [value]
        if self.model_path and not os.path.isabs(value):
            name = os.path.basename(value)
            out += [os.path.join(self.model_path, value), os.path.join(self.model_path, name)]
            out += [os.path.join(self.model_path, sub, name) for sub in subfolders]
        return out

    def _config_path(self, value: str | None, subfolders: tuple[str, ...] = ("diffusion_models",)) -> str | None:
        """A component path from a config: as given if it exists, else relative to model_path."""
        if value is None:
            return None
        return next((c for c in self._candidates(value, subfolders) if os.path.exists(c)), value)  # else reported missing

    def _find_file(self, value: str, subfolders: tuple[str, ...], key: str) -> str:
        """Like `_config_path`, for a file that must exist (a LoRA): FileNotFoundError naming the places looked."""
        cands = self._candidates(value, subfolders)
        found = next((c for c in cands if os.path.isfile(c)), None)
        if found is None:
            raise FileNotFoundError(f"{key}: file not found: {value!r} (looked for {', '.join(cands)})")
        return os.path.abspath(found)

    def create_generator(self, config_json: str | None = None, **params) -> WanPipeline:
        """Read the settings (a LightX2V config JSON, then keyword overrides) and build the models."""
        defaults = model_defaults(self.model_cls, self.task)  # Wan2.2's official settings; given keys win
        given = read_json(config_json) if config_json else {}
        user = {**given, **self._enabled, **params}
        if user.get("boundary") is not None and "boundary_step_index" not in user:
            defaults.pop("boundary_step_index", None)  # a boundary given replaces the default step split
        cfg = GenerationConfig.from_dict({**defaults, **given}, source=config_json or "model defaults")
        if self.model_cls == "wan2.1_distill" and cfg.denoising_step_list is None and "denoising_step_list" not in params:
            cfg.denoising_step_list = list(DISTILL_STEPS)
        if self._enabled or params:
            cfg = cfg.updated({**self._enabled, **params}, source="create_generator")
        cfg.check(self.task)
        if not self.moe and isinstance(cfg.sample_guide_scale, list):
            raise ValueError(
                f"sample_guide_scale {cfg.sample_guide_scale} is a [high, low] pair, which only the two-expert Wan2.2 "
                f"A14B models (wan2.2_moe, wan2.2_moe_distill) take; {self.model_cls} takes one number"
            )
        files, dit_low, loras, loras_low = self._find_files(cfg)
        # a DiT given as one file (dit_original_ckpt, dit_quantized_ckpt): the architecture is model_path's, as in LightX2V
        arch = arch_config(self.model_path, files.dit, "high" if self.moe else None)
        self._join_world(cfg)  # under torchrun: this rank's device, before anything is built
        device = str(self.parallel_run.device) if self.parallel_run is not None else str(self.device)
        wan21_i2v = self.task == "i2v" and self.model_cls.startswith("wan2.1")
        spec = ModelSpec(
            dit=files.dit, t5=files.t5, tokenizer=files.tokenizer, vae=files.vae,
            clip=files.clip if wan21_i2v else None, task="ti2v" if self.model_cls == "wan2.2" else self.task,
            dtype=self.dtype, vae_dtype=self.vae_dtype, device=device, text_len=cfg.text_len, loras=loras,
            lora_mode="branch" if cfg.lora_dynamic_apply else "auto", offload=cfg.offload_options(), dit_config=arch,
            expert="high" if self.moe else None, residual_dtype=residual_choice(),
        )  # fmt: skip
        dev = spec.torch_device
        if self.model_cls == "wan2.2" and (cfg.target_height % 32 or cfg.target_width % 32):
            raise ValueError(f"TI2V-5B sizes are multiples of 32 (VAE 16 x patch 2), got {cfg.target_height}x{cfg.target_width}")
        check_run_size(cfg.target_video_length, cfg.target_height, cfg.target_width, dev, cfg.allow_large_runs)
        check_attention(self.attention, dev)
        if cfg.dit_quantized:
            spec = spec.replace(fp8=fp8_choice(cfg.dit_quant_scheme, dev))
        self_attn = attention_choice(cfg.self_attn_1_type, self.attention, dev, "self_attn_1_type")
        # no cross_attn_1_type: the model's rule (the self-attention backend, or exact SDPA when that is 8-bit)
        cross_attn = attention_choice(cfg.cross_attn_1_type, None, dev, "cross_attn_1_type")
        if cfg.cross_attn_2_type not in (None, cfg.cross_attn_1_type):
            warnings.warn("cross_attn_2_type differs from cross_attn_1_type: wan_core runs one cross-attention backend (cross_attn_1_type)", stacklevel=2)
        self.spec = spec.replace(attention=self_attn, cross_attention=cross_attn)
        if self_attn is not None and resolve_name(self_attn, dev) == "radial_attn":
            self.spec = self.spec.replace(radial=cfg.radial_options())  # decay_factor, dense_layers, dense_timesteps
        low_arch = arch_config(self.model_path, dit_low, "low") if self.moe else None
        self.spec_low = self.spec.replace(dit=dit_low, loras=loras_low, expert="low", dit_config=low_arch) if self.moe else None
        if self.moe:
            expert_switch(cfg, self.task)  # both boundary keys given: an error now
            if (cfg.feature_caching or "NoCaching") != "NoCaching":
                raise ValueError(NO_EXPERT_CACHE)
        self.config = cfg
        self.load()
        from .layers.lora import lora_report

        for s in (self.spec, self.spec_low):
            if s is not None and s.loras:
                with lease(s) as dit:
                    log.info("LoRA%s: %s", f" ({s.expert}-noise expert)" if s.expert else "", lora_report(dit))
        self._make_cache(cfg.target_height, cfg.target_width)  # a cache setting that cannot work fails now
        return self

    def _find_files(self, cfg: GenerationConfig):
        """(ModelFiles, low-noise expert path or None, LoRAs, low-noise expert's LoRAs) of the run: the
        paths given to the pipeline, then the config's file keys, then the model folder's own files."""
        find = self._find_file
        q = cfg.dit_quantized
        low = None
        if self.moe:
            dit = self.paths["high"] or self._config_path(cfg.high_noise_quantized_ckpt if q else cfg.high_noise_original_ckpt)
            low = self.paths["low"] or self._config_path(cfg.low_noise_quantized_ckpt if q else cfg.low_noise_original_ckpt)
            split = expert_loras(cfg.lora_configs)
            loras, loras_low = (
                tuple((find(p, ("loras",), f"{e}-noise LoRA path"), st) for p, st in split[e]) for e in ("high", "low")
            )
        else:
            if q:
                dit = self.paths["dit"] or self._config_path(cfg.dit_quantized_ckpt)  # None: the folder's DiT, quantised
            else:
                if cfg.dit_quantized_ckpt:
                    warnings.warn("dit_quantized_ckpt is set but dit_quantized is false: the FP8 file is not used", stacklevel=3)
                dit = self.paths["dit"] or self._config_path(cfg.dit_original_ckpt)
            loras = tuple((find(p, ("loras",), f"lora_configs[{i}].path"), st) for i, (p, st) in enumerate(cfg.lora_list()))
            loras_low = ()
        wan22 = self.model_cls in WAN22_CLASSES
        files = find_model_files(
            self.model_path,
            "ti2v" if self.model_cls == "wan2.2" else self.task,
            dit=None if self.moe else dit,
            t5=self.paths["t5"] or self._config_path(cfg.t5_original_ckpt),
            tokenizer=self.paths["tokenizer"] or self._config_path(cfg.t5_tokenizer_path),
            vae=self.paths["vae"] or self._config_path(cfg.vae_path),
            clip=None if wan22 else self.paths["clip"] or self._config_path(cfg.clip_original_ckpt),
            family="wan2.2" if wan22 else "wan2.1",
            **(dict(high=dit, low=low) if self.moe else {}),
        )
        if self.moe:
            files = dataclasses.replace(files, dit=files.dit_high)
        return files, files.dit_low, loras, loras_low

    # ------------------------------------------------------------------ several processes
    def _join_world(self, cfg: GenerationConfig) -> None:
        """Join the torch.distributed world when this run is one (torchrun, or `parallel` degrees in a
        process group already made); a `parallel` key outside any such world is a clear error."""
        import torch.distributed as dist

        from .layers.parallel.launch import is_torchrun

        if self.parallel_run is not None:
            return
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
        elif is_torchrun():
            world = int(os.environ.get("WORLD_SIZE", "1"))
        else:
            world = 1
        asked = cfg.parallel_config().world_size  # processes the degrees ask for (1: none)
        if world == 1 and asked == 1:
            return
        if world == 1 and not (dist.is_available() and dist.is_initialized()) and not is_torchrun():
            raise ValueError(
                f"config key 'parallel' = {cfg.parallel!r} asks for {asked} processes, but this process is not part "
                f"of a multi-process run: launch it with `torchrun --nproc_per_node={asked} -m wan_core ...` (a "
                "Python script: `torchrun --nproc_per_node=N script.py`), or in ComfyUI use the Wan Multi-GPU "
                "Sampler node; remove the key to run on one GPU"
            )
        from .layers.parallel import DistributedRun, ParallelConfig, build_groups, init_process_group

        pc = ParallelConfig.from_dict(parallel_dict(cfg.parallel), world_size=world)
        pc.validate(world_size=world)  # on every rank before any communicator: a sentence, not a hang
        owns = not dist.is_initialized()
        dev = init_process_group(None if str(self.device) == "auto" else self.device)
        self.parallel_run = DistributedRun(build_groups(pc), dev)
        self._owns_group = owns
        rank = self.parallel_run.rank
        log.info("rank %d of %d on %s: cfg %d x ulysses %d x ring %d", rank, world, dev, pc.cfg, pc.ulysses, pc.ring)

    def _parallelize(self, dit) -> None:
        """Sequence parallel on the leased DiT for this run's groups; off for a one-process run (the
        cached DiT may carry another pipeline's)."""
        from .layers.parallel.apply import SequenceParallelLayer
        from .layers.stack import apply_layers

        if self.parallel_run is None:
            SequenceParallelLayer.remove(dit)
            return
        layer = SequenceParallelLayer(self.parallel_run.groups)
        if layer.needed(dit):
            apply_layers(dit, [layer])
            pc = self.parallel_run.groups.config
            if pc.sp > 1:
                log.info("sequence parallel on the DiT: ulysses %d x ring %d", pc.ulysses, pc.ring)

    def close(self) -> None:
        """Leave the process group this pipeline joined (after a barrier: nobody tears the
        communicators down while another rank still writes). A no-op for a one-process run."""
        run, self.parallel_run = self.parallel_run, None
        if run is None:
            return
        if self._owns_group:
            run.barrier()
            run.close()
        self._owns_group = False
        dits = [d for d in (getattr(self, "dit", None), getattr(self, "dit_low", None)) if d is not None]
        if dits:
            from .layers.parallel.apply import SequenceParallelLayer
            from .model_cache import held

            with held():  # the DiT(s) of our last lease (not re-leased: that could build one)
                for d in dits:
                    SequenceParallelLayer.remove(d)

    def _make_cache(self, height: int, width: int):
        """A fresh `FeatureCache` for one run (None without feature caching); published tables chosen
        for this DiT and video size unless the config gives its own (`wan_core.layers.cache.config`)."""
        if (self.config.feature_caching or "NoCaching") == "NoCaching":
            return None
        from .layers.cache import cache_from_config, published_model_key

        return cache_from_config(self.config.cache_config(), published_model_key(self.dit.cfg, height, width))

    def load(self) -> None:
        """Build (or fetch from the cache) every model of the spec. `self.dit` is the DiT as leased
        for this pipeline at that moment: shared, so runs lease it again (`sample`)."""
        spec = self._need_spec()
        def leased(s: ModelSpec):
            with lease(s) as dit:
                return dit

        self.dit = timed_build("high-noise expert" if self.moe else "DiT", leased, spec)
        self.dit_low = timed_build("low-noise expert", leased, self.spec_low) if self.spec_low is not None else None
        self.text_encoder = timed_build("T5 text encoder", build_text_encoder, spec)
        self.vae = timed_build("VAE", build_vae, spec)
        self.image_encoder = timed_build("CLIP image encoder", build_image_encoder, spec) if spec.clip else None

    def _need_spec(self) -> ModelSpec:
        if self.spec is None or self.config is None:
            raise RuntimeError("call create_generator(...) first")
        return self.spec

    @property
    def torch_device(self) -> str:
        return self._need_spec().torch_device

    # ------------------------------------------------------------------ stages
    def encode_text(self, prompt: str, negative_prompt: str | None = None) -> tuple[Cond, Cond | None]:
        """T5 contexts for the prompt and, when CFG is on, the negative prompt ('' / None: Wan's default)."""
        cfg = self.config
        dev = self.torch_device
        with component_loaded(self.text_encoder, self._need_spec(), "t5") as te:
            ctx = [c.to(dev) for c in te.encode([prompt])]
            if not cfg.cfg_enabled:
                return Cond(ctx), None
            neg = [c.to(dev) for c in te.encode([negative_prompt or DEFAULT_NEGATIVE_PROMPT])]
        return Cond(ctx), Cond(neg)

    def encode_image(self, image) -> I2VCondition | TI2VCondition:
        """Image conditioning for an image (path, PIL, array or tensor): Wan2.1 I2V's CLIP tokens, mask
        and first-frame latent (Wan2.2 I2V-A14B: the same without CLIP); TI2V-5B: the image's latent."""
        if self.task != "i2v":
            raise ValueError(f"encode_image needs an i2v pipeline (this one is {self.task})")
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        spec = self._need_spec()
        with torch.no_grad(), component_loaded(self.vae, spec, "vae"):
            if self.model_cls == "wan2.2":
                return prepare_ti2v(image, self.vae, self.config.max_area)
            with component_loaded(self.image_encoder, spec, "clip"):
                return prepare_i2v(image, self.vae, self.image_encoder, self.config.target_video_length, self.config.max_area)

    def latent_shape(self, image_cond: I2VCondition | TI2VCondition | None = None) -> tuple[int, ...]:
        """[1, C, F_lat, h, w] of the run (C 16; TI2V-5B 48 at 16x; I2V: the size the image fixed)."""
        cfg = self.config
        z, stride = latent_geometry(self._need_spec().task)
        size = (image_cond.height, image_cond.width) if image_cond is not None else (cfg.target_height, cfg.target_width)
        return (1, *latent_shape(cfg.target_video_length, *size, z_dim=z, stride=stride))

    def sample(
        self,
        noise: torch.Tensor,
        cond: Cond,
        uncond: Cond | None,
        image_cond: I2VCondition | TI2VCondition | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        predict: Callable | None = None,
    ) -> torch.Tensor:
        """Denoise `noise` [1, C, F, h, w] to the final latent with the configured schedule and guidance.

        predict: the guidance step `predict(model, x, t, cond, uncond, guidance)` of
        `wan_core.sampling.loop.sample`, used as given. None: the pipeline's own, i.e.
        `sampling.guided_velocity` (`cache.guided_velocity_branches` with feature caching on),
        wrapped for CFG parallel in a multi-process run. An offloaded DiT is on the GPU for this
        call only; a CUDA out-of-memory error here is re-raised with offload settings that fit.
        """
        cfg = self.config
        dev = self.torch_device
        first_frame = None
        if isinstance(image_cond, TI2VCondition):
            first_frame = FirstFrame(image_cond.z.to(dev))
        elif image_cond is not None:
            clip_fea = image_cond.clip_fea.to(dev) if image_cond.clip_fea is not None else None
            extra = dict(clip_fea=clip_fea, y=image_cond.y.to(dev))
            cond = Cond(cond.context, **extra)
            uncond = Cond(uncond.context, **extra) if uncond is not None else None
        with contextlib.ExitStack() as held:  # the shared DiT(s) brought to our LoRAs, held for the run
            dit = held.enter_context(lease(self._need_spec()))
            self.dit, model, guidance = dit, dit, (cfg.guidances[0] if self.moe else cfg.guidance)
            self._parallelize(dit)
            if self.spec_low is not None:
                self.dit_low = held.enter_context(lease(self.spec_low))
                self._parallelize(self.dit_low)
                model = Experts(dit, self.dit_low, expert_switch(cfg, self.task), *cfg.guidances)
            cache = self._make_cache(noise.shape[-2] * 8, noise.shape[-1] * 8)
            wrap = self.parallel_run.predict_with if self.parallel_run is not None else None
            latent, self.cache_report = denoise(
                model, noise.to(dev), cfg.scheduler(), cond, uncond, guidance, cache, callback, predict, wrap,
                first_frame=first_frame,
            )  # fmt: skip
        if self.cache_report is not None:
            log.info("%s", self.cache_report.summary())
        return latent

    def decode(self, latent: torch.Tensor, on_frames: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Final latent -> frames [T, H, W, 3] float32 in [0, 1] on the CPU (`vae_frames.decode_frames`;
        tiled when `use_tiling_vae`). on_frames: handed each decoded chunk, uint8 [t, H, W, 3] on the CPU."""
        tile = VAE_TILE if self.config.use_tiling_vae else None
        with component_loaded(self.vae, self._need_spec(), "vae"):
            return decode_frames(self.vae, latent, tile, on_frames)

    # ------------------------------------------------------------------ the whole run
    def generate(
        self,
        seed: int | None = 42,
        prompt: str = "",
        negative_prompt: str = "",
        image_path: str | None = None,
        save_result_path: str | None = None,
        return_latent: bool = False,
        callback: Callable[[StepInfo], None] | None = None,
        *,
        image=None,
        progress: bool = False,
    ) -> GenerationResult:
        """One video. `negative_prompt` '' means Wan's default negative prompt (used only with CFG);
        seed None or < 0 draws one (reported in the result); `image` may replace `image_path`
        (PIL image, uint8 array or [3, H, W] tensor in [-1, 1]); `progress` shows a tqdm bar.
        In a multi-process run every process returns the frames; only the first writes the file."""
        spec, cfg = self._need_spec(), self.config
        dev = spec.torch_device
        # every input checked before any model runs (wan_core.inputs)
        seed = check_seed(seed)
        prompt, negative_prompt = check_prompt(prompt), check_prompt(negative_prompt, "negative_prompt")
        if self.parallel_run is None or self.parallel_run.is_main:
            save_result_path = check_save_path(save_result_path)
        if self.task == "i2v" and image is None and not image_path:
            raise ValueError("the i2v task needs an input image: pass image_path=... (or image=...)")
        if self.task == "t2v" and (image is not None or image_path):
            warnings.warn("t2v ignores the input image", stacklevel=2)
        if self.task == "i2v" and image is None:
            image = load_image(image_path)  # a missing file fails here, before any model runs
        if seed is None:
            seed = secrets.randbelow(2**63)
            if self.parallel_run is not None:  # every rank must draw the same noise: take rank 0's seed
                import torch.distributed as dist

                box = [seed]
                dist.broadcast_object_list(box, src=0)
                seed = box[0]
        if torch.device(dev).type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        timings: dict[str, float] = {}

        @contextlib.contextmanager
        def stage(name: str):
            sync(dev)
            t0 = time.perf_counter()
            yield
            sync(dev)
            timings[name] = time.perf_counter() - t0
            log.info("%s: %.2f s", name.replace("_", " "), timings[name])

        # Without an image the noise's shape is known now: it is drawn on the CPU by a worker thread
        # while the encoders run on the device, off the run's path
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            drawn = pool.submit(make_noise, self.latent_shape(), seed) if image is None else None
            with stage("text_encode"):
                cond, uncond = self.encode_text(prompt, negative_prompt)
            image_cond = None
            if self.task == "i2v":
                with stage("image_encode"):
                    image_cond = self.encode_image(image)
            noise = drawn.result() if drawn is not None else make_noise(self.latent_shape(image_cond), seed)
        noise = noise.to(dev)

        step_times: list[float] = []
        bar = progress_bar(len(cfg.scheduler()), progress)
        step_level = logging.DEBUG if not bar.disable else logging.INFO  # one display: the bar or the lines
        last = [time.perf_counter()]

        def on_step(info: StepInfo) -> None:
            sync(dev)
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now
            bar.update(1)
            log.log(step_level, "step %d/%d (t=%.1f): %.2f s", info.step + 1, info.total, info.t, step_times[-1])
            if callback is not None:
                callback(info)

        with stage("sampling"):
            try:
                latent = self.sample(noise, cond, uncond, image_cond, callback=on_step)
            finally:
                bar.close()
        writer = None
        if save_result_path and (self.parallel_run is None or self.parallel_run.is_main):
            from .video import VideoWriter

            os.makedirs(os.path.dirname(os.path.abspath(save_result_path)), exist_ok=True)
            # encoded on a worker thread while the VAE decodes the next frames; "save" is the rest
            writer = VideoWriter(save_result_path, fps=cfg.fps, layout="comfy", crf=cfg.video_crf,
                                 preset=cfg.video_preset, background=True)  # fmt: skip
        try:
            with stage("vae_decode"):
                frames = self.decode(latent, on_frames=writer.write if writer is not None else None)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        path = None
        if writer is not None:
            with stage("save"):
                writer.close()
            path = save_result_path
        peak = torch.cuda.max_memory_allocated(dev) if torch.device(dev).type == "cuda" else None
        result = GenerationResult(
            frames=frames, seed=seed, latent=latent.float().cpu() if return_latent else None, timings=timings,
            step_times=step_times, peak_memory=peak, path=path,
            cache=self.cache_report.to_dict() if self.cache_report is not None else None,
        )  # fmt: skip
        if peak is not None:
            log.info("peak GPU memory: %.2f GiB", peak / 2**30)
        from .layers.offload.host import trim_host_memory

        trim_host_memory()  # the run's freed host memory back to the OS, so RSS does not creep run by run
        return result
