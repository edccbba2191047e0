"""Built models, kept per process: the DiT is *leased* to a run, T5 / CLIP / the VAE are shared.

    with model_cache.lease(spec) as dit:     # the one way to get the cached DiT
        latent, _ = denoise(dit, noise, ...)

The cache holds one base DiT per process, keyed by what needs a reload to change (its files,
task, dtype, device, attention, whether it is FP8, compile, the offload settings). A lease
brings that shared model to the spec's layers (`wan_core.layers.stack`: FP8 kernel, LoRAs and
strengths, offload) and holds a lock until the `with` block ends, so two graphs with different
LoRAs in one process each run with their own weights: another thread's lease waits, and a lease
nested in a held one (same thread) that would change the model is an error instead of silently
changing the weights under the outer one. LoRA changes never reload the base: merged weights are
recomputed from kept originals, branches get new multipliers (`layers.lora_sync`), and the result
is bitwise what a fresh build with that LoRA set gives.

Costs: a merged LoRA keeps the original of every weight it touches (for a model on a GPU the
original is read back from the memory-mapped checkpoint instead); with compiled blocks, a new set
of LoRA *branches* recompiles the block graph once (benchmarks/NOTES.md), merged LoRAs never do.

With CPU offload, any change under the offload is made with it removed and applied again after
(`stack.apply_layers`): the offload's host copy is the master of every weight, and a LoRA's kept
original may be that very memory, so a merge must never be written back into it. Re-attaching
repacks only the blocks whose tensors changed.

T5 / CLIP / the VAE are not changed by any layer: `build_text_encoder` & co. return the shared
object. A file rewritten on disk (new size or mtime) is a new key, so a stale model is never
served; a part built from another spec replaces the cached one (one of each at a time).

A host's memory manager (ComfyUI's, through `nodes/memory.py`) sees the parts through
`register_memory_hooks`: asked before a part is built (to make room), told when one is built and
when one is dropped; it takes a part back with `evict`. An eviction asked while the DiT is leased
is done when the lease ends (a running sampler keeps its weights); the next lease rebuilds it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .spec import ModelSpec, resolve_dtype

__all__ = [
    "lease", "held", "dit_part", "DIT_PARTS", "build_text_encoder", "build_vae", "build_image_encoder", "component_loaded", "clear_cache",
    "dit_fp8_layout", "register_memory_hooks", "evict", "unload_all", "memory_report", "part_bytes",
]  # fmt: skip

_PARTS: dict[str, tuple[tuple, object]] = {}  # part -> (key, built object)
_LOCK = threading.RLock()  # the parts table
_DIT_LOCK = threading.RLock()  # held for a lease's duration
_HELD = threading.local()  # this thread's lease depth per DiT part ({part: depth})
DIT_PARTS = ("dit", "dit_high", "dit_low")  # a Wan2.1 / TI2V DiT; the Wan2.2 A14B experts


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


def _cached(part: str, key: tuple, make, device=None, files=None, runs_on=None):
    """The cached `part` if its key matches, else `make()` (built on `device` from `files`; it
    computes on `runs_on`, default `device`: the memory hooks' view of it)."""
    with _LOCK:
        hit = _PARTS.get(part)
        if hit is not None and hit[0] == key:
            return hit[1]
        replaced = part in _PARTS
        _drop(part)  # free the old one before building the new one
        dev = torch.device(device if device is not None else "cpu")
        _call_hook("before_load", part, dev, _files_bytes(files))
        obj = make()
        _PARTS[part] = (key, obj)
        _call_hook("on_loaded", part, _model_of(obj), torch.device(runs_on) if runs_on is not None else dev)
        if replaced:
            _release_host()  # pinned blocks of the old model the new one did not reuse
        return obj


def _release_host() -> None:
    """After a model is dropped: its packed host buffers are freed with it, but pinned ones go back
    to PyTorch's host allocator cache, not to the OS; hand those back (`layers.offload.host`)."""
    import gc

    from .layers.offload.host import release_host_cache, trim_host_memory

    gc.collect()  # a model in a reference cycle (hooks, the layers' records) is freed now, not later
    release_host_cache()
    trim_host_memory()


def clear_cache() -> None:
    """Forget every cached model (their memory is freed once no one else holds them, and pinned
    host memory of theirs is returned to the OS)."""
    with _DIT_LOCK, _LOCK:
        for part in list(_PARTS):
            _drop(part)
        _release_host()


# ----------------------------------------------------------------------------- memory hooks

_HOOKS: dict[str, object] = {}
_EVICT_AFTER_LEASE: set[str] = set()  # DiT parts to drop when their held lease ends


def register_memory_hooks(*, before_load=None, on_loaded=None, on_released=None) -> None:
    """Let a host's memory manager follow the cached parts ('dit' or the Wan2.2 experts 'dit_high' /
    'dit_low', 't5', 'clip', 'vae'); None
    removes a hook. `before_load(part, device, nbytes)`: a part of about `nbytes` (its files'
    size) is about to be built on `device`, make room; `on_loaded(part, module, device)`: it is
    built (`module`: its torch module); `on_released(part)`: the cache dropped it. Hooks run
    with the cache's lock held and must not build parts; their errors are logged, not raised."""
    _HOOKS.update(before_load=before_load, on_loaded=on_loaded, on_released=on_released)


def _call_hook(name: str, *args) -> None:
    fn = _HOOKS.get(name)
    if fn is not None:
        try:
            fn(*args)
        except Exception:  # a memory manager's failure must not fail the run
            logging.getLogger("wan_core").exception("memory hook %s(%s) failed", name, args[0])


def _drop(part: str) -> None:
    """Forget a cached part (caller holds `_LOCK`); its memory goes once no one else holds it."""
    if _PARTS.pop(part, None) is not None:
        _call_hook("on_released", part)


def _files_bytes(files) -> int:
    """Total size of the files (or folders) a part is built from: the estimate `before_load` gets."""
    if files is None:
        return 0
    if isinstance(files, (tuple, list)):
        return sum(_files_bytes(f) for f in files)
    path = os.fspath(files)
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path) if os.path.isfile(path) else 0


