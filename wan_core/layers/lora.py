"""LoRA on a built Wan2.1 DiT: merged into the weights, or kept as a low-rank branch.

Two ways to apply a LoRA, chosen per call (and per module by `mode="auto"`):

- merge: `W <- W + sum_i s_i * (scale_i * up_i @ down_i + diff_i)` (and `diff_b` into the bias,
  `diff_m` into `modulation`), summed in float32 and cast back once. To change strengths without
  reading the base from disk again, the ORIGINAL tensor of every touched parameter is kept (on
  the CPU by default) and every change recomputes `cast(orig_fp32 + new_delta)`. That is exact:
  a fresh merge at the new strengths gives the same bits, and strength 0 gives back the original
  tensor itself. Subtracting the old delta is not: `bf16(bf16(W + d) - d) != W` in general
  (the first cast dropped low bits of W), and even in float32 `(W + d) - d` is not always W.
  The cost is one copy of the touched weights in CPU RAM (`keep_originals=False` skips it, and
  then strengths are fixed).
- branch: the base linear is left as it is (an FP8 linear whose weight cannot take a merge
  without losing precision, or any module producing `[..., out]` from `[..., in]`), and a forward
  hook adds `sum_i s_i * scale_i * up_i(down_i(x))` to its output. The LoRA tensors live in a
  `lora_branch` child module (non-persistent buffers: they follow `.to()` but stay out of the
  state dict). A strength change is a float update. Apply branches after any module swap (FP8):
  a swapped-in module does not carry the old module's hook.

Parameters the DiT keeps in float32 (`FP32_PARAM_PATTERNS`: time embedding, time projection,
head, norms, modulation) are always merged: they are small, never FP8, and the forward reads some
of them directly (`head.head.weight`, `time_embedding`), so a forward hook would never fire.

Public API: `apply_loras`, `set_lora_strengths`, `remove_loras`, `lora_report`; the report
types `LoraReport` / `LoraSummary`; `LoraMismatchError` for a LoRA that does not fit the model.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..loading.io import CheckpointError
from ..loading.lora import LoraTarget, LoraWeights, load_lora, parse_lora
from ..models.dit import FP32_PARAM_PATTERNS

__all__ = [
    "apply_loras",
    "set_lora_strengths",
    "remove_loras",
    "lora_report",
    "LoraReport",
    "LoraSummary",
    "LoraMismatchError",
    "LoraBranch",
]

LoraSource = str | os.PathLike | Mapping[str, torch.Tensor] | LoraWeights


class LoraMismatchError(CheckpointError):
    """A LoRA that does not fit the model (missing target modules or wrong shapes)."""


# ---- report ---------------------------------------------------------------------------------


@dataclass
class LoraSummary:
    """What one LoRA did to the model."""

    name: str
    source: str
    layout: str
    strength: float
    mode: str
    modules: int = 0  # target modules patched
    kinds: dict[str, int] = field(default_factory=dict)  # 'lora' / 'diff' / 'diff_b' / 'diff_m' -> count
    merged: int = 0  # parameters merged into
    branched: int = 0  # linears with a branch
    rank: int | None = None
    ignored_zero: list[str] = field(default_factory=list)  # all-zero deltas with no parameter to land on
    unknown_keys: list[str] = field(default_factory=list)  # keys that are no LoRA part of a Wan DiT
    skipped: list[str] = field(default_factory=list)  # targets missing in this model (strict=False)

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items()))
        s = (
            f"{self.name} (strength {self.strength:g}, {self.layout} layout, rank {self.rank}): "
            f"{self.modules} modules [{kinds}], {self.merged} merged, {self.branched} as branches"
        )
        if self.ignored_zero:
            s += f"; {len(self.ignored_zero)} all-zero deltas with no target ignored (harmless, e.g. {self.ignored_zero[:3]})"
        if self.unknown_keys:
            s += f"; {len(self.unknown_keys)} keys target nothing known (e.g. {self.unknown_keys[:3]})"
        if self.skipped:
            s += f"; {len(self.skipped)} targets not in this model skipped (e.g. {self.skipped[:3]})"
        return s


@dataclass
class LoraReport:
    loras: list[LoraSummary]

    def __str__(self) -> str:
        return "\n".join(str(s) for s in self.loras) if self.loras else "no LoRA applied"

    def __getitem__(self, i: int) -> LoraSummary:
        return self.loras[i]

    def __len__(self) -> int:
        return len(self.loras)


# ---- the low-rank branch ----------------------------------------------------------------------


class LoraBranch(nn.Module):
    """The LoRA terms of one linear: `sum_j mult_j * up_j(down_j(x))` (or `x @ diff_j.T`).

    `mult_j` = strength * scale is a 0-d float32 buffer changed in place: a strength change costs
    nothing and, with compiled blocks, triggers no recompilation (a Python float would be baked
    into the graph). Buffers are non-persistent: they move with the model, not into state dicts.
    """

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.terms: list[list] = []  # [lora id, buffer name(s), scale, name of the mult buffer]

    def add(self, lora_id: int, strength: float, scale: float, down=None, up=None, full=None) -> None:
        j = len(self.terms)
        if full is not None:  # a full weight delta beside an FP8 weight: x @ diff.T
            self.register_buffer(f"full_{j}", full.to(self.dtype), persistent=False)
            names: tuple[str, ...] = (f"full_{j}",)
        else:
            self.register_buffer(f"down_{j}", down.to(self.dtype), persistent=False)
            self.register_buffer(f"up_{j}", up.to(self.dtype), persistent=False)
            names = (f"down_{j}", f"up_{j}")
        self.register_buffer(f"mult_{j}", torch.tensor(float(strength * scale)), persistent=False)
        self.terms.append([lora_id, names, scale, f"mult_{j}"])

    def set_strength(self, lora_id: int, strength: float) -> None:
        for term in self.terms:
            if term[0] == lora_id:
                getattr(self, term[3]).fill_(strength * term[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        out = None
        xd = x.to(self.dtype)
        for _, names, _, mult in self.terms:
            h = xd
            for n in names:
                h = F.linear(h, getattr(self, n))  # [..., in] -> [..., r] -> [..., out]
            h = h * getattr(self, mult).to(h.dtype)  # strength 0 adds exact zeros
            out = h if out is None else out + h
        return out


def _branch_hook(module: nn.Module, args, output):
    delta = module.lora_branch(args[0])
    return output if delta is None else output + delta.to(output.dtype)


# ---- model-side state -------------------------------------------------------------------------


@dataclass
class _Applied:
    name: str
    weights: LoraWeights
    strength: float
    mode: str
    merges: list[tuple[str, str, LoraTarget]]  # (parameter name, kind, target)
    summary: LoraSummary
    baked: bool = False  # merged with keep_originals=False: part of the base weights from then on


@dataclass
class _State:
    loras: list[_Applied] = field(default_factory=list)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # param name -> original tensor
    hooks: dict[str, object] = field(default_factory=dict)  # module name -> hook handle


_ATTR = "_wan_lora_state"


def _state(model: nn.Module) -> _State:
    st = model.__dict__.get(_ATTR)
    if st is None:
        st = _State()
        model.__dict__[_ATTR] = st
    return st


def _is_low_precision(t: torch.Tensor) -> bool:
    """Weights a merge would damage: FP8 (or other 1-byte / integer) storage."""
    return not t.is_floating_point() or t.element_size() == 1


def _is_fp32_param(name: str) -> bool:
    return any(p in name for p in FP32_PARAM_PATTERNS)


def _out_in(module: nn.Module, weight: torch.Tensor) -> tuple[int, int]:
    out_f = getattr(module, "out_features", None)
    in_f = getattr(module, "in_features", None)
    if out_f is None or in_f is None:
        out_f, in_f = weight.shape[0], weight.shape[1:].numel()
    return int(out_f), int(in_f)


# ---- planning: check a LoRA against the model without touching it -----------------------------


def _plan(model: nn.Module, lw: LoraWeights, mode: str, strict: bool, summary: LoraSummary):
    """-> (merges [(param, kind, target)], branches [(module, kind, target)]); raises LoraMismatchError."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    missing: list[str] = []
    bad_shape: list[str] = []
    merges: list[tuple[str, str, LoraTarget]] = []
    branches: list[tuple[str, str, LoraTarget]] = []
    matched_names: set[str] = set()
    for t in lw.targets.values():
        mod = modules.get(t.name)
        for kind in t.kinds:
            pname = t.name + {"lora": ".weight", "diff": ".weight", "diff_b": ".bias", "diff_m": ".modulation"}[kind]
            p = params.get(pname) if mod is not None else None
            delta = t.diff if kind == "diff" else t.diff_b if kind == "diff_b" else t.diff_m
            if p is None:
                if kind != "lora" and delta is not None and not bool(delta.any()):
                    summary.ignored_zero.append(t.name + "." + kind)
                elif not missing or missing[-1] != t.name:
                    missing.append(t.name)
                continue
            matched_names.add(t.name)
            if kind == "lora":
                out_f, in_f = _out_in(mod, p)
                if t.up.shape[0] != out_f or t.down.shape[1:].numel() != in_f:
                    bad_shape.append(
                        f"{t.name}: LoRA maps {t.down.shape[1:].numel()} -> {t.up.shape[0]}, the module {in_f} -> {out_f}"
                    )
                    continue
            elif tuple(delta.shape) != tuple(p.shape):
                bad_shape.append(f"{t.name}.{kind}: {tuple(delta.shape)} vs parameter {tuple(p.shape)}")
                continue
            linear_weight = kind in ("lora", "diff") and p.dim() == 2
            low = _is_low_precision(p)
            if linear_weight and low:
                if mode == "merge":
                    bad_shape.append(
                        f"{pname} is stored as {p.dtype}: merging would lose precision; use mode='branch' or 'auto'"
                    )
                    continue
                branches.append((t.name, kind, t))
            elif kind == "lora" and mode == "branch" and not _is_fp32_param(pname) and p.dim() == 2:
                branches.append((t.name, kind, t))
            elif low:
                bad_shape.append(f"{pname} is stored as {p.dtype}: a {kind} delta cannot be applied to it")
            else:
                merges.append((pname, kind, t))
    matched = len(matched_names)
    if missing and (strict or matched == 0):
        raise LoraMismatchError(_missing_message(model, lw, missing, matched))
    summary.skipped = missing
    if bad_shape:
        raise LoraMismatchError(
            f"{lw.source}: {len(bad_shape)} LoRA tensors do not fit this model "
            f"(e.g. {'; '.join(bad_shape[:4])}); was it made for another Wan2.1 size or variant?"
        )
    if matched == 0:
        sample = lw.unknown_keys[:4]
        raise LoraMismatchError(
            f"{lw.source}: no key of this file targets a Wan2.1 DiT module (e.g. {sample}); "
            "is it a LoRA for another architecture?"
        )
    return merges, branches


