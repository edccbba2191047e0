"""The one error a checkpoint raises, defined below the loaders so the models can raise it too: a
model whose architecture is read off tensor shapes (`from_state_dict`, the umT5 build) says "these
tensors do not fit" in the same type as a loader saying "this file is not a checkpoint". The
loaders re-export it (`wan_core.loading.CheckpointError`), which is where callers import it from."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or not what the caller asked for."""