def _model_of(obj) -> torch.nn.Module:
    """The torch module holding a cached part's weights (`WanTextEncoder` keeps it in `.model`)."""
    if isinstance(obj, _DitEntry):
        return obj.model
    return obj if isinstance(obj, torch.nn.Module) else obj.model


def part_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Bytes of a module's parameters and buffers per device ('cpu', 'cuda:0'), each storage once."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, int] = {}
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type == "meta":
            continue
        st = t.untyped_storage()
        ident = (str(t.device), st.data_ptr())
        if ident not in seen:
            seen.add(ident)
            out[str(t.device)] = out.get(str(t.device), 0) + st.nbytes()
    return out


def memory_report() -> dict[str, dict[str, int]]:
    """{part: {device: bytes}} of every cached part."""
    with _LOCK:
        return {part: part_bytes(_model_of(obj)) for part, (_, obj) in _PARTS.items()}


def evict(part: str) -> bool:
    """Drop a cached part so its memory can go (the next use rebuilds it). True when it is gone
    (or was not cached); False for a DiT under a running lease, which is dropped when that
    lease ends: a sampler never loses its weights mid-run."""
    if part in DIT_PARTS:
        if not _DIT_LOCK.acquire(blocking=False):  # another thread's lease
            _EVICT_AFTER_LEASE.add(part)
            return False
        try:
            if _depths().get(part, 0):  # this thread's own lease (a hook called from inside it)
                _EVICT_AFTER_LEASE.add(part)
                return False
            with _LOCK:
                _drop(part)
                _release_host()
        finally:
            _DIT_LOCK.release()
        return True
    with _LOCK:
        _drop(part)
        _release_host()
    return True


