"""A module's tensors packed into one contiguous host buffer, so that moving them is one copy.

Offload moves weights between host and device many times per run (block offload: every block
on every forward). Copying a block tensor by tensor would issue ~20 small copies and leave the
caching allocator to juggle ~20 allocations; packed, a block is one `copy_` of one byte range,
into a device buffer (a ring slot) that is allocated once.

How it works: every parameter and buffer of a group gets a byte range in one `uint8` host
buffer (each range aligned to `ALIGN` bytes, so typed views into it are aligned for vectorised
kernels and for inductor's alignment assumption). The tensors' `.data` is then pointed at typed
views of that buffer; the host buffer is the master copy of the weights. Loading onto a device
is one copy of the buffer plus pointing `.data` at the same typed views of the device copy;
unloading is pointing `.data` back at the host views (no copy back: weights are read-only while
offloaded). Bytes are bytes: FP8 weights stay FP8, LoRA branch parameters travel like the rest.

Pinned host memory: `torch.empty(..., pin_memory=True)` goes through PyTorch's caching host
allocator, which rounds every request up to a power of two; one 0.65 GiB block per allocation
would pin 1 GiB. So groups are packed side by side into power-of-two slabs whose size is picked
to waste the least (three bf16 14B blocks per 2 GiB slab: 2 % waste).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain

import torch
import torch.nn as nn

from .host import register_packed

__all__ = ["ALIGN", "TensorGroup", "module_tensors", "pack_groups", "can_pin"]

ALIGN = 512  # byte alignment of every tensor inside a packed buffer


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def can_pin(device: torch.device) -> bool:
    """Pinned host memory makes host->device copies asynchronous; it needs a CUDA device."""
    return device.type == "cuda" and torch.cuda.is_available()


def module_tensors(module: nn.Module, skip_prefix: str | None = None) -> list[torch.Tensor]:
    """Every parameter and buffer of `module` (each tensor object once), in registration order.

    skip_prefix: leave out the tensors whose qualified name starts with it (the model's
    `blocks.` when packing the non-block rest).
    """
    seen: set[int] = set()
    out = []
    for name, t in chain(module.named_parameters(), module.named_buffers()):
        if t is None or id(t) in seen or (skip_prefix and name.startswith(skip_prefix)):
            continue
        seen.add(id(t))
        out.append(t)
    return out


class TensorGroup:
    """The tensors of one offload unit (a block, the non-block rest, a chunk of an encoder)."""

    def __init__(self, tensors: Sequence[torch.Tensor], name: str):
        self.name = name
        self.tensors = list(tensors)
        self.dtypes = [t.dtype for t in self.tensors]
        self.shapes = [tuple(t.shape) for t in self.tensors]
        self.offsets: list[int] = []
        off = 0
        for t in self.tensors:
            self.offsets.append(off)
            off = _align(off + t.numel() * t.element_size())
        self.nbytes = off
        self.host: torch.Tensor | None = None  # uint8 [nbytes], the master copy
        self.host_views: list[torch.Tensor] = []
        self.current: list[torch.Tensor] = []  # the views the tensors were last pointed at

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of this group's tensors inside `buf` (a uint8 buffer laid out like `host`)."""
        out = []
        for o, dt, shape in zip(self.offsets, self.dtypes, self.shapes):
            n = _numel(shape) * _itemsize(dt)
            out.append(buf[o : o + n].view(dt).view(shape))  # bytes -> [numel] of dt -> shape
        return out

    def attach(self, views: Iterable[torch.Tensor]) -> None:
        """Point every tensor's `.data` at `views` (device copies, or `host_views` to unload)."""
        self.current = list(views)
        for t, v in zip(self.tensors, self.current):
            t.data = v

    def same_tensors(self, tensors: Sequence[torch.Tensor]) -> bool:
        return len(tensors) == len(self.tensors) and all(a is b for a, b in zip(tensors, self.tensors))

    def absorb(self) -> bool:
        """Adopt values written by replacing a tensor's `.data` since the last `attach` (a LoRA merge).

        A replacement of the same dtype and shape is copied into the host master, wherever it
        lives; returns False if some tensor changed dtype or shape (the group must be repacked).
        In-place writes into device copies are not seen: weights are read-only while loaded.
        """
        ok = True
        for i, (t, cur) in enumerate(zip(self.tensors, self.current)):
            if t.data_ptr() == cur.data_ptr() and t.dtype == cur.dtype and t.shape == cur.shape:
                continue
            if t.dtype == self.dtypes[i] and tuple(t.shape) == self.shapes[i]:
                self.host_views[i].copy_(t.detach())
                self.current[i] = t.data  # until the next attach
            else:
                ok = False
        return ok

    # ---- packing ----------------------------------------------------------------------------
    def try_reuse(self, pin: bool) -> bool:
        """Adopt the host buffer the tensors already live in, if they are laid out exactly as packed
        (a model that was offloaded before, e.g. after `remove()`): no copy, no new pinned memory."""
        if not self.tensors:
            self._set_host(torch.empty(0, dtype=torch.uint8))
            return True
        first = self.tensors[0]
        if first.device.type != "cpu":
            return False
        storage = first.untyped_storage()
        base = first.storage_offset() * first.element_size()
        if base % ALIGN or (pin and not first.is_pinned()) or storage.nbytes() < base + self.nbytes:
            return False
        for t, o in zip(self.tensors, self.offsets):
            if (
                t.device.type != "cpu"
                or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != storage.data_ptr()
                or t.storage_offset() * t.element_size() != base + o
            ):
                return False
        host = torch.empty(0, dtype=torch.uint8).set_(storage, base, (self.nbytes,), (1,))
        self._set_host(host)
        return True

    def fill(self, region: torch.Tensor) -> None:
        """Copy the tensors into `region` (uint8 [nbytes] of a slab) and make it their home.

        Each tensor's old storage is released as soon as nothing else holds it, so packing a model
        needs about one slab of extra memory, not a second model.
        """
        views = self.views(region)
        for t, v in zip(self.tensors, views):
            v.copy_(t.detach())
            t.data = v
        self.host, self.host_views, self.current = region, views, list(views)

    def _set_host(self, host: torch.Tensor) -> None:
        self.host = host
        self.host_views = self.views(host)
        self.attach(self.host_views)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dt: torch.dtype) -> int:
    return torch.empty(0, dtype=dt).element_size()