def _missing_message(model: nn.Module, lw: LoraWeights, missing: list[str], matched: int) -> str:
    cfg = getattr(model, "cfg", None)
    hint = ""
    if any("k_img" in m or "v_img" in m or m.startswith("img_emb") for m in missing):
        if cfg is not None and not cfg.is_i2v:
            hint = " It targets the image cross-attention (k_img/v_img): an image-to-video (I2V) LoRA on a text-to-video model."
    blocks = [int(m.split(".")[1]) for m in missing if m.startswith("blocks.") and m.split(".")[1].isdigit()]
    if cfg is not None and blocks and max(blocks) >= cfg.num_layers:
        hint += f" It reaches block {max(blocks)}, the model has {cfg.num_layers} blocks: a LoRA for a deeper model."
    if matched == 0:
        hint += " Nothing in it matches this model."
    return (
        f"{lw.source}: {len(missing)} LoRA target modules are not in this model "
        f"(e.g. {', '.join(missing[:4])}); {matched} targets match.{hint} "
        "In Python, apply_loras(..., strict=False) applies the matching part anyway; from a config or the CLI, "
        "use a LoRA made for this model (a Wan2.1 LoRA of the same size and task)."
    )


# ---- applying -----------------------------------------------------------------------------------


def _as_weights(src: LoraSource, i: int) -> LoraWeights:
    if isinstance(src, LoraWeights):
        return src
    if isinstance(src, (str, os.PathLike)):
        return load_lora(src)
    if isinstance(src, Mapping):
        return parse_lora(dict(src), source=f"LoRA #{i}")
    raise TypeError(f"a LoRA is a file path, a state dict or LoraWeights, not {type(src).__name__}")