def unload_all() -> list[str]:
    """Evict every cached part; returns those dropped now (a leased DiT goes when its lease ends)."""
    with _LOCK:
        parts = list(_PARTS)
    return [p for p in parts if evict(p)]


# ----------------------------------------------------------------------------- the DiT


@dataclass
class _DitEntry:
    """The cached base DiT."""

    model: object
    file_views: dict | None = None  # the checkpoint's tensors, memory-mapped (LoRA originals on a GPU)


_FP8_LAYOUT: dict[tuple, str] = {}  # stamp of a DiT path -> its FP8 layout (file headers only)


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


def _load_base(spec: ModelSpec, fp8: str | None, dt, dev):
    """Read the DiT files once, FP8 linears swapped in when asked (an FP8 file as stored, block
    linears of a high-precision file quantised on load); no layers. An offloaded DiT is read into
    host memory with the host's backends; the layers and `set_attention` below set it up for `dev`."""
    from .layers.fp8_build import load_fp8_dit
    from .loading.dit import load_dit

    path = list(spec.dit) if isinstance(spec.dit, tuple) else spec.dit
    host = spec.offload.cpu_offload
    if host and torch.device(dev).type == "cpu":
        warnings.warn(
            f"CPU offload ({spec.offload.granularity}) on a run whose compute device is the CPU saves no memory; "
            "the offload mechanism runs with a second CPU placement",
            stacklevel=6,  # the caller of the lease
        )
    radial = _radial_options(spec, fp8)
    where = dict(device="cpu", attention="auto") if host else dict(device=dev, attention=spec.attention)
    common = dict(dtype=dt, cross_attention=None if host else spec.cross_attention, task=spec.task, **where)
    if spec.dit_config is not None:  # a DiT file's architecture from its model folder (LightX2V's rule)
        import json

        with open(spec.dit_config, encoding="utf-8") as f:
            common["config"] = json.load(f)
    if fp8 is None:
        model = load_dit(path, **common)
    else:  # on the host: a kernel the host runs; the fp8_kernel layer sets the device's
        model = load_fp8_dit(path, kernel="auto" if host else fp8, quantize=True, **common)
    model.set_residual_dtype(_residual_dtype(spec, fp8))
    if host:  # host placement: backends of the host first (a CUDA-only one would fail there), the real ones now
        model.set_attention(spec.attention, spec.cross_attention, device=dev, radial=radial)
        model.set_block_ops("auto", device=dev)  # the device's block ops (fused on CUDA), as for attention
    elif radial is not None:  # the loaders made radial_attn with its default options
        model.set_attention(spec.attention, spec.cross_attention, device=dev, radial=radial)
    return model


def _residual_dtype(spec: ModelSpec, fp8: str | None) -> torch.dtype:
    """`spec.residual_dtype`, its 'auto' resolved: bf16 for FP8 block linears on a bf16 model (fast
    mode: ComfyUI's and LightX2V's stream, measured 1.4-1.9 % faster at 720p), else float32."""
    if spec.residual_dtype == "auto":
        return torch.bfloat16 if fp8 is not None and spec.torch_dtype == torch.bfloat16 else torch.float32
    return resolve_dtype(spec.residual_dtype, spec.torch_device)


def _radial_options(spec: ModelSpec, fp8: str | None):
    """`spec.radial` when the self-attention is radial_attn (else None: no part of the model), its
    kernel "auto" made the 8-bit one for an FP8 DiT (fast mode) where that runs; None: the defaults."""
    from .kernels.attention import resolve_name
    from .kernels.radial_attention import for_model

    if (spec.radial is None and fp8 is None) or resolve_name(spec.attention, spec.torch_device) != "radial_attn":
        return None
    return for_model(spec.radial, fp8 is not None, spec.torch_device)


def _file_originals(entry: _DitEntry, spec: ModelSpec):
    """For a DiT living on a GPU: the original of a weight a LoRA merges into is its tensor in the
    memory-mapped checkpoint (same dtype, values untouched since load: the cached base is only ever
    changed by LoRAs, which restore their originals), so no host copy is kept. On the CPU the
    loaded weights are already file views (or host tensors) and `apply_loras` keeps them anyway."""
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


