"""Describe a model, then build it: `ModelSpec` (picklable, hashable) and a per-process cache.

The ComfyUI loader nodes return a spec rather than a model, and the multi-GPU sampler sends a
spec to its worker processes, which build (memory-map) the weights themselves. Building the
same spec twice in one process returns the same objects, so a graph re-run or a second node
asking for the same files costs nothing. A file rewritten on disk (new size or mtime) is a new
key, so a stale model is never served.

Memory: a cached part is replaced when the same part (DiT, T5, VAE, CLIP) is built from a
different spec, so at most one of each lives in the cache at a time; `clear_cache()` drops all.

Optional DiT features are layered on in `build_dit`, in this order (DESIGN.md principle 3):
FP8 linears swapped in at load (`fp8`), regional compile (after quantisation), then LoRAs
(`loras`; after the FP8 swap, so branches sit beside the FP8 linears), then CPU offload
(`offload`, last: it packs the tensors the blocks hold at that point). A LoRA change never
reloads the base: see "the DiT" below.

CPU offload: an offloaded DiT is read into host memory but set up for the compute device
(attention backends, FP8 kernel, compile), then `wan_core.layers.offload.enable_offload` attaches its
hooks; whoever runs it wraps the denoising loop in `dit_loaded(model)`, so the GPU is free for
the VAE afterwards. T5 / CLIP / VAE with their offload flag are built in host memory and used
inside `component_loaded(...)` (on the GPU for their stage only). On a CPU-only run the same
mechanism runs with a second CPU placement (it saves nothing there; a warning says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
import warnings
from dataclasses import dataclass, field

import torch

__all__ = [
    "ModelSpec", "build_dit", "build_text_encoder", "build_vae", "build_image_encoder", "clear_cache", "resolve_dtype",
    "resolve_device", "dit_fp8_layout", "dit_lora_report", "dit_loaded", "component_loaded", "offload_handle",
    "OFFLOAD_GRANULARITIES",
]  # fmt: skip

OFFLOAD_GRANULARITIES = ("model", "block", "phase")

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def resolve_device(device: str | torch.device | None) -> str:
    """'auto' / None -> 'cuda' when available, else 'cpu'."""
    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """'auto' / None -> bfloat16 on a GPU, float32 on the CPU (bf16 matmuls are slow there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[key]


@dataclass(frozen=True)
class ModelSpec:
    """Which files make up a Wan2.1 model and how to build them.

    Paths are plain strings (a DiT may be a folder, a file, a shard index or a tuple of shards);
    `dtype` is the compute dtype of the DiT, T5 and CLIP ('auto': bf16 on GPU, fp32 on CPU);
    `vae_dtype` defaults to `dtype`.
    fp8: FP8 kernel or LightX2V scheme for the DiT's block linears ('auto', 'scaled_mm', 'sgl',
    'dequant', 'fp8-sgl', ... see `wan_core.layers.fp8`): an FP8 file is used as stored, a bf16 one is
    quantised on load. None: high precision, except that a DiT file stored in FP8 runs as FP8 ('auto').
    loras: ((path, strength), ...) applied in order; lora_mode: 'auto' (merge into high-precision
    weights, low-rank branch beside FP8 linears), 'merge' or 'branch' (`wan_core.layers.lora`).
    compile: regional torch.compile of the blocks ('auto': on CUDA).
    offload: CPU offload of the DiT: None (resident), 'model' (all of it on the GPU for the
    denoising loop only) or 'block' (blocks streamed through the GPU; 'phase' runs as 'block').
    offload_budget_gb: block offload, "use at most X GiB" (weights + activations): the number of
    resident blocks is chosen per video size. offload_resident_blocks: block offload, blocks kept
    on the GPU for good (0 / None: every block streams); exclusive with the budget.
    offload_prefetch: blocks copied ahead of the running one.
    offload_text_encoder / offload_image_encoder / offload_vae: keep T5 / CLIP / VAE in host memory,
    on the GPU only for their stage (independent of `offload`, as LightX2V's flags are).
    """

    dit: str | tuple[str, ...]
    t5: str | None = None
    tokenizer: str | None = None
    vae: str | None = None
    clip: str | None = None
    task: str = "t2v"
    dtype: str | torch.dtype = "auto"
    vae_dtype: str | torch.dtype | None = None
    device: str = "auto"
    attention: str = "auto"
    cross_attention: str | None = None
    text_len: int = 512
    fp8: str | None = None
    loras: tuple[tuple[str, float], ...] = ()
    lora_mode: str = "auto"
    offload: str | None = None
    compile: bool | str = "auto"
    offload_budget_gb: float | None = None
    offload_resident_blocks: int | None = None
    offload_prefetch: int = 1
    offload_text_encoder: bool = False
    offload_image_encoder: bool = False
    offload_vae: bool = False

    def __post_init__(self):
        if self.task not in ("t2v", "i2v"):
            raise ValueError(f"task must be 't2v' or 'i2v', got {self.task!r}")
        if self.offload in ("none", ""):
            object.__setattr__(self, "offload", None)
        if self.offload == "phase":
            object.__setattr__(self, "offload", "block")
        if self.offload is not None and self.offload not in OFFLOAD_GRANULARITIES:
            raise ValueError(f"offload must be None, 'model' or 'block', got {self.offload!r}")
        if not self.offload_budget_gb:
            object.__setattr__(self, "offload_budget_gb", None)
        if self.offload_budget_gb is not None and self.offload_resident_blocks is not None:
            raise ValueError("give offload_budget_gb or offload_resident_blocks, not both")
        if self.offload_resident_blocks is not None and self.offload != "block":
            raise ValueError("offload_resident_blocks applies to offload='block' only")
        if self.offload_budget_gb is not None and self.offload is None:
            raise ValueError("offload_budget_gb needs CPU offload of the DiT (offload='block' or 'model')")
        if isinstance(self.dit, list):
            object.__setattr__(self, "dit", tuple(self.dit))
        object.__setattr__(self, "loras", tuple((os.fspath(p), float(s)) for p, s in self.loras))

    def replace(self, **kw) -> ModelSpec:
        return dataclasses.replace(self, **kw)

    @property
    def torch_device(self) -> str:
        return resolve_device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.torch_device)

    @property
    def torch_vae_dtype(self) -> torch.dtype:
        return resolve_dtype(self.vae_dtype or self.dtype, self.torch_device)

    def build(self) -> dict:
        """All parts this spec names: {'dit', 'text_encoder', 'vae', 'image_encoder'} (None where no file)."""
        return {
            "dit": build_dit(self),
            "text_encoder": build_text_encoder(self) if self.t5 else None,
            "vae": build_vae(self) if self.vae else None,
            "image_encoder": build_image_encoder(self) if self.clip else None,
        }


