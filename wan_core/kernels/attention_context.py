"""What an attention call belongs to, for the backends that need more than q, k and v.

Every backend takes `attn(q, k, v)` only. A sparse self-attention (`radial_attn`) also needs the
layout of the video tokens (frames x tokens per frame) and which sampling step is running (its
first steps stay dense). Rather than thread these through every block, the two places that know
them declare them for the duration of the call, in context variables:

- `WanModel.forward` declares the token grid of the forward (`video_grid`), around its block stack;
- `sampling.loop.sample` declares the step index (`sampling_step`), around each step's model calls.

Backends that do not need them never look. Context variables follow threads and asyncio tasks,
so concurrent runs in one process do not see each other's values.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

__all__ = ["video_grid", "current_grid", "sampling_step", "current_step"]

_GRID: contextvars.ContextVar[tuple[int, int, int] | None] = contextvars.ContextVar("wan_core_video_grid", default=None)
_STEP: contextvars.ContextVar[int | None] = contextvars.ContextVar("wan_core_sampling_step", default=None)


@contextlib.contextmanager
def video_grid(grid: tuple[int, int, int]) -> Iterator[None]:
    """Declare the token grid (frames, height, width after patching) of the forward inside."""
    token = _GRID.set(tuple(int(g) for g in grid))
    try:
        yield
    finally:
        _GRID.reset(token)


def current_grid() -> tuple[int, int, int] | None:
    """The declared token grid, None outside a model forward."""
    return _GRID.get()


@contextlib.contextmanager
def sampling_step(step: int) -> Iterator[None]:
    """Declare the 0-based index of the sampling step whose model calls run inside."""
    token = _STEP.set(int(step))
    try:
        yield
    finally:
        _STEP.reset(token)


def current_step() -> int | None:
    """The declared step index, None outside a sampling loop (a model called directly)."""
    return _STEP.get()
