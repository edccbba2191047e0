"""Describe a model, then build it: `ModelSpec`, picklable and hashable.

The ComfyUI loader nodes return a spec rather than a model, and the multi-GPU sampler sends a
spec to its worker processes, which build (memory-map) the weights themselves. Models are built
and kept by `wan_core.model_cache` (the DiT leased to each run: `with model_cache.lease(spec)`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from .kernels.radial_attention import RadialOptions
from .layers.offload import OffloadOptions

__all__ = ["ModelSpec", "OffloadOptions", "resolve_dtype", "resolve_device"]

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


# the residual stream's dtypes (any of their spellings in _DTYPES), by their canonical names
_RESIDUALS = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def residual_name(value: str | torch.dtype) -> str:
    """A residual-stream dtype in any spelling `resolve_dtype` reads -> 'auto', 'float32' or
    'bfloat16'; ValueError for anything else (float16 included)."""
    if value == "auto":
        return "auto"
    try:  # None is no spelling here (resolve_dtype would read it as 'auto' on the CPU: float32)
        residual = None if value is None else _RESIDUALS.get(resolve_dtype(value, "cpu"))
    except ValueError:
        residual = None
    if residual is None:
        raise ValueError(f"residual_dtype must be one of ['auto', 'float32', 'bfloat16'] (or fp32, bf16), got {value!r}")
    return residual


@dataclass(frozen=True)
class ModelSpec:
    """Which files make up a Wan model (Wan2.1, a Wan2.2 expert, TI2V-5B) and how to build them.

    Paths are plain strings (a DiT may be a folder, a file, a shard index or a tuple of shards);
    `dtype` is the compute dtype of the DiT, T5 and CLIP ('auto': bf16 on GPU, fp32 on CPU);
    `vae_dtype` defaults to `dtype`.
    fp8: FP8 kernel or LightX2V scheme for the DiT's block linears ('auto', 'scaled_mm', 'sgl',
    'dequant', 'fp8-sgl', ... see `wan_core.layers.fp8`): an FP8 file is used as stored, a bf16 one is
    quantised on load. None: high precision, except that a DiT file stored in FP8 runs as FP8 ('auto').
    loras: ((path, strength), ...) applied in order; lora_mode: 'auto' (merge into high-precision
    weights, low-rank branch beside FP8 linears), 'merge' or 'branch' (`wan_core.layers.lora`).
    compile: regional torch.compile of the blocks ('auto': on CUDA).
    radial: the options of the `radial_attn` self-attention (`wan_core.kernels.radial_attention.RadialOptions`:
    decay_factor, dense_layers, dense_timesteps, kernel); None: its defaults. Only read when `attention` is
    radial_attn; with FP8 linears its kernel "auto" is the 8-bit sparse kernel (fast mode).
    residual_dtype: the residual stream between the DiT's blocks: 'float32' (the official model's),
    'bfloat16' (ComfyUI's and LightX2V's; half the memory traffic of the passes between the matmuls)
    or 'auto': bfloat16 when the block linears run in FP8 on a bf16 model (fast mode), else float32.
    offload: CPU offload of the DiT and the other parts (`wan_core.layers.offload.OffloadOptions`);
    a granularity string ('model', 'block', 'phase') or None is taken as `OffloadOptions(granularity)`.
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
    radial: RadialOptions | None = None
    text_len: int = 512
    fp8: str | None = None
    loras: tuple[tuple[str, float], ...] = ()
    lora_mode: str = "auto"
    offload: OffloadOptions = OffloadOptions()
    compile: bool | str = "auto"
    residual_dtype: str = "auto"
    # the DiT's architecture (a config.json path) for a DiT given as one file: LightX2V takes it from model_path
    dit_config: str | None = None
    # a Wan2.2 A14B expert: "high" / "low" (its own cache slot, `model_cache.dit_part`); None: a single DiT
    expert: str | None = None

    def __post_init__(self):
        if self.task not in ("t2v", "i2v", "ti2v"):
            raise ValueError(f"task must be 't2v', 'i2v' or 'ti2v', got {self.task!r}")
        if self.expert not in (None, "high", "low"):
            raise ValueError(f"expert must be 'high', 'low' or None, got {self.expert!r}")
        if not isinstance(self.offload, OffloadOptions):
            if self.offload is not None and not isinstance(self.offload, str):
                raise TypeError(f"offload must be an OffloadOptions or a granularity, got {type(self.offload).__name__}")
            object.__setattr__(self, "offload", OffloadOptions(granularity=self.offload))
        if self.radial is not None and not isinstance(self.radial, RadialOptions):
            raise TypeError(f"radial must be a RadialOptions, got {type(self.radial).__name__}")
        object.__setattr__(self, "residual_dtype", residual_name(self.residual_dtype))
        if self.lora_mode not in ("auto", "merge", "branch"):
            raise ValueError(f"lora_mode must be 'auto', 'merge' or 'branch', got {self.lora_mode!r}")
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
