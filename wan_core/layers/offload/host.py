"""Host memory of the offload package: what it holds, and giving it back when a model goes.

Every packed host buffer (`pack.pack_groups`) is registered here by a weak reference to its
storage, so `packed_host_bytes()` counts the buffers still alive: the bytes a process would get
back by dropping its offloaded models. The count is ours, not the allocator's: on CUDA the
buffers are pinned and come from PyTorch's caching host allocator, which keeps a freed pinned
block cached for the next request instead of returning it to the OS. So when a model is
unloaded, `release_host_cache()` hands those cached blocks back (`torch.accelerator.
empty_host_cache`); without it the pinned memory of an evicted 14B DiT would stay with the
process (pinned pages cannot be swapped).

`trim_host_memory()` is glibc's `malloc_trim(0)`: a whole run frees many MiB of small CPU
tensors and Python objects scattered over malloc arenas, and glibc keeps the free pages mapped;
trimming after a run returns them, which keeps RSS flat across runs (benchmarks/soak.py;
without it a CPU run with block offload swings by up to 125 MiB from run to run, and the
headless node graph keeps 10 MiB more after a few runs). `WanPipeline.generate` and
`api.decode_video` (the last engine stage of a node graph) call it once at their end.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

import torch
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["register_packed", "packed_host_bytes", "release_host_cache", "trim_host_memory"]

_LIVE: list[tuple[StorageWeakRef, int, bool]] = []  # (storage, bytes, pinned) of every packed buffer
_LOCK = threading.Lock()


def register_packed(buf: torch.Tensor, pinned: bool) -> None:
    """Count `buf` (a packed host buffer) until its storage is freed."""
    with _LOCK:
        _prune()
        _LIVE.append((StorageWeakRef(buf.untyped_storage()), buf.untyped_storage().nbytes(), pinned))


def _prune() -> None:
    _LIVE[:] = [e for e in _LIVE if not e[0].expired()]


def packed_host_bytes(pinned: bool | None = None) -> int:
    """Bytes of packed host buffers still alive (pinned only, unpinned only, or all: None)."""
    with _LOCK:
        _prune()
        return sum(n for _, n, p in _LIVE if pinned is None or p == pinned)


def release_host_cache() -> None:
    """Return the pinned blocks PyTorch's host allocator caches to the OS (a no-op without CUDA).
    Call it after dropping offloaded models: blocks still in use are not touched."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    empty = getattr(torch.accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:  # torch >= 2.9 / older builds' private name
        empty()


_LIBC = None
TRIM = True  # False: trim_host_memory does nothing (benchmarks/soak.py --no-trim measures without)


def trim_host_memory() -> bool:
    """glibc `malloc_trim(0)`: free pages of the malloc heap go back to the OS. False where there
    is no glibc (macOS, Windows, musl) or TRIM is off: nothing is done."""
    global _LIBC
    if not TRIM:
        return False
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True