def _slab_plan(sizes: list[int], pin: bool) -> list[tuple[list[int], int]]:
    """Split groups (by index, in order) into slabs: [(group indices, slab bytes)].

    Unpinned memory is allocated exactly, one slab per group. Pinned memory comes from the
    power-of-two caching allocator: try every power-of-two slab size from the largest group up
    and keep the one that allocates the fewest bytes (the last slab shrinks to the power of two
    that holds what is left).
    """
    if not pin:
        return [([i], s) for i, s in enumerate(sizes)]

    def pow2(n: int) -> int:
        return 1 << max(n - 1, 0).bit_length()

    best: list[tuple[list[int], int]] = []
    best_total = None
    lo, hi = pow2(max(sizes)), pow2(sum(sizes))
    slab = lo
    while slab <= hi:
        plan, cur, used = [], [], 0
        for i, s in enumerate(sizes):
            if used + s > slab and cur:
                plan.append((cur, slab))
                cur, used = [], 0
            cur.append(i)
            used += s
        if cur:
            plan.append((cur, pow2(used)))
        total = sum(b for _, b in plan)
        if best_total is None or total < best_total:
            best, best_total = plan, total
        slab *= 2
    return best


def pack_groups(groups: Sequence[TensorGroup], pin: bool) -> int:
    """Give every group a host buffer (reusing the one it already lives in when possible).

    Returns the number of host bytes newly allocated.
    """
    for g in groups:
        if any(t.device.type == "meta" for t in g.tensors):
            raise ValueError(f"{g.name}: cannot offload tensors on the meta device (load the weights first)")
    todo = [g for g in groups if not g.try_reuse(pin)]
    if not todo:
        return 0
    allocated = 0
    for idx, slab_bytes in _slab_plan([g.nbytes for g in todo], pin):
        slab = torch.empty(slab_bytes, dtype=torch.uint8, pin_memory=pin)
        register_packed(slab, pin)  # counted until the last view of it is gone (host.py)
        allocated += slab_bytes
        off = 0
        for i in idx:
            g = todo[i]
            g.fill(slab[off : off + g.nbytes])
            off += g.nbytes
    return allocated
