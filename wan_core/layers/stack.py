"""The one place optional DiT layers are declared, ordered and recorded.

A built `WanModel` is the plain checkpoint-named math; everything optional is a *layer* applied
after build, each a small object with `apply(model)` / `remove(model)`, in this order:

    ORDER = fp8_kernel -> compile -> lora -> offload -> sequence_parallel -> cache

- fp8_kernel: the matmul kernel of the FP8 linears the loader swapped in (a file stored in FP8
  is FP8 from the start; this layer only chooses how it runs).
- compile: regional torch.compile of each block, after the FP8 swap so the graphs see it.
- lora: merged deltas or low-rank branches, after FP8 so branches sit beside FP8 linears.
- offload: last of the weight layers: it packs the tensors the blocks hold at that point, so a
  change to an earlier weight layer is made with the offload removed and applied again after
  (`apply_layers` does this).
- sequence_parallel and cache are per-run layers: sequence parallel wraps the block stack and
  the self-attention; the feature cache wraps *outside* it (every rank sees the whole sequence
  and makes the same skip decision, which the collective attention requires).

Each layer keeps its state in one typed record on the model, `LayerState`, read and written
through `layer_state(model)`; no layer reads another's private attributes. The record types live
here, so this module imports no layer; a layer is removed through its own object (`remove`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from .parallel.group import ParallelGroups

__all__ = [
    "ORDER", "WEIGHT_LAYERS", "Layer", "LayerState", "LoraSync", "SequenceParallelState", "layer_state",
    "apply_layers",
]  # fmt: skip

ORDER: tuple[str, ...] = ("fp8_kernel", "compile", "lora", "offload", "sequence_parallel", "cache")
WEIGHT_LAYERS = ORDER[:3]  # layers that change weights: made with the offload removed (it owns their host copy)


# The records of the layers, defined here so that this module imports none of them (the layers
# import it): plain dataclasses, and protocols for the two layers whose record is their own object.


@dataclass
class LoraSync:
    """The LoRAs applied (`layers.lora_sync`): which files, in order, at which strengths."""

    files: tuple = ()  # WantedLora.key of each applied LoRA, in order
    strengths: tuple[float, ...] = ()
    mode: str = "auto"
    weights: dict[tuple, Any] = field(default_factory=dict)  # key -> LoraWeights (parsed, most recently used last)


@dataclass
class SequenceParallelState:
    """What the sequence-parallel layer replaced (`layers.parallel.apply`)."""

    groups: ParallelGroups  # the groups the model is split over
    attn_fns: list  # each block's own self_attn.attn_fn, in block order
    forward_blocks: object | None  # the model's own instance `forward_blocks` (None: the class method)


class OffloadRecord(Protocol):
    """An attached offload (`layers.offload.OffloadHandle`)."""

    granularity: str
    device: torch.device

    def remove(self) -> None: ...


class CacheRecord(Protocol):
    """An attached feature cache (`layers.cache.FeatureCache`)."""

    def detach(self) -> None: ...


@dataclass
class LayerState:
    """What each layer applied to one model (fields in `ORDER`; None / False: not applied)."""

    fp8_kernel: str | None = None  # resolved kernel name of the FP8 linears
    compile: bool = False  # blocks regionally compiled
    lora: LoraSync | None = None
    offload: OffloadRecord | None = None  # hooks streaming the weights from host memory
    sequence_parallel: SequenceParallelState | None = None  # wrapped attention / block stack
    cache: CacheRecord | None = None  # feature cache attached for a run


_ATTR = "layer_state"


def layer_state(module) -> LayerState:
    """The layer record of `module` (created empty on first use)."""
    st = module.__dict__.get(_ATTR)
    if st is None:
        st = module.__dict__[_ATTR] = LayerState()
    return st


class Layer(Protocol):
    """One optional feature. `name` is its place in `ORDER` (and its field of `LayerState`);
    `needed(model)` says whether `apply` would change anything (applying again is then a no-op)."""

    name: str

    def needed(self, model) -> bool: ...

    def apply(self, model) -> None: ...

    def remove(self, model) -> None: ...


def apply_layers(model, layers: list[Layer]) -> None:
    """Bring `model` to `layers`, applied in `ORDER` whatever order they are given in.

    A weight layer (fp8 kernel, compile, LoRA) that must change while an offload is attached is
    applied with the offload removed (weights back as plain host tensors); the offload is applied
    again after, from the `offload` layer of `layers`, which must then be there.
    """
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names) or not set(names) <= set(ORDER):
        raise ValueError(f"layers must be distinct members of {ORDER}, got {names}")
    st = layer_state(model)
    ordered = sorted(layers, key=lambda la: ORDER.index(la.name))
    for layer in ordered:  # what can fail before any change (a missing LoRA file) fails here
        prepare = getattr(layer, "prepare", None)
        if prepare is not None and layer.needed(model):
            prepare(model)
    for layer in ordered:  # `needed` asked at each step: an offload removed below is needed again
        if not layer.needed(model):
            continue
        if layer.name in WEIGHT_LAYERS and st.offload is not None:
            if "offload" not in names:
                raise ValueError(f"changing {layer.name!r} under an attached offload needs the offload layer too")
            st.offload.remove()  # weights back as plain host tensors; the offload layer below re-attaches
        layer.apply(model)
