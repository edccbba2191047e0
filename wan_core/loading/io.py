"""Reading tensors from disk without a second copy in RAM.

Every loader in `wan_core.loading` goes through these functions, so the rules live in one
place: safetensors are memory-mapped (`safe_open`), `.pth` pickles are opened only with
`torch.load(weights_only=True, mmap=True)` (never full unpickling), and a bad or truncated
file becomes a `CheckpointError` naming the file instead of a deep stack trace.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch

from ..models.errors import CheckpointError

__all__ = ["CheckpointError", "read_state_dict", "read_keys", "read_metadata", "expand_paths"]

_SAFETENSORS = (".safetensors", ".sft")
_PICKLES = (".pth", ".pt", ".bin", ".ckpt")


def expand_paths(path: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Turn a file, a sharded-safetensors index, or a list of files into a list of files.

    A `*.safetensors.index.json` expands to the shard files named in its `weight_map`.
    """
    if isinstance(path, (str, os.PathLike)):
        path = os.fspath(path)
        if path.endswith(".index.json"):
            try:
                with open(path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, KeyError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors index ({e})") from e
            folder = os.path.dirname(path)
            return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
        return [path]
    out: list[str] = []
    for p in path:
        out.extend(expand_paths(p))
    return out


def _check_exists(path: str) -> None:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")


def read_state_dict(path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of one file (or shards/index/list), memory-mapped where the format allows.

    safetensors tensors returned on the CPU are views of the mapped file: nothing is copied
    until the caller converts or moves them.
    """
    out: dict[str, torch.Tensor] = {}
    for p in expand_paths(path):
        _check_exists(p)
        if p.endswith(_SAFETENSORS):
            from safetensors import safe_open

            try:
                with safe_open(p, framework="pt", device=str(device)) as f:
                    for k in f.keys():
                        out[k] = f.get_tensor(k)
            except Exception as e:  # safetensors raises its own error types for truncated headers/data
                raise CheckpointError(f"{p}: not a valid safetensors file ({type(e).__name__}: {e})") from e
        elif p.endswith(_PICKLES):
            try:
                sd = torch.load(p, map_location=device, weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(
                    f"{p}: could not be read as a weights-only PyTorch state dict ({type(e).__name__}: {e})"
                ) from e
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise CheckpointError(f"{p}: does not hold a flat state dict of tensors")
            out.update(sd)
        else:
            raise CheckpointError(f"{p}: unknown checkpoint extension (expected .safetensors or .pth)")
    return out


def read_keys(path) -> dict[str, tuple[list[int], str]]:
    """Names -> (shape, dtype string) without reading tensor data (safetensors header only)."""
    out: dict[str, tuple[list[int], str]] = {}
    for p in expand_paths(path):
        _check_exists(p)
        if p.endswith(_SAFETENSORS):
            from safetensors import safe_open

            try:
                with safe_open(p, framework="pt") as f:
                    for k in f.keys():
                        sl = f.get_slice(k)
                        out[k] = (list(sl.get_shape()), sl.get_dtype())
            except Exception as e:
                raise CheckpointError(f"{p}: not a valid safetensors file ({type(e).__name__}: {e})") from e
        else:
            for k, v in read_state_dict(p).items():
                out[k] = (list(v.shape), str(v.dtype))
    return out


def read_metadata(path) -> dict[str, str]:
    """The safetensors `__metadata__` header of a file (empty for other formats)."""
    p = expand_paths(path)[0]
    _check_exists(p)
    if not p.endswith(_SAFETENSORS):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(p, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"{p}: not a valid safetensors file ({type(e).__name__}: {e})") from e