def _delta(kind: str, t: LoraTarget, shape, device) -> torch.Tensor:
    """The float32 delta of one kind (strength not applied) in the parameter's shape."""
    if kind == "lora":
        up = t.up.to(device=device, dtype=torch.float32).flatten(1)  # [out, r]
        down = t.down.to(device=device, dtype=torch.float32).flatten(1)  # [r, in]
        return (up @ down).reshape(shape) * t.scale
    src = {"diff": t.diff, "diff_b": t.diff_b, "diff_m": t.diff_m}[kind]
    return src.to(device=device, dtype=torch.float32)


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    """A parameter or buffer by its dotted name."""
    mod_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(mod_name) if mod_name else model, attr)


def _remerge(model: nn.Module, st: _State, pnames: set[str]) -> None:
    """Recompute every named parameter as cast(original_fp32 + sum of its active deltas)."""
    by_param: dict[str, list[tuple[float, str, LoraTarget]]] = {}
    for a in st.loras:
        if a.baked:
            continue
        for pname, kind, t in a.merges:
            if pname in pnames and a.strength != 0:
                by_param.setdefault(pname, []).append((a.strength, kind, t))
    for pname in sorted(pnames):
        p = _tensor(model, pname)
        orig = st.originals[pname]
        active = by_param.get(pname)
        if not active:
            p.data = orig.to(p.device)  # bitwise the original (no copy when it already lives there)
            continue
        acc = orig.to(device=p.device, dtype=torch.float32, copy=True)
        for s, k, t in active:
            acc += s * _delta(k, t, acc.shape, acc.device)
        p.data = acc.to(orig.dtype)