def _layers(spec: ModelSpec, entry: _DitEntry, kernel_choice: str | None, compile: bool, dev: str) -> list:
    """The weight layers of `spec`, in `wan_core.layers.stack.ORDER`."""
    from .layers.compile import CompileLayer
    from .layers.fp8 import Fp8KernelLayer
    from .layers.lora_sync import LoraLayer, WantedLora
    from .layers.offload import OffloadLayer

    out = [Fp8KernelLayer(kernel_choice, dev)] if kernel_choice is not None else []
    if compile:
        out.append(CompileLayer())
    wanted = tuple(WantedLora(_stamp(p), os.fspath(p), float(s)) for p, s in spec.loras)
    out.append(LoraLayer(wanted, spec.lora_mode, _file_originals(entry, spec)))
    out.append(OffloadLayer(spec.offload, dev))
    return out


def _depths() -> dict[str, int]:
    """This thread's lease depth per DiT part."""
    if not hasattr(_HELD, "depths"):
        _HELD.depths = {}
    return _HELD.depths


def dit_part(spec: ModelSpec) -> str:
    """The cache part a spec's DiT lives in: 'dit', or 'dit_high' / 'dit_low' for a Wan2.2 expert."""
    return "dit" if spec.expert is None else f"dit_{spec.expert}"


def _drop_other_family(part: str) -> None:
    """A plain DiT and an expert pair do not share the cache: leasing one drops the other's parts
    (caller holds `_DIT_LOCK`; parts under a lease of this thread are kept)."""
    held = {p for p, d in _depths().items() if d}
    others = ("dit_high", "dit_low") if part == "dit" else ("dit",)
    with _LOCK:
        dropped = [p for p in others if p in _PARTS and p not in held]
        for p in dropped:
            _drop(p)
        if dropped:
            _release_host()


@contextlib.contextmanager
def lease(spec: ModelSpec) -> Iterator[torch.nn.Module]:
    """The DiT of `spec`, brought to its FP8 kernel, LoRAs and offload, for the `with` block.

    The model is shared: keep it (and anything computed lazily from it) inside the block. Another
    thread's lease waits for this one to end; a lease nested in this thread's held one of the same
    part must ask for the same model state (else RuntimeError: the outer holder would see its
    weights change). The two Wan2.2 experts are two parts (`spec.expert`), leased together:
    `with lease(high) as hi, lease(low) as lo:`.
    """
    from .layers.compile import should_compile
    from .layers.fp8 import resolve_kernel
    from .layers.stack import apply_layers

    dev, dt = spec.torch_device, spec.torch_dtype
    if spec.lora_mode not in ("auto", "merge", "branch"):
        raise ValueError(f"lora_mode must be 'auto', 'merge' or 'branch', got {spec.lora_mode!r}")
    fp8 = _fp8_choice(spec)
    if fp8 is not None:
        resolve_kernel(fp8, dev)  # a kernel this device lacks fails before anything is read
    compile = should_compile(spec.compile, dev)
    o = spec.offload  # the DiT's part of it (T5 / CLIP / VAE flags are theirs)
    offload = (o.granularity, o.vram_budget_gb, o.resident_blocks, o.prefetch)
    key = (_stamp(spec.dit), _stamp(spec.dit_config), spec.task, dt, dev, spec.attention, spec.cross_attention,
           _radial_options(spec, fp8), fp8 is not None, compile, offload, _residual_dtype(spec, fp8))  # fmt: skip
    part = dit_part(spec)
    with _DIT_LOCK:
        depths = _depths()
        depth = depths.get(part, 0)
        with torch.inference_mode(False), torch.no_grad():
            if depth:
                hit = _PARTS.get(part)
                if hit is None or hit[0] != key:
                    raise RuntimeError("a lease of another DiT is held by this thread; end it before leasing this one")
                layers = _layers(spec, hit[1], fp8, compile, dev)
                if any(layer.needed(hit[1].model) for layer in layers):
                    raise RuntimeError(
                        "a lease of this DiT with other LoRAs / FP8 kernel is held by this thread; end it first"
                    )
                entry = hit[1]
            else:
                _drop_other_family(part)
                build_dev = "cpu" if o.cpu_offload else dev
                entry = _cached(part, key, lambda: _DitEntry(_load_base(spec, fp8, dt, dev)), build_dev, spec.dit, dev)
                apply_layers(entry.model, _layers(spec, entry, fp8, compile, dev))
        depths[part] = depth + 1
        try:
            yield entry.model
        finally:
            depths[part] = depth
            if not depth and part in _EVICT_AFTER_LEASE:  # asked for while the lease ran
                _EVICT_AFTER_LEASE.discard(part)
                with _LOCK:
                    _drop(part)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """No lease can start or change the DiT inside: for taking a per-run layer off a model an
    earlier lease handed out (`WanPipeline.close`), without building anything."""
    with _DIT_LOCK:
        yield


