"""The engine's door for front ends: what the ComfyUI nodes call (and any other caller may).

A node validates its inputs, calls one function here and returns its result; it does not reach
into `layers`, `loading`, `models` or `sampling`. Each stage takes the model description
(`ModelSpec`) and builds (or reuses) what it needs through the model cache (`model_cache`: the
DiT leased for the run), so a graph that runs again does not load again. Sampling, in one process or on the multi-GPU worker
group, goes through `sampling.denoise` like the pipeline and the CLI: the feature cache, the
offloaded DiT on the GPU for the loop only, and the out-of-memory advice hold for every door.

Wan2.2: a spec's `task` says which model it is ("t2v" / "i2v": Wan2.1 or a Wan2.2 A14B expert,
whose I2V has no CLIP file; "ti2v": TI2V-5B with its 48-channel VAE). The two A14B experts run
together as an `ExpertPair` (`expert_pair` checks and pairs two specs), wherever a spec is taken
by `run_sampler`; `read_dit_facts` tells a loader which model a file is.

Latents here are the engine's (normalised, what the DiT denoises); ComfyUI's LATENT socket
carries raw VAE latents: `latent_to_raw` / `latent_from_raw` convert at that boundary.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from .kernels.attention import BACKENDS, resolve_name
from .kernels.radial_attention import KERNELS as RADIAL_KERNELS
from .kernels.radial_attention import RadialOptions
from .layers.cache import MODEL_KEYS
from .layers.fp8 import KERNELS
from .layers.offload.host import trim_host_memory
from .layers.parallel.group import ParallelConfig
from .layers.parallel.workers import RunCancelled, WorkerGroupError, get_worker_group, request_models
from .loading.discover import find_model_files
from .loading.dit import find_dit_files
from .loading.family import ModelFamilyError, check_vae_fits, read_dit_facts
from .loading.io import CheckpointError, read_keys
from .model_cache import (
    build_image_encoder,
    build_text_encoder,
    build_vae,
    component_loaded,
    evict,
    memory_report,
    part_bytes,
    register_memory_hooks,
    unload_all,
)
from .models.conditioning import I2VCondition, TI2VCondition, prepare_i2v, prepare_ti2v
from .models.vae import latent_from_raw, latent_to_raw
from .sampling.denoise import LowNoiseExpert, SampleRequest, denoise_request
from .sampling.experts import OFFICIAL_BOUNDARY
from .sampling.first_frame import FirstFrame
from .sampling.loop import Cond, StepInfo, latent_geometry, latent_shape, make_noise
from .sampling.preview import fit_rgb_projection, latent_to_rgb
from .sampling.schedulers import make_scheduler
from .spec import ModelSpec, OffloadOptions
from .vae_frames import decode_frames
from .video import X264_PRESETS, frames_to_wan, write_video
from .wan22 import SWITCH_MODES, ExpertPair, expert_pair, switch_for

__all__ = [
    "ATTENTION_BACKENDS",
    "CACHE_MODELS",
    "FP8_KERNELS",
    "X264_PRESETS",
    "CheckpointError",
    "ExpertPair",
    "I2VCondition",
    "ModelFamilyError",
    "ModelSpec",
    "OFFICIAL_BOUNDARY",
    "SWITCH_MODES",
    "TI2VCondition",
    "OffloadOptions",
    "ParallelConfig",
    "RADIAL_KERNELS",
    "RadialOptions",
    "RunCancelled",
    "WorkerGroupError",
    "SamplerSettings",
    "SamplerResult",
    "cache_config",
    "check_vae_fits",
    "context_from_conditioning",
    "decode_video",
    "encode_prompts",
    "encode_start_image",
    "evict",
    "expert_pair",
    "find_dit_files",
    "find_model_files",
    "latent_from_raw",
    "latent_to_raw",
    "latent_to_rgb",
    "memory_report",
    "part_bytes",
    "preview_projection",
    "read_dit_facts",
    "read_keys",
    "register_memory_hooks",
    "run_sampler",
    "run_sampler_on_workers",
    "switch_for",
    "unload_all",
    "write_video",
]

ATTENTION_BACKENDS: tuple[str, ...] = tuple(sorted(BACKENDS))  # names `ModelSpec.attention` takes ("auto" too)
FP8_KERNELS: tuple[str, ...] = tuple(KERNELS)  # names `ModelSpec.fp8` takes
CACHE_MODELS: tuple[str, ...] = tuple(MODEL_KEYS)  # published feature-cache tables (`cache_model`)


# ------------------------------------------------------------------------- settings
def cache_config(
    method: str,
    *,
    teacache_thresh: float = 0.2,
    use_ret_steps: bool = True,
    magcache_thresh: float = 0.24,
    magcache_K: int = 6,
    magcache_retention_ratio: float = 0.2,
    start_step: int = -1,
    end_step: int = 0,
    max_skips: int = 0,
    cache_model: str = "auto",
) -> dict:
    """Feature-caching keys (LightX2V's names, `wan_core.layers.cache.config`) for a method's
    settings: start_step -1 / end_step 0 / max_skips 0 / cache_model "auto" leave the method's
    defaults; end_step < 0 counts from the end."""
    if method == "Tea":
        out: dict = {"feature_caching": "Tea", "teacache_thresh": teacache_thresh, "use_ret_steps": use_ret_steps}
        prefix = "teacache"
        if max_skips > 0:
            out["teacache_max_skips"] = max_skips
    elif method == "Mag":
        out = {"feature_caching": "Mag", "magcache_thresh": magcache_thresh, "magcache_K": magcache_K,
               "magcache_retention_ratio": magcache_retention_ratio}  # fmt: skip
        prefix = "magcache"
    else:
        raise ValueError(f"cache method must be 'Tea' or 'Mag', got {method!r}")
    if start_step >= 0:
        out[f"{prefix}_start_step"] = start_step
    if end_step != 0:
        out[f"{prefix}_end_step"] = end_step
    if cache_model != "auto":
        out["cache_model"] = cache_model
    return out


@dataclass(frozen=True)
class SamplerSettings:
    """The run-time choices of one sampling run (a sampler node's widgets).

    step_list: the distill scheduler's timesteps (e.g. (1000, 750, 500, 250)); cache: feature
    caching keys (`cache_config(...)`), None for none.
    """

    steps: int = 50
    guidance: float = 5.0
    shift: float = 5.0
    scheduler: str = "unipc"
    seed: int = 42
    step_list: tuple[int, ...] | None = None
    cache: Mapping | None = None


@dataclass
class SamplerResult:
    latent: torch.Tensor  # [1, C, F, h, w] float32 on the CPU, the engine's normalised latent (C 16; TI2V-5B 48)
    steps: int
    cache_report: object | None = None  # `wan_core.layers.cache.CacheReport` when caching was on
    experts: str | None = None  # two experts: how the steps were split ("2 of 4 steps on the high-noise expert ...")


ImageCondition = I2VCondition | TI2VCondition  # what `encode_start_image` makes


def _request(
    settings: SamplerSettings,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    size: tuple[int, int, int],
    image: ImageCondition | None,
    preview: bool = False,
    task: str = "t2v",
    pair: ExpertPair | None = None,
) -> SampleRequest:
    """The run as data: noise from the seed, scheduler, conditions (CPU tensors); bad sizes and
    schedules are errors here, before any model is built. task "ti2v": the Wan2.2 VAE's latent (48
    channels, 16x); pair: two A14B experts (the request's guidance is the high-noise expert's, the
    low-noise one travels in `SampleRequest.low`)."""
    z_dim, stride = latent_geometry(task)
    shape = (1, *latent_shape(*size, z_dim=z_dim, stride=stride))  # [1, C, F, h, w]
    sched = make_scheduler(settings.scheduler, settings.steps, settings.shift,
                           list(settings.step_list) if settings.step_list is not None else None)  # fmt: skip
    first_frame, kw = None, {}
    if isinstance(image, TI2VCondition):  # TI2V-5B: the image's latent held as latent frame 0
        first_frame = FirstFrame(image.z)
    elif image is not None:  # I2V: y (mask + first-frame latent), Wan2.1 also the CLIP tokens
        kw = {"clip_fea": image.clip_fea, "y": image.y}
    cond = Cond(context=[positive], **kw)
    guidance = pair.guidance_high if pair is not None else settings.guidance
    low = LowNoiseExpert(pair.low, pair.switch, pair.guidance_low) if pair is not None else None
    guided = any(g != 1.0 for g in (pair.guidances if pair is not None else (guidance,)))
    uncond = Cond(context=[negative], **kw) if guided else None
    cache = dict(settings.cache) if settings.cache else None
    return SampleRequest(make_noise(shape, settings.seed), sched, cond, uncond, guidance, preview, cache,
                         low=low, first_frame=first_frame)  # fmt: skip


def _check_text_width(dit: torch.nn.Module, *texts: torch.Tensor | None) -> None:
    """A clear error for text features of another encoder (core conditioning from a CLIP-L, a T5 of
    another width), instead of a matmul shape error deep in the DiT."""
    want = getattr(getattr(dit, "cfg", None), "text_dim", None)
    for t in texts:
        if want is not None and t is not None and t.shape[-1] != want:
            raise ValueError(
                f"the text features are {t.shape[-1]} wide but this DiT takes {want} (umT5-XXL): the conditioning "
                "comes from another text encoder; for core nodes use CLIPLoader with type 'wan' and umt5_xxl"
            )


@contextlib.contextmanager
def _no_stage(name: str) -> Iterator[None]:
    yield None


# ------------------------------------------------------------------------- sampling
def run_sampler(
    spec: ModelSpec | ExpertPair,
    settings: SamplerSettings,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    size: tuple[int, int, int],
    image: ImageCondition | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    stage: Callable[[str], contextlib.AbstractContextManager] = _no_stage,
) -> SamplerResult:
    """Denoise one video latent in this process.

    spec: one model, or the two Wan2.2 A14B experts (`expert_pair`: each step on the expert its
    switch picks, with that expert's guidance; `settings.guidance` unused). positive / negative:
    umT5 features [L, 4096] (negative unused without guidance); size: (frames, height, width) of
    the video (with an image: the size its conditioning was made for); image: I2V conditioning,
    or TI2V-5B's image latent. callback(StepInfo) after each step (raise from it to stop);
    stage(name): a context manager around the "load DiT" and "sample" stages (timing).
    """
    pair = spec if isinstance(spec, ExpertPair) else None
    first = pair.high if pair is not None else spec
    req = _request(settings, positive, negative, size, image, task=first.task, pair=pair)
    device = torch.device(first.torch_device)  # an offloaded DiT's weights live in CPU memory between runs
    with contextlib.ExitStack() as held:
        with stage("load DiT"):  # the shared DiT(s) at their spec's LoRAs/offload, held for the run
            # the two experts each in their own cache slot (`ModelSpec.expert`)
            model = held.enter_context(request_models(first, req, device))
        _check_text_width(model, positive, negative)
        with stage("sample"), torch.inference_mode():
            latent, report = denoise_request(model, req, callback, device=device)
    split = pair.switch.describe(req.scheduler.timesteps) if pair is not None else None
    return SamplerResult(latent.cpu(), len(req.scheduler), report, split)


def run_sampler_on_workers(
    spec: ModelSpec | ExpertPair,
    settings: SamplerSettings,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    size: tuple[int, int, int],
    parallel: ParallelConfig,
    i2v: I2VCondition | None = None,
    progress: Callable | None = None,
    cancel: Callable[[], bool] | None = None,
    preview: bool = False,
) -> SamplerResult:
    """`run_sampler` on the persistent multi-GPU worker group (`layers.parallel.workers`): one
    process per GPU, sequence and/or CFG parallel, each rank through `sampling.denoise`; spec: one
    model or the two Wan2.2 A14B experts; i2v: image conditioning (TI2V-5B: its image latent).

    progress(StepProgress) after each step (x0 previews when `preview`); cancel() is polled and
    stops the run between steps (`RunCancelled`). A worker's CUDA out-of-memory error arrives as
    a `torch.OutOfMemoryError` with the offload advice; other worker failures as WorkerGroupError.
    """
    pair = spec if isinstance(spec, ExpertPair) else None
    first = pair.high if pair is not None else spec
    if parallel.ring > 1 and any(resolve_name(s.attention) == "radial_attn" for s in (first, pair and pair.low) if s):
        raise ValueError(
            f"radial_attn needs every video token in one attention call, but ring_degree {parallel.ring} splits the "
            "sequence: use ulysses_degree (ring_degree 1), or another attention in the loader"
        )
    req = _request(settings, positive, negative, size, i2v, preview, task=first.task, pair=pair)
    if parallel.cfg == 2 and req.uncond is None:
        raise ValueError("cfg_parallel needs guidance > 1 (there is no unconditional branch to run in parallel)")
    kind = "cuda" if first.torch_device.startswith("cuda") else "cpu"
    group = get_worker_group(parallel.world_size, parallel, device=kind)
    latent, report = group.run(first, req, progress, cancel=cancel)
    return SamplerResult(latent, len(req.scheduler), report)


# ------------------------------------------------------------------------- ComfyUI's core conditioning
# keys of a core conditioning entry that carry nothing for a Wan text condition
_NEUTRAL_KEYS = frozenset({"pooled_output", "attention_mask"})


def context_from_conditioning(conditioning, text_len: int = 512) -> torch.Tensor:
    """umT5 features [L, D] (what `encode_prompts` gives) from ComfyUI's CONDITIONING of one prompt.

    ComfyUI's Wan text path (`CLIPLoader` type wan + `CLIPTextEncode`) gives a list of one
    [tensor [1, N, D], dict]: the prompt's tokens and </s>, then pad tokens up to 512 that were
    masked out of the encoder's attention and zeroed in its output. Zero rows at the end are what
    the DiT appends itself, so they are trimmed: the result equals our encoder's per-prompt
    features; a prompt over `text_len` tokens is cut there with a warning, as our encoder does.
    Entries or keys this sampler cannot honour (combined conditionings, areas, masks, timestep
    ranges, core I2V keys) are errors, never dropped.
    """
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError(
            "conditioning must be ComfyUI's CONDITIONING: a list of [tensor, dict] (e.g. from CLIPTextEncode)"
        )
    if len(conditioning) != 1:
        raise ValueError(
            f"the conditioning holds {len(conditioning)} entries (ConditioningCombine?): the Wan sampler takes one "
            "prompt per input; use ConditioningConcat or one CLIPTextEncode"
        )
    entry = conditioning[0]
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], torch.Tensor):
        raise ValueError("a CONDITIONING entry must be [tensor [1, tokens, 4096], dict]")
    cond, extra = entry
    other = sorted(k for k, v in (extra or {}).items() if k not in _NEUTRAL_KEYS and v is not None)
    if other:
        raise ValueError(
            f"the conditioning carries {other}, which this sampler does not apply (only the text features are used); "
            "for image-to-video use WanImageEncode, not the core Wan image nodes"
        )
    if cond.dim() != 3 or cond.shape[0] != 1:
        raise ValueError(f"the conditioning tensor must be [1, tokens, features], got {list(cond.shape)}")
    ctx = cond[0].detach().to("cpu", torch.float32)  # [N, D]
    filled = (ctx != 0).any(dim=1).nonzero()
    # an all-zero conditioning (ConditioningZeroOut) keeps one zero row
    n = int(filled[-1]) + 1 if filled.numel() else 1
    if n > text_len:  # as our encoder does with a long prompt (the official one truncates there)
        warnings.warn(
            f"a prompt of {n} tokens is cut to the DiT's {text_len} (text_len): the words after about token "
            f"{text_len} have no effect",
            stacklevel=2,
        )
        n = text_len
    return ctx[:n].clone()  # [L, D]


# ------------------------------------------------------------------------- encoders, decoder, previews
def encode_prompts(spec: ModelSpec, prompt: str, negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """umT5-XXL features [L, 4096] of the prompt and the negative prompt (the encoder cached by spec)."""
    with component_loaded(build_text_encoder(spec), spec, "t5") as te:
        positive, negative = te.encode([prompt, negative_prompt])
    return positive, negative


def encode_start_image(spec: ModelSpec, image: torch.Tensor, num_frames: int, max_area: int) -> ImageCondition:
    """Image conditioning from a start frame [1, H, W, 3] in [0, 1] (ComfyUI's IMAGE layout), as the
    official code makes it for the spec's model: Wan2.1 I2V: CLIP tokens + y (mask, first-frame
    latent); Wan2.2 I2V-A14B (no CLIP file): y only; TI2V-5B: the image's latent (`TI2VCondition`),
    held as latent frame 0 while sampling. max_area: the video's pixel count (aspect from the image)."""
    if spec.task not in ("i2v", "ti2v"):
        raise ValueError(f"a start image conditions an I2V or TI2V model, not a {spec.task.upper()} one")
    start = frames_to_wan(image[:1])[:, 0]  # [1, H, W, 3] in [0, 1] -> [3, H, W] in [-1, 1]
    vae = build_vae(spec)
    if spec.task == "ti2v":
        with component_loaded(vae, spec, "vae"):
            return prepare_ti2v(start, vae, max_area)
    clip = build_image_encoder(spec) if spec.clip else None
    with component_loaded(vae, spec, "vae"), component_loaded(clip, spec, "clip"):
        return prepare_i2v(start, vae, clip, num_frames, max_area)


def decode_video(spec: ModelSpec, latent: torch.Tensor, tile_size: int | None = None) -> torch.Tensor:
    """Engine latent [1, C, F, h, w] -> frames [T, H, W, 3] in [0, 1] on the CPU (tiled when tile_size;
    C 16: the Wan2.1 VAE, C 48: the Wan2.2 VAE of TI2V-5B, which decodes whole frames only)."""
    vae = build_vae(spec)
    z_dim = vae.config.z_dim
    if latent.shape[1] != z_dim:
        need = "TI2V-5B's, the Wan2.2 VAE" if latent.shape[1] == 48 else "the Wan2.1 VAE"
        raise ValueError(
            f"the latent has {latent.shape[1]} channels but this model's VAE ({os.path.basename(spec.vae)}) decodes "
            f"{z_dim}: decode it with the model that sampled it ({need})"
        )
    if tile_size and z_dim == 48:
        raise ValueError("tiled decoding is not available for the Wan2.2 VAE (TI2V-5B): set tile_size to 0")
    with component_loaded(vae, spec, "vae"):
        frames = decode_frames(vae, latent, tile_size or None)
    trim_host_memory()  # the last engine stage of a graph: the run's freed host memory back to the OS
    return frames


_projections: dict = {}
_projections_lock = threading.Lock()


def preview_projection(spec: ModelSpec):
    """The VAE's latent -> RGB map for live previews (`latent_to_rgb(x0, projection)`), fitted once per VAE file."""
    key = (spec.vae, str(spec.torch_vae_dtype), spec.torch_device)
    with _projections_lock:
        if key not in _projections:
            with component_loaded(build_vae(spec), spec, "vae") as vae:
                _projections[key] = fit_rgb_projection(vae)
        return _projections[key]