def apply_loras(
    model: nn.Module,
    loras: Sequence[tuple[LoraSource, float]],
    mode: str = "auto",
    strict: bool = True,
    keep_originals: bool = True,
    originals_device: str | torch.device = "cpu",
    originals: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
) -> LoraReport:
    """Apply LoRAs `[(path | state dict | LoraWeights, strength), ...]` on top of those already applied.

    mode: 'merge' (into the weights; refused for FP8 weights), 'branch' (a low-rank branch beside
    every linear the forward calls as a module), 'auto' (branch where the weight is FP8, merge
    elsewhere). strict: a LoRA with targets this model lacks is an error (False: skip them, listed
    in the report). keep_originals: keep each touched parameter's original tensor (on
    `originals_device`) so strengths can change and LoRAs can be removed exactly; False bakes the
    merge in for good (no extra memory: what a converter wants before quantizing).
    originals: `(param name, its current tensor) -> a tensor holding the same values, or None`:
    where the caller already has the original elsewhere (the memory-mapped checkpoint the model
    was loaded from), it is kept instead of a copy, so a GPU-resident model's LoRA costs no RAM.
    All LoRAs are checked before anything is changed. Returns the report of every applied LoRA.
    """
    if mode not in ("merge", "branch", "auto"):
        raise ValueError(f"mode must be 'merge', 'branch' or 'auto', not {mode!r}")
    st = _state(model)
    if not keep_originals and any(a.merges and not a.baked for a in st.loras):
        raise ValueError("LoRAs merged earlier can still change; bake them all at once or keep originals")
    plans = []
    taken = {a.name for a in st.loras}
    for i, (src, strength) in enumerate(loras):
        lw = _as_weights(src, i)
        base = os.path.basename(lw.source) if isinstance(src, (str, os.PathLike)) else lw.source
        name, n = base, 2
        while name in taken:
            name, n = f"{base}#{n}", n + 1
        taken.add(name)
        summary = LoraSummary(name, lw.source, lw.layout, float(strength), mode, unknown_keys=list(lw.unknown_keys))
        merges, branches = _plan(model, lw, mode, strict, summary)
        plans.append((lw, float(strength), name, summary, merges, branches))

    modules = dict(model.named_modules())
    touched: set[str] = set()
    new: list[_Applied] = []
    for lw, strength, name, summary, merges, branches in plans:
        lora_id = len(st.loras)
        for pname, _, _ in merges:
            if pname not in st.originals:
                data = _tensor(model, pname).data
                kept = originals(pname, data) if (keep_originals and originals is not None) else None
                if kept is not None and (kept.shape != data.shape or kept.dtype != data.dtype):
                    kept = None  # not the same tensor: copy instead
                if kept is None:
                    kept = data.to(originals_device) if keep_originals else data
                st.originals[pname] = kept
            touched.add(pname)
        for mname, kind, t in branches:
            mod = modules[mname]
            w = mod.weight
            if not hasattr(mod, "lora_branch"):
                dt = w.dtype if not _is_low_precision(w) else _branch_dtype(mod)
                mod.add_module("lora_branch", LoraBranch(dt))
                st.hooks[mname] = mod.register_forward_hook(_branch_hook)
            if kind == "lora":
                mod.lora_branch.add(lora_id, strength, t.scale, down=t.down.to(w.device), up=t.up.to(w.device))
            else:
                mod.lora_branch.add(lora_id, strength, 1.0, full=t.diff.to(w.device))
        summary.modules = len({t.name for _, _, t in merges} | {t.name for _, _, t in branches})
        summary.kinds = dict(Counter(k for _, k, _ in merges) + Counter(k for _, k, _ in branches))
        summary.merged = len({p for p, _, _ in merges})
        summary.branched = len({m for m, _, _ in branches})
        ranks = [t.rank for t in lw.targets.values() if t.rank is not None]
        summary.rank = max(ranks) if ranks else None
        a = _Applied(name, lw, strength, mode, merges, summary)
        st.loras.append(a)
        new.append(a)
    _remerge(model, st, touched)
    if not keep_originals:
        for a in new:
            a.baked = True
        for pname in touched:
            del st.originals[pname]
    return lora_report(model)