# ----------------------------------------------------------------------------- T5, CLIP, VAE


def component_loaded(obj, spec: ModelSpec, part: str):
    """Context manager: T5 ('t5'), CLIP ('clip') or the VAE ('vae') on the compute device for one
    stage when `spec` offloads it (`wan_core.layers.offload.offload_component`), else as it is."""
    off = spec.offload
    flag = {"t5": off.text_encoder, "clip": off.image_encoder, "vae": off.vae}[part]
    if not flag or obj is None:
        return contextlib.nullcontext(obj)
    from .layers.offload import offload_component

    return offload_component(obj, spec.torch_device)


def _part_device(spec: ModelSpec, offloaded: bool) -> str:
    """Where a component is built: the host when it is offloaded, else the compute device."""
    return "cpu" if offloaded else spec.torch_device


@_normal_tensors
def build_text_encoder(spec: ModelSpec):
    """The umT5 text encoder (with its tokenizer) of `spec`, cached."""
    from .loading.t5 import load_text_encoder

    if not spec.t5:
        raise ValueError("this ModelSpec names no T5 text encoder file")
    off = spec.offload.text_encoder
    dev, dt = _part_device(spec, off), spec.torch_dtype
    key = (_stamp(spec.t5), _stamp(spec.tokenizer), dt, dev, spec.text_len, off)
    return _cached(
        "t5",
        key,
        lambda: load_text_encoder(spec.t5, spec.tokenizer, dtype=dt, device=dev, text_len=spec.text_len),
        dev,
        spec.t5,
    )


@_normal_tensors
def build_vae(spec: ModelSpec):
    """The VAE of `spec`, cached: the Wan2.1 VAE, or the Wan2.2 VAE (z 48) when the file is one."""
    from .loading.vae import load_vae
    from .loading.vae22 import is_wan22_vae, load_vae22

    if not spec.vae:
        raise ValueError("this ModelSpec names no VAE file")
    off = spec.offload.vae
    dev, dt = _part_device(spec, off), spec.torch_vae_dtype
    key = (_stamp(spec.vae), dt, dev, off)
    def build():  # the file's header read on a cache miss only
        return (load_vae22 if is_wan22_vae(spec.vae) else load_vae)(spec.vae, dtype=dt, device=dev)

    return _cached("vae", key, build, dev, spec.vae)


@_normal_tensors
def build_image_encoder(spec: ModelSpec):
    """The CLIP image encoder of `spec` (I2V), cached."""
    from .loading.clip import load_image_encoder

    if not spec.clip:
        raise ValueError("this ModelSpec names no CLIP image encoder file")
    off = spec.offload.image_encoder
    dev, dt = _part_device(spec, off), spec.torch_dtype
    key = (_stamp(spec.clip), dt, dev, off)
    return _cached("clip", key, lambda: load_image_encoder(spec.clip, dtype=dt, device=dev), dev, spec.clip)
