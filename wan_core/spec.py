"""Describe a model, then build it: `ModelSpec` (picklable, hashable) and a per-process cache.

The ComfyUI loader nodes return a spec rather than a model, and the multi-GPU sampler sends a
spec to its worker processes, which build (memory-map) the weights themselves. Building the
same spec twice in one process returns the same objects, so a graph re-run or a second node
asking for the same files costs nothing. A file rewritten on disk (new size or mtime) is a new
key, so a stale model is never served.

Memory: a cached part is replaced when the same part (DiT, T5, VAE, CLIP) is built from a
different spec, so at most one of each lives in the cache at a time; `clear_cache()` drops all.

Optional features (FP8, LoRA, offload) have reserved fields here; they are applied in
`build_dit` after the model is built, when those features exist.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass

import torch

__all__ = ["ModelSpec", "build_dit", "build_text_encoder", "build_vae", "build_image_encoder", "clear_cache", "resolve_dtype", "resolve_device"]

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
    `vae_dtype` defaults to `dtype`. Reserved for later features (must stay at their defaults
    until those land): `fp8` (a quantization scheme name), `loras` ((path, strength) pairs),
    `offload` (an offload granularity).
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
    offload: str | None = None

    def __post_init__(self):
        if self.task not in ("t2v", "i2v"):
            raise ValueError(f"task must be 't2v' or 'i2v', got {self.task!r}")
        if isinstance(self.dit, list):
            object.__setattr__(self, "dit", tuple(self.dit))
        if isinstance(self.loras, list):
            object.__setattr__(self, "loras", tuple((str(p), float(s)) for p, s in self.loras))

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


def _not_yet(spec: ModelSpec) -> None:
    from .options import FeatureNotAvailable

    for field, value, default, feature in (
        ("fp8", spec.fp8, None, "FP8 weights"),
        ("loras", spec.loras, (), "LoRA"),
        ("offload", spec.offload, None, "CPU offload"),
    ):
        if value != default:
            raise FeatureNotAvailable(f"ModelSpec.{field}={value!r}: {feature} is not available yet in wan_core")


def build_dit(spec: ModelSpec):
    """The DiT of `spec`, cached."""
    from .loading.dit import load_dit

    _not_yet(spec)
    dev, dt = spec.torch_device, spec.torch_dtype
    key = (_stamp(spec.dit), spec.task, dt, dev, spec.attention, spec.cross_attention, spec.fp8, spec.loras, spec.offload)
    path = list(spec.dit) if isinstance(spec.dit, tuple) else spec.dit
    return _cached(
        "dit",
        key,
        lambda: load_dit(path, dtype=dt, device=dev, attention=spec.attention, cross_attention=spec.cross_attention, task=spec.task),
    )


def build_text_encoder(spec: ModelSpec):
    """The umT5 text encoder (with its tokenizer) of `spec`, cached."""
    from .text_encoder import WanTextEncoder

    if not spec.t5:
        raise ValueError("this ModelSpec names no T5 text encoder file")
    dev, dt = spec.torch_device, spec.torch_dtype
    key = (_stamp(spec.t5), _stamp(spec.tokenizer), dt, dev, spec.text_len)
    return _cached(
        "t5",
        key,
        lambda: WanTextEncoder.from_files(spec.t5, spec.tokenizer, dtype=dt, device=dev, text_len=spec.text_len),
    )


def build_vae(spec: ModelSpec):
    """The Wan2.1 VAE of `spec`, cached."""
    from .vae import WanVAE

    if not spec.vae:
        raise ValueError("this ModelSpec names no VAE file")
    dev, dt = spec.torch_device, spec.torch_vae_dtype
    return _cached("vae", (_stamp(spec.vae), dt, dev), lambda: WanVAE.from_file(spec.vae, dtype=dt, device=dev))


def build_image_encoder(spec: ModelSpec):
    """The CLIP image encoder of `spec` (I2V), cached."""
    from .image_encoder import WanImageEncoder

    if not spec.clip:
        raise ValueError("this ModelSpec names no CLIP image encoder file")
    dev, dt = spec.torch_device, spec.torch_dtype
    return _cached("clip", (_stamp(spec.clip), dt, dev), lambda: WanImageEncoder.from_file(spec.clip, dtype=dt, device=dev))
