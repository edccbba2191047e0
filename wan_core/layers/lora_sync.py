"""LoRAs as a layer (`wan_core.layers.stack`): bring a model's LoRAs to a wanted list with as
little work as possible, so a cached base DiT serves any LoRA set without being read again.

Each path below leads to the same floating-point sums in the same order, so a LoRA change on a
reused model gives the same bits as a fresh build with that set (`wan_core.layers.lora` keeps the
originals of merged weights and recomputes merges from them).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .lora import apply_loras, remove_loras, set_lora_strengths
from .stack import LoraSync, layer_state

__all__ = ["LoraSync", "LoraLayer", "WantedLora"]

_LORA_WEIGHTS_KEPT = 8  # parsed LoRA files kept beyond the applied ones (switching back reads nothing)


@dataclass(frozen=True)
class WantedLora:
    """One LoRA of a wanted list: `key` identifies the file version (path, size, mtime)."""

    key: tuple
    path: str
    strength: float


def _sync(model) -> LoraSync:
    st = layer_state(model)
    if st.lora is None:
        st.lora = LoraSync()
    return st.lora


class LoraLayer:
    """The LoRA list `loras` in `mode` ('auto', 'merge' or 'branch', see `wan_core.layers.lora`).

    originals: for a model on a GPU, where the original of a merged weight can be read back (the
    memory-mapped checkpoint), so no host copy is kept; None: `apply_loras` keeps them itself.
    """

    name = "lora"

    def __init__(
        self,
        loras: tuple[WantedLora, ...],
        mode: str = "auto",
        originals: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
    ):
        if mode not in ("auto", "merge", "branch"):
            raise ValueError(f"lora_mode must be 'auto', 'merge' or 'branch', got {mode!r}")
        self.loras, self.mode, self.originals = tuple(loras), mode, originals

    @property
    def files(self) -> tuple:
        return tuple(w.key for w in self.loras)

    @property
    def strengths(self) -> tuple[float, ...]:
        return tuple(w.strength for w in self.loras)

    def needed(self, model) -> bool:
        s = layer_state(model).lora or LoraSync()
        return (s.files, s.strengths, s.mode) != (self.files, self.strengths, self.mode) and (
            bool(s.files) or bool(self.loras)
        )

    def prepare(self, model) -> None:
        """Parse every wanted file before anything changes (a missing or bad file fails here)."""
        s = _sync(model)
        for w in self.loras:
            lw = s.weights.pop(w.key, None)
            if lw is None:
                from ..loading.lora import load_lora

                if not os.path.isfile(w.path):
                    raise FileNotFoundError(f"LoRA file not found: {w.path}")
                lw = load_lora(w.path)
            s.weights[w.key] = lw  # most recently used last

    def apply(self, model) -> None:
        """Same files in the same order: only strengths change. The applied list is a prefix of the
        wanted one: strengths of the prefix, then the new ones on top. Anything else: every LoRA
        removed (originals restored bitwise) and the wanted ones applied."""
        self.prepare(model)
        s = _sync(model)
        files, strengths = self.files, self.strengths
        n = len(s.files)
        if self.mode == s.mode and n and files[:n] == s.files:
            if strengths[:n] != s.strengths:
                set_lora_strengths(model, list(strengths[:n]))
                s.strengths = strengths[:n]
        elif n:
            remove_loras(model)
            s.files, s.strengths, n = (), (), 0
        if len(files) > n:
            new = [(s.weights[k], st) for k, st in zip(files[n:], strengths[n:])]
            apply_loras(model, new, mode=self.mode, keep_originals=True, originals=self.originals)
        s.files, s.strengths, s.mode = files, strengths, self.mode
        spare = [k for k in s.weights if k not in files]
        for k in spare[: max(0, len(spare) - _LORA_WEIGHTS_KEPT)]:
            del s.weights[k]

    def remove(self, model) -> None:
        s = _sync(model)
        if s.files:
            remove_loras(model)
        s.files, s.strengths = (), ()
