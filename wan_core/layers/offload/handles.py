"""The offload mechanisms, attached to a built model by hooks (DESIGN.md principle 3).

`ModelOffload` (granularity "model"): the whole module lives in pinned host memory and is
copied onto the device for a stage (the DiT for the denoising loop, an encoder or the VAE for
its call) and dropped after; `load()`, `unload()` and the `loaded()` context manager.

`BlockOffload` (granularity "block"): the non-block weights (embeddings, head) and the first
`resident_blocks` blocks are copied to the device for the run; every other block lives in pinned
host memory and streams through a ring of `prefetch + 1` preallocated device slots: while block
k runs in its slot, blocks k+1..k+prefetch are copied into the next slots on a side stream. A
block's forward pre-hook waits for its copy and points its tensors at the slot; its forward hook
points them back at the host copy and marks the slot free. At most `resident_blocks + 1` blocks
have their tensors on the device at any time, and the ring holds at most `prefetch + 1` blocks.

Both keep the host copy as the master: unloading is pointing `.data` back (no device->host
copy). Weights are therefore read-only while loaded; changes made while unloaded (a LoRA merged
in place, a tensor replaced) are picked up at the next `load()`. The hooks are excluded from
torch.compile (`torch.compiler.disable`), so regionally compiled blocks keep one graph: the
compiled forward only ever sees device tensors of the same shapes and dtypes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn as nn

from ..stack import layer_state
from .budget import OffloadPlan
from .pack import TensorGroup, can_pin, module_tensors, pack_groups
from .streams import make_copier

__all__ = ["OffloadHandle", "ModelOffload", "BlockOffload", "offload_component", "CHUNK_BYTES"]

CHUNK_BYTES = 512 * 2**20  # group size when a module without `blocks` (an encoder, the VAE) is packed


def _blocks(module: nn.Module) -> nn.ModuleList | None:
    blocks = getattr(module, "blocks", None)
    return blocks if isinstance(blocks, nn.ModuleList) and len(blocks) else None


def _chunks(module: nn.Module) -> list[list[torch.Tensor]]:
    out: list[list[torch.Tensor]] = [[]]
    size = 0
    for t in module_tensors(module):
        if out[-1] and size + t.numel() * t.element_size() > CHUNK_BYTES:
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.numel() * t.element_size()
    return out


@contextmanager
def _normal_tensors():
    """Host packs, views and device copies are made as normal tensors even when the caller runs
    inside `torch.inference_mode` (ComfyUI runs every node so): an inference tensor attached as a
    parameter would fail the next time the module runs outside that mode ("Inference tensors do
    not track version counter"). No autograd graph either way."""
    with torch.inference_mode(False), torch.no_grad():
        yield


class OffloadHandle:
    """What `enable_offload` returns: the offload attached to one module."""

    granularity = ""

    def __init__(self, module: nn.Module, device: str | torch.device):
        if layer_state(module).offload is not None:
            raise RuntimeError("this module is already offloaded: call .remove() on its handle first")
        self.module = module
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.pin = can_pin(self.device)
        self._loaded = False
        self._hooks: list = []
        self.groups: list[TensorGroup] = []
        self.rest: TensorGroup | None = None
        self.block_groups: list[TensorGroup] = []
        with _normal_tensors():
            self._build_groups()
            self.host_bytes_allocated = pack_groups(self.groups, self.pin)
        layer_state(module).offload = self
        self.stats = {"loads": 0, "block_copies": 0, "bytes_copied": 0}

    # ---- groups -----------------------------------------------------------------------------
    def _current_tensors(self) -> list[list[torch.Tensor]]:
        blocks = _blocks(self.module)
        if blocks is not None:
            return [module_tensors(self.module, skip_prefix="blocks.")] + [module_tensors(b) for b in blocks]
        return _chunks(self.module)

    def _build_groups(self) -> None:
        tensors = self._current_tensors()
        blocks = _blocks(self.module)
        if blocks is not None:
            self.rest = TensorGroup(tensors[0], "non-block weights")
            self.block_groups = [TensorGroup(t, f"blocks.{i}") for i, t in enumerate(tensors[1:])]
            self.groups = [self.rest, *self.block_groups]
        else:
            self.groups = [TensorGroup(t, f"chunk {i}") for i, t in enumerate(tensors)]

    def _refresh(self) -> None:
        """Before a load: take in what changed while unloaded. Replaced tensors of the same dtype and
        shape are copied into the host master; added, removed or re-typed tensors repack their group."""
        with _normal_tensors():
            self._refresh_groups()

    def _refresh_groups(self) -> None:
        tensors = self._current_tensors()
        if len(tensors) != len(self.groups):
            raise RuntimeError(
                f"the module's structure changed after offload was enabled ({len(self.groups)} groups, now "
                f"{len(tensors)}): call handle.remove(), change the model, then enable offload again"
            )
        stale = []
        for i, (g, t) in enumerate(zip(self.groups, tensors)):
            if not g.same_tensors(t) or not g.absorb():
                stale.append(i)
            else:
                g.attach(g.host_views)
        if not stale:
            return
        for i in stale:
            self.groups[i] = TensorGroup(tensors[i], self.groups[i].name)
        if self.block_groups:
            self.rest, self.block_groups = self.groups[0], self.groups[1:]
        self.host_bytes_allocated += pack_groups([self.groups[i] for i in stale], self.pin)

    def _release(self) -> None:
        """Point every tensor back at its host copy, first adopting values replaced while loaded."""
        with _normal_tensors():
            self._release_groups()

    def _release_groups(self) -> None:
        for g in self.groups:
            if g.absorb():
                g.attach(g.host_views)
            # else: a tensor changed dtype/shape; it stays as it is and the next load repacks the group

    # ---- public -----------------------------------------------------------------------------
    @property
    def is_loaded(self) -> bool:
        return self._loaded

    @property
    def host_bytes(self) -> int:
        return sum(g.nbytes for g in self.groups)

    def load(self) -> None:
        raise NotImplementedError

    def unload(self) -> None:
        raise NotImplementedError

    def device_bytes(self) -> int:
        """Device memory this handle's weights take while loaded (the ring included)."""
        raise NotImplementedError

    @contextmanager
    def loaded(self) -> Iterator[nn.Module]:
        """Weights on the device inside, released after: wrap a stage (the denoising loop) in it."""
        self.load()
        try:
            yield self.module
        finally:
            self.unload()

    def remove(self) -> None:
        """Detach the offload: weights back in (pinned) host memory, hooks gone. Idempotent."""
        self.unload()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        st = layer_state(self.module)
        if st.offload is self:
            st.offload = None

    def _device_copy(self, g: TensorGroup) -> torch.Tensor:
        buf = torch.empty(g.nbytes, dtype=torch.uint8, device=self.device)
        buf.copy_(g.host, non_blocking=True)
        return buf


class ModelOffload(OffloadHandle):
    """The whole module on the device while loaded; a forward while unloaded loads it."""

    granularity = "model"

    def __init__(self, module: nn.Module, device: str | torch.device = "cuda", hook: bool = True):
        super().__init__(module, device)
        self._buffers: list[torch.Tensor] = []
        if hook:
            self._hooks.append(module.register_forward_pre_hook(torch.compiler.disable(self._pre_forward)))

    def _pre_forward(self, module, args):
        if not self._loaded:
            self.load()

    def load(self) -> None:
        if self._loaded:
            return
        self._refresh()
        # Normal (not inference) tensors even inside inference_mode, so that the parameters stay
        # usable outside it; no autograd graph either way.
        with torch.inference_mode(False), torch.no_grad():
            for g in self.groups:
                buf = self._device_copy(g)
                self._buffers.append(buf)
                g.attach(g.views(buf))
        self._loaded = True
        self.stats["loads"] += 1

    def unload(self) -> None:
        if not self._loaded:
            return
        self._release()
        self._buffers = []  # the caching allocator reuses them in stream order
        self._loaded = False

    def device_bytes(self) -> int:
        return self.host_bytes


class BlockOffload(OffloadHandle):
    """Blocks streamed through a ring of device slots, the first `resident_blocks` kept on the device."""

    granularity = "block"

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "cuda",
        resident_blocks: int = 0,
        prefetch: int = 1,
        planner: Callable[[int], OffloadPlan] | None = None,
        tokens: int | None = None,
    ):
        if _blocks(model) is None:
            raise ValueError("block offload needs a model with a non-empty `blocks` ModuleList (the Wan DiT)")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1 (blocks copied ahead of the one running), got {prefetch}")
        super().__init__(model, device)
        self.prefetch = prefetch
        self._resident = 0
        self.set_resident_blocks(resident_blocks)
        self.copier = make_copier(self.device)
        self._state_reset()
        # With a VRAM budget, `planner(tokens)` chooses the resident blocks for an input size.
        self.planner = planner
        self.plan: OffloadPlan | None = None  # the plan in force when a budget chose resident_blocks
        self._planned_tokens = tokens
        if planner is not None and tokens is not None:
            self.plan = planner(tokens)
        self._hooks.append(model.register_forward_pre_hook(torch.compiler.disable(self._pre_model), with_kwargs=True))
        for i, blk in enumerate(model.blocks):
            self._hooks.append(blk.register_forward_pre_hook(torch.compiler.disable(partial(self._pre_block, i))))
            self._hooks.append(blk.register_forward_hook(torch.compiler.disable(partial(self._post_block, i))))

    # ---- layout -----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.block_groups)

    @property
    def resident_blocks(self) -> int:
        return self._resident

    @property
    def slots(self) -> int:
        """Ring size: one slot for the running block, `prefetch` for the ones copied ahead."""
        return min(self.prefetch + 1, self.num_blocks - self._resident)

    def set_resident_blocks(self, n: int) -> None:
        """Keep the first `n` blocks on the device for good (unloads; the next forward reloads)."""
        if not 0 <= n <= self.num_blocks:
            raise ValueError(f"resident_blocks must be in 0..{self.num_blocks}, got {n}")
        if n != self._resident:
            self.unload()
            self._resident = n

    def device_bytes(self) -> int:
        streamed = [g.nbytes for g in self.block_groups[self._resident :]]
        resident = sum(g.nbytes for g in self.block_groups[: self._resident])
        return self.rest.nbytes + resident + self.slots * max(streamed, default=0)

    # ---- load / unload ----------------------------------------------------------------------
    def _state_reset(self) -> None:
        self._dev: list[torch.Tensor] = []  # rest + resident blocks
        self._ring: list[torch.Tensor] = []
        self._slot_views: dict[int, list[torch.Tensor]] = {}
        self._ready: list = []
        self._free: list = []
        self._issued: list[int | None] = []  # streamed position whose copy was last issued into each slot
        self._attached: int | None = None  # streamed block whose tensors point at its slot now

    def load(self) -> None:
        if self._loaded:
            return
        self._refresh()
        r, s = self._resident, self.slots
        with torch.inference_mode(False), torch.no_grad():
            for g in [self.rest, *self.block_groups[:r]]:
                buf = self._device_copy(g)
                self._dev.append(buf)
                g.attach(g.views(buf))
            streamed = self.block_groups[r:]
            if streamed:
                size = max(g.nbytes for g in streamed)
                self._ring = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(s)]
                self._slot_views = {r + k: g.views(self._ring[k % s]) for k, g in enumerate(streamed)}
        self._ready = [self.copier.new_event() for _ in range(s)]
        self._free = [self.copier.new_event() for _ in range(s)]
        self._issued = [None] * s
        self._loaded = True
        self.stats["loads"] += 1

    def unload(self) -> None:
        if not self._loaded:
            return
        self.copier.drain()
        self._release()
        self._state_reset()
        self._loaded = False

    # ---- the swap -----------------------------------------------------------------------------
    def _issue(self, k: int) -> None:
        """Queue the copy of streamed position k into its slot (k mod slots), unless it is there."""
        s = k % len(self._ring)
        if self._issued[s] == k:
            return
        g = self.block_groups[self._resident + k]
        self.copier.copy(self._ring[s][: g.nbytes], g.host, after=self._free[s])
        self.copier.record_ready(self._ready[s])
        self._issued[s] = k
        self.stats["block_copies"] += 1
        self.stats["bytes_copied"] += g.nbytes

    def _prefetch(self, first: int, count: int) -> None:
        for k in range(first, min(first + count, self.num_blocks - self._resident)):
            self._issue(k)

    def _detach(self, i: int) -> None:
        g = self.block_groups[i]
        g.attach(g.host_views)
        self.copier.record_free(self._free[(i - self._resident) % len(self._ring)])
        self._attached = None

    def plan_for(self, x: torch.Tensor) -> None:
        """With a VRAM budget: choose the resident blocks for a DiT input x [B, C, F, H, W].

        Re-plans when unloaded (free: nothing to move) or when the input grew (needed to stay
        within the budget); a smaller input while loaded runs within the current plan, so
        alternating sizes inside one loop do not reload the resident blocks. A budget too small
        for this size raises ValueError here.
        """
        if self.planner is None or not isinstance(x, torch.Tensor) or x.dim() != 5:
            return
        pt, ph, pw = self.module.cfg.patch_size
        b, _, f, h, w = x.shape
        n = b * (f // pt) * (h // ph) * (w // pw)
        known = self._planned_tokens
        if n == known or (known is not None and self._loaded and n < known):
            return
        self.plan = self.planner(n)
        self._planned_tokens = n
        self.set_resident_blocks(self.plan.resident_blocks)

    def _pre_model(self, module, args, kwargs):
        self.plan_for(args[0] if args else kwargs.get("x"))
        if not self._loaded:
            self.load()
        if self._ring:
            self._prefetch(0, self.slots)  # the first streamed blocks copy while the embeddings run

    def _pre_block(self, i: int, module, args):
        if not self._loaded:
            self.load()
        if self._attached is not None and self._attached != i:
            self._detach(self._attached)  # left attached by a forward that raised
        k = i - self._resident
        if k < 0:
            self._prefetch(0, self.slots)
            return
        self._issue(k)
        self.copier.wait_ready(self._ready[k % len(self._ring)])
        self.block_groups[i].attach(self._slot_views[i])
        self._attached = i
        self._prefetch(k + 1, self.slots - 1)

    def _post_block(self, i: int, module, args, output):
        if i >= self._resident and self._attached == i:
            self._detach(i)


def offload_component(module: nn.Module | None, device: str | torch.device = "cuda"):
    """Context manager: `module` on `device` inside, back in (pinned) host memory after.

    For the text encoder, the image encoder and the VAE: each is needed for one stage of a run.
    The first use packs the module's weights into pinned host memory (its handle is kept on the
    module), so later stages move it with one copy per 512 MiB chunk and release it for free.
    A wrapper that is not a module but holds one as `.model` (`WanTextEncoder`) is accepted.
    `None` passes through (a component the run does not use).
    """
    return _component(module, device)


@contextmanager
def _component(module, device):
    if module is None:
        yield None
        return
    target = module if isinstance(module, nn.Module) else getattr(module, "model", None)
    if not isinstance(target, nn.Module):
        raise TypeError(f"offload_component needs an nn.Module (or an object with one as .model), got {type(module)}")
    handle = layer_state(target).offload
    if handle is None:
        handle = ModelOffload(target, device, hook=False)
    elif not isinstance(handle, ModelOffload) or handle.device != _resolve(device):
        raise RuntimeError(f"this module already carries a different offload ({handle.granularity} on {handle.device})")
    with handle.loaded():
        yield module


def _resolve(device) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d
