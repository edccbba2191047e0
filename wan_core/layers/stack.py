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
through `layer_state(model)`; no layer reads another's private attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .cache.layer import FeatureCache
    from .lora_sync import LoraSync
    from .offload.handles import OffloadHandle
    from .parallel.apply import SequenceParallelState

__all__ = ["ORDER", "WEIGHT_LAYERS", "Layer", "LayerState", "layer_state", "apply_layers", "remove_layer"]

ORDER: tuple[str, ...] = ("fp8_kernel", "compile", "lora", "offload", "sequence_parallel", "cache")
WEIGHT_LAYERS = ORDER[:3]  # layers that change weights: made with the offload removed (it owns their host copy)


@dataclass
class LayerState:
    """What each layer applied to one model (fields in `ORDER`; None / False: not applied)."""

    fp8_kernel: str | None = None  # resolved kernel name of the FP8 linears
    compile: bool = False  # blocks regionally compiled
    lora: LoraSync | None = None  # the LoRA files and strengths applied (`layers.lora_sync`)
    offload: OffloadHandle | None = None  # hooks streaming the weights from host memory
    sequence_parallel: SequenceParallelState | None = None  # wrapped attention / block stack
    cache: FeatureCache | None = None  # feature cache attached for a run


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
            remove_layer(model, "offload")
        layer.apply(model)


def remove_layer(model, name: str) -> None:
    """Remove the layer `name` from `model` (no-op when it is not applied)."""
    st = layer_state(model)
    if name == "offload" and st.offload is not None:
        st.offload.remove()
    elif name == "sequence_parallel" and st.sequence_parallel is not None:
        from .parallel.apply import disable_sequence_parallel

        disable_sequence_parallel(model)
    elif name == "cache" and st.cache is not None:
        st.cache.detach()
    elif name == "lora" and st.lora is not None:
        from .lora_sync import LoraLayer

        LoraLayer(()).remove(model)
    elif name in ("fp8_kernel", "compile"):
        if getattr(st, name):
            raise ValueError(f"the {name!r} layer is part of a built model's identity; build another model instead")
    elif name not in ORDER:
        raise ValueError(f"unknown layer {name!r}; layers are {ORDER}")