# ----------------------------------------------------------------------------- cache

_CACHE: dict[str, tuple[tuple, object]] = {}  # part -> (key, built object)
_LOCK = threading.RLock()


def _stamp(path) -> tuple:
    """A path's identity for the cache: the path plus size and mtime of every file under it."""
    if path is None:
        return (None,)
    if isinstance(path, (tuple, list)):
        return tuple(_stamp(p) for p in path)
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        out = []
        for root, _, files in sorted(os.walk(path)):
            for f in sorted(files):
                st = os.stat(os.path.join(root, f))
                out.append((os.path.relpath(os.path.join(root, f), path), st.st_size, st.st_mtime_ns))
        return (path, tuple(out))
    if os.path.isfile(path):
        st = os.stat(path)
        return (path, st.st_size, st.st_mtime_ns)
    return (path,)


def _normal_tensors(fn):
    """Build outside `torch.inference_mode`: the models are cached and outlive the call, and
    ComfyUI runs every node in inference mode; weights made there would be inference tensors,
    which fail once anything (offload, a LoRA change, a run outside that mode) touches them."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


def _cached(part: str, key: tuple, make):
    with _LOCK:
        hit = _CACHE.get(part)
        if hit is not None and hit[0] == key:
            return hit[1]
        _CACHE.pop(part, None)  # free the old one before building the new one
        obj = make()
        _CACHE[part] = (key, obj)
        return obj


def clear_cache() -> None:
    """Forget every cached model (their memory is freed once no one else holds them)."""
    with _LOCK:
        _CACHE.clear()


# ----------------------------------------------------------------------------- the DiT
#
# The cache holds one *base* DiT per process (keyed by its files, dtype, device, attention, whether
# it is FP8, and compile), and the LoRAs of the last spec built are applied to it in place:
# another LoRA set or other strengths change that same object (merged weights are recomputed
# from kept originals, branches get new multipliers), so the base is never read from disk again
# and the result is bitwise what a fresh build with that LoRA set gives. Whoever holds the model
# must therefore call `build_dit(spec)` again right before using it (the pipeline and the
# sampler nodes do); it costs a few `os.stat` calls when nothing changed.
# Costs: a merged LoRA keeps the original of every weight it touches in CPU RAM (for a 14B bf16
# DiT with a LoRA on every block linear, about the DiT's size again; nothing extra for an fp32
# model on the CPU, whose originals are the loaded tensors). With compiled blocks, a LoRA set or
# strength that changes branches (LoRA beside FP8) recompiles the block graph once per new set
# (H100, inductor: 9-22 s on a 4-block test model; sets seen before are cache hits); merged
# LoRAs only swap parameter data and never recompile.
#
# With CPU offload the base is keyed by its offload settings too (granularity, budget, resident
# blocks, prefetch). Any change to an offloaded base (LoRAs, strengths, FP8 kernel) is made with
# the offload detached and the offload attached again after: the offload's host copy is the
# master of every weight, and a LoRA's kept original may be that very memory (the LoRA takes the
# weight it finds, and `.to("cpu")` of a host tensor is no copy), so a merge must never be written
# back into it. Re-attaching repacks only the blocks whose tensors changed (pinned memory for
# those, the rest reused in place).


@dataclass
class _DitEntry:
    """The cached base DiT and the LoRA state applied to it."""

    model: object
    fp8_kernel: str | None  # resolved kernel of its FP8 linears (None: no FP8)
    lora_files: tuple = ()  # (stamp, ...) of the applied LoRAs, in order
    lora_mode: str = "auto"
    strengths: tuple[float, ...] = ()
    weights: dict = field(default_factory=dict)  # stamp -> LoraWeights (parsed files, reused)
    offload: object = None  # the OffloadHandle attached to `model` (None: resident)
    file_views: dict | None = None  # the checkpoint's tensors, memory-mapped (LoRA originals on a GPU)


_FP8_LAYOUT: dict[tuple, str] = {}  # stamp of a DiT path -> its FP8 layout (file headers only)
_LORA_WEIGHTS_KEPT = 8  # parsed LoRA files kept beyond the applied ones (switching back reads nothing)


def dit_fp8_layout(path) -> str:
    """FP8 layout of a DiT path (`wan_core.loading.fp8.detect_fp8_layout`, memoized per file version)."""
    from .loading.fp8 import detect_fp8_layout

    key = _stamp(path)
    if key not in _FP8_LAYOUT:
        _FP8_LAYOUT[key] = detect_fp8_layout(list(path) if isinstance(path, tuple) else path)
    return _FP8_LAYOUT[key]


def _fp8_choice(spec: ModelSpec) -> str | None:
    """The FP8 kernel/scheme to build with: `spec.fp8`, or 'auto' for a DiT file stored in FP8
    (its e4m3 weights mean nothing without their scales, so it can only run as an FP8 model)."""
    if spec.fp8 is not None:
        return spec.fp8
    return "auto" if dit_fp8_layout(spec.dit) != "none" else None


def _allow_hook_guards() -> None:
    """Let torch.compile guard on module hooks, so a LoRA branch added to (or removed from) a block
    that already ran compiled makes it recompile instead of being silently left out.

    By default dynamo skips these guards (`skip_nnmodule_hook_guards=True`, for speed): a forward
    hook registered after a block's first compiled call never runs. The flag is process-wide and
    only adds guards; it must be set before the blocks are first traced, which is why it is set
    here, when the blocks are compiled.
    """
    import torch._dynamo

    torch._dynamo.config.skip_nnmodule_hook_guards = False


def _load_base(spec: ModelSpec, fp8: str | None, kernel: str | None, dt, dev, compile: bool):
    """Read the DiT files once: FP8 linears swapped in when asked (an FP8 file as stored, block linears of
    a high-precision file quantised on load), then regional compile (after quantisation, so the compiled
    graphs see the FP8 linears). An offloaded DiT is read into host memory but set up for `dev`."""
    from .layers.compile import compile_blocks
    from .layers.fp8 import set_fp8_kernel
    from .loading.dit import load_dit
    from .loading.fp8 import load_fp8_dit

    path = list(spec.dit) if isinstance(spec.dit, tuple) else spec.dit
    if spec.offload is None:
        common = dict(dtype=dt, device=dev, attention=spec.attention, cross_attention=spec.cross_attention, task=spec.task)
        if fp8 is None:
            model = load_dit(path, compile=False, **common)
        else:
            model = load_fp8_dit(path, kernel=kernel, quantize=True, compile=False, **common)
    else:
        if torch.device(dev).type == "cpu":
            warnings.warn(
                f"CPU offload ({spec.offload}) on a run whose compute device is the CPU saves no memory; the "
                "offload mechanism runs with a second CPU placement",
                stacklevel=5,  # the caller of build_dit
            )
        # host placement: backends of the host first (a CUDA-only one would fail there), the real ones after
        common = dict(dtype=dt, device="cpu", attention="auto", task=spec.task)
        if fp8 is None:
            model = load_dit(path, compile=False, **common)
        else:
            model = load_fp8_dit(path, kernel="auto", quantize=True, compile=False, **common)
            set_fp8_kernel(model, kernel, dev)
        model.set_attention(spec.attention, spec.cross_attention, device=dev)
    if compile:
        _allow_hook_guards()
        compile_blocks(model)
    return model


def _enable_offload(entry: _DitEntry, spec: ModelSpec, dev: str) -> None:
    """Attach CPU offload to the cached DiT (last, after FP8 / compile / LoRAs), or nothing."""
    from .layers.offload import enable_offload

    if spec.offload is None or entry.offload is not None:
        return
    entry.offload = enable_offload(
        entry.model,
        spec.offload,
        resident_blocks=spec.offload_resident_blocks,
        vram_budget_gb=spec.offload_budget_gb,
        prefetch=spec.offload_prefetch,
        device=dev,
    )


def _detach_offload(entry: _DitEntry) -> None:
    """Before changing an offloaded base: weights back in host memory as plain tensors, hooks gone."""
    if entry.offload is not None:
        entry.offload.remove()
        entry.offload = None


def _lora_weights(entry: _DitEntry, path: str, stamp):
    from .loading.lora import load_lora

    lw = entry.weights.pop(stamp, None)
    if lw is None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LoRA file not found: {path}")
        lw = load_lora(path)
    entry.weights[stamp] = lw  # most recently used last
    return lw


def _file_originals(entry: _DitEntry, spec: ModelSpec):
    """For a DiT living on a GPU: the original of a weight a LoRA merges into is its tensor in the
    memory-mapped checkpoint (same dtype, values untouched since load: the cached base is only ever
    changed by LoRAs, which restore their originals), so no host copy is kept (a full rank-64
    LoRA on the 14B model would otherwise hold ~27 GiB of RAM). On the CPU the loaded weights are
    already file views (or host tensors) and `apply_loras` keeps them without a copy anyway."""
    if torch.device(next(entry.model.parameters()).device).type == "cpu":
        return None

    def lookup(name: str, current: torch.Tensor):
        if entry.file_views is None:
            from .loading.dit import find_dit_files, to_official
            from .loading.io import read_state_dict

            path = list(spec.dit) if isinstance(spec.dit, tuple) else spec.dit
            files = path if isinstance(path, list) else find_dit_files(path)[0]
            entry.file_views = to_official(read_state_dict(files))  # mmap views: no RAM until read
        view = entry.file_views.get(name)
        return view if view is not None and view.dtype == current.dtype and view.shape == current.shape else None

    return lookup


def _sync_loras(entry: _DitEntry, spec: ModelSpec) -> None:
    """Bring the cached model's LoRAs to `spec.loras` with as little work as possible.

    Same files in the same order: only strengths change (`set_lora_strengths`). The applied list
    is a prefix of the wanted one: strengths of the prefix, then the new ones applied on top.
    Anything else: every LoRA removed (originals restored bitwise) and the wanted ones applied.
    Each path leads to the same floating-point sums in the same order, so all three give the same
    bits as a fresh build.
    """
    from .layers.lora import apply_loras, remove_loras, set_lora_strengths

    model = entry.model
    want = [(_stamp(p), os.fspath(p), float(s)) for p, s in spec.loras]
    files = tuple(st for st, _, _ in want)
    strengths = tuple(s for _, _, s in want)
    if files == entry.lora_files and spec.lora_mode == entry.lora_mode:
        if strengths != entry.strengths:
            _detach_offload(entry)
            set_lora_strengths(model, list(strengths))
            entry.strengths = strengths
        return
    weights = [_lora_weights(entry, p, st) for st, p, _ in want]  # a missing/bad file fails before any change
    _detach_offload(entry)
    n = len(entry.lora_files)
    if spec.lora_mode == entry.lora_mode and n and files[:n] == entry.lora_files:
        if strengths[:n] != entry.strengths:
            set_lora_strengths(model, list(strengths[:n]))
            entry.strengths = strengths[:n]
    elif n:
        remove_loras(model)
        entry.lora_files, entry.strengths, n = (), (), 0
    if len(want) > n:
        apply_loras(model, list(zip(weights[n:], strengths[n:])), mode=spec.lora_mode, keep_originals=True,
                    originals=_file_originals(entry, spec))  # fmt: skip
    entry.lora_files, entry.strengths, entry.lora_mode = files, strengths, spec.lora_mode
    spare = [k for k in entry.weights if k not in files]
    for k in spare[: max(0, len(spare) - _LORA_WEIGHTS_KEPT)]:
        del entry.weights[k]


@_normal_tensors
def build_dit(spec: ModelSpec):
    """The DiT of `spec`: built once, FP8 / LoRAs / compile / offload applied, cached (see above)."""
    from .layers.compile import should_compile
    from .layers.fp8 import resolve_kernel, set_fp8_kernel

    if spec.lora_mode not in ("auto", "merge", "branch"):
        raise ValueError(f"lora_mode must be 'auto', 'merge' or 'branch', got {spec.lora_mode!r}")
    dev, dt = spec.torch_device, spec.torch_dtype
    fp8 = _fp8_choice(spec)
    kernel = resolve_kernel(fp8, dev) if fp8 is not None else None  # a kernel this device lacks fails here
    compile = should_compile(spec.compile, dev)
    offload = (spec.offload, spec.offload_budget_gb, spec.offload_resident_blocks, spec.offload_prefetch)
    key = (_stamp(spec.dit), spec.task, dt, dev, spec.attention, spec.cross_attention, fp8 is not None, compile, offload)
    with _LOCK:
        entry = _cached("dit", key, lambda: _DitEntry(_load_base(spec, fp8, kernel, dt, dev, compile), kernel))
        if kernel is not None and kernel != entry.fp8_kernel:
            _detach_offload(entry)
            entry.fp8_kernel = set_fp8_kernel(entry.model, kernel, dev)  # another kernel: no reload
        _sync_loras(entry, spec)
        _enable_offload(entry, spec, dev)
        return entry.model


def offload_handle(model):
    """The `wan_core.layers.offload.OffloadHandle` attached to a built model, or None when it is resident."""
    return getattr(model, "__dict__", {}).get("_wan_offload")


@contextlib.contextmanager
def dit_loaded(model, x: torch.Tensor | None = None):
    """The DiT's weights on its device inside (an offloaded DiT: `handle.loaded()`; a resident one:
    nothing to do). Wrap the denoising loop in it, so the GPU is free for the VAE after.

    x: the latent [B, C, F, H, W] the loop will feed; with a VRAM budget the resident blocks are
    planned for its token count before loading (the budget's planner otherwise plans at the first
    forward, which it cannot do once loaded by this context).
    """
    handle = offload_handle(model)
    if handle is None:
        yield model
        return
    hook = getattr(handle, "tokens_hook", None)
    if hook is not None and x is not None and not handle.is_loaded:
        hook((x,), {})  # unloaded: plans for this size (a budget too small for it fails here)
    with handle.loaded():
        yield model


def component_loaded(obj, spec: ModelSpec, part: str):
    """Context manager: T5 ('t5'), CLIP ('clip') or the VAE ('vae') on the compute device for one
    stage when `spec` offloads it (`wan_core.layers.offload.offload_component`), else as it is."""
    flag = {"t5": spec.offload_text_encoder, "clip": spec.offload_image_encoder, "vae": spec.offload_vae}[part]
    if not flag or obj is None:
        return contextlib.nullcontext(obj)
    from .layers.offload import offload_component

    return offload_component(obj, spec.torch_device)


def _part_device(spec: ModelSpec, offloaded: bool) -> str:
    """Where a component is built: the host when it is offloaded, else the compute device."""
    return "cpu" if offloaded else spec.torch_device


def dit_lora_report(spec: ModelSpec):
    """The `LoraReport` of the cached DiT (what `build_dit(spec)` applied)."""
    from .layers.lora import lora_report

    return lora_report(build_dit(spec))


@_normal_tensors
def build_text_encoder(spec: ModelSpec):
    """The umT5 text encoder (with its tokenizer) of `spec`, cached."""
    from .models.text_encoder import WanTextEncoder

    if not spec.t5:
        raise ValueError("this ModelSpec names no T5 text encoder file")
    dev, dt = _part_device(spec, spec.offload_text_encoder), spec.torch_dtype
    key = (_stamp(spec.t5), _stamp(spec.tokenizer), dt, dev, spec.text_len, spec.offload_text_encoder)
    return _cached(
        "t5",
        key,
        lambda: WanTextEncoder.from_files(spec.t5, spec.tokenizer, dtype=dt, device=dev, text_len=spec.text_len),
    )


@_normal_tensors
def build_vae(spec: ModelSpec):
    """The Wan2.1 VAE of `spec`, cached."""
    from .models.vae import WanVAE

    if not spec.vae:
        raise ValueError("this ModelSpec names no VAE file")
    dev, dt = _part_device(spec, spec.offload_vae), spec.torch_vae_dtype
    key = (_stamp(spec.vae), dt, dev, spec.offload_vae)
    return _cached("vae", key, lambda: WanVAE.from_file(spec.vae, dtype=dt, device=dev))


@_normal_tensors
def build_image_encoder(spec: ModelSpec):
    """The CLIP image encoder of `spec` (I2V), cached."""
    from .models.image_encoder import WanImageEncoder

    if not spec.clip:
        raise ValueError("this ModelSpec names no CLIP image encoder file")
    dev, dt = _part_device(spec, spec.offload_image_encoder), spec.torch_dtype
    key = (_stamp(spec.clip), dt, dev, spec.offload_image_encoder)
    return _cached("clip", key, lambda: WanImageEncoder.from_file(spec.clip, dtype=dt, device=dev))