def _branch_dtype(mod: nn.Module) -> torch.dtype:
    """Compute dtype of a branch beside an FP8 linear: its `compute_dtype` (FP8Linear), its bias'
    dtype, else bfloat16."""
    cd = getattr(mod, "compute_dtype", None)
    if isinstance(cd, torch.dtype):
        return cd
    b = getattr(mod, "bias", None)
    return b.dtype if isinstance(b, torch.Tensor) and b.is_floating_point() and b.element_size() > 1 else torch.bfloat16


def set_lora_strengths(model: nn.Module, strengths: Sequence[float] | Mapping[str, float]) -> LoraReport:
    """Change the strengths of the applied LoRAs (a list in application order, or {name: strength}).

    Merged parameters are recomputed from their kept originals (exactly what a fresh merge at
    these strengths gives); branches only update a float.
    """
    st = _state(model)
    if isinstance(strengths, Mapping):
        unknown = set(strengths) - {a.name for a in st.loras}
        if unknown:
            raise KeyError(f"no applied LoRA named {sorted(unknown)}; applied: {[a.name for a in st.loras]}")
        new = [float(strengths.get(a.name, a.strength)) for a in st.loras]
    else:
        if len(strengths) != len(st.loras):
            raise ValueError(f"{len(strengths)} strengths given for {len(st.loras)} applied LoRAs")
        new = [float(s) for s in strengths]
    changed = [i for i, a in enumerate(st.loras) if a.strength != new[i]]
    baked = [st.loras[i].name for i in changed if st.loras[i].baked and st.loras[i].merges]
    if baked:
        raise ValueError(f"{baked} were merged with keep_originals=False: their strengths cannot change")
    touched: set[str] = set()
    for i in changed:
        a = st.loras[i]
        touched.update(p for p, _, _ in a.merges)
        a.strength = a.summary.strength = new[i]
        for mname in st.hooks:
            model.get_submodule(mname).lora_branch.set_strength(i, new[i])
    _remerge(model, st, touched)
    return lora_report(model)


def remove_loras(model: nn.Module) -> None:
    """Undo every LoRA: originals put back (bitwise), branches and hooks removed."""
    st = _state(model)
    baked = [a.name for a in st.loras if a.baked and a.merges]
    if baked:
        raise ValueError(f"{baked} were merged with keep_originals=False and cannot be removed")
    for a in st.loras:
        a.strength = 0.0
    _remerge(model, st, set(st.originals))
    for mname, handle in st.hooks.items():
        handle.remove()
        del model.get_submodule(mname).lora_branch
    model.__dict__.pop(_ATTR, None)


def lora_report(model: nn.Module) -> LoraReport:
    """The summaries of the LoRAs applied to `model` (empty when none)."""
    st = model.__dict__.get(_ATTR)
    return LoraReport([a.summary for a in st.loras] if st else [])
