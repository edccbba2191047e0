"""The caching layer: wraps a built `WanModel`'s block stack and skips it when a policy says so.

How it attaches (DESIGN.md: optional features are layered on after build, `dit.py` has no
branches for them): a `FeatureCache` is the "cache" layer of `wan_core.layers.stack`, the last
one; `apply(model)` (alias `attach`) replaces two instance attributes,
- `model.embed_time`, to see the step's timestep `t` and the time embedding `e` it returns;
- `model.forward_blocks`, the block stack: on a computed step it runs the original and keeps
  `residual = out - x` for the branch; on a skipped step it returns `x + residual`.
The patch embedding, text embedding and head still run on a skipped step (cheap: about 1 % of
an evaluation), so the output follows the current input exactly as in TeaCache / MagCache.
`remove(model)` (alias `detach()`) restores both. It goes *outside* sequence parallel (after the
sequence-parallel wrapper of `forward_blocks`, as `stack.ORDER` says): then every rank sees the
whole sequence and makes the same decision, which the collective attention requires.

Which guidance branch is running is said explicitly by the caller: `with cache_branch("cond"):`
around the model call (a context variable; `guided_velocity_branches` below does it, and
CFG-parallel ranks do it for their branch). Cond and uncond keep separate residuals, indicator
histories and decision states; any other string names another independent branch. Only when no
branch is declared does the layer fall back to call order: a call at the same timestep as the
directly preceding "cond" call is "uncond", any other call is "cond" (correct for
`sampling.guided_velocity`'s order, wrong for anything else: declare the branch).

Steps: each branch counts its own evaluations, so the step index is the number of earlier
evaluations of that branch in this run. A run starts at `begin_run(num_steps)`, or by itself
when a branch sees a timestep larger than its previous one (timesteps only fall within a run).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..stack import apply_layers, layer_state
from .policies import INDICATORS, BranchState, CachePolicy

__all__ = [
    "COND",
    "UNCOND",
    "cache_branch",
    "current_branch",
    "FeatureCache",
    "CacheReport",
    "feature_cache",
    "guided_velocity_branches",
    "rel_l1",
]

log = logging.getLogger("wan_core.layers.cache")

COND, UNCOND = "cond", "uncond"
_BRANCH: contextvars.ContextVar[str | None] = contextvars.ContextVar("wan_core_cache_branch", default=None)


@contextlib.contextmanager
def cache_branch(name: str) -> Iterator[None]:
    """Declare which guidance branch the model calls inside this block evaluate ("cond"/"uncond").

    Costs nothing when no cache is attached, so every predict function can use it unconditionally.
    """
    token = _BRANCH.set(name)
    try:
        yield
    finally:
        _BRANCH.reset(token)


def current_branch() -> str | None:
    return _BRANCH.get()


def guided_velocity_branches(model, x, t, cond, uncond, guidance):
    """`sampling.guided_velocity` with each model call inside `cache_branch` (same math, same order)."""
    with cache_branch(COND):
        v = model(x, t, cond.context, clip_fea=cond.clip_fea, y=cond.y)
    if uncond is None or guidance == 1.0:
        return v
    with cache_branch(UNCOND):
        v_u = model(x, t, uncond.context, clip_fea=uncond.clip_fea, y=uncond.y)
    return v_u + guidance * (v - v_u)


def rel_l1(cur: torch.Tensor, prev: torch.Tensor) -> float:
    """mean|cur - prev| / mean|prev|, in float32 (the TeaCache change measure)."""
    cur, prev = cur.float(), prev.float()
    return ((cur - prev).abs().mean() / prev.abs().mean()).item()


@dataclass
class CacheReport:
    """What the cache did in the last run: evaluations computed and skipped, per branch."""

    policy: str
    num_steps: int | None
    computed: dict[str, list[int]] = field(default_factory=dict)
    skipped: dict[str, list[int]] = field(default_factory=dict)

    @property
    def evaluations(self) -> int:
        return sum(len(v) for v in self.computed.values()) + self.skipped_total

    @property
    def skipped_total(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self) -> str:
        parts = [
            f"{b} {len(self.skipped.get(b, []))}/{len(self.computed.get(b, [])) + len(self.skipped.get(b, []))}"
            for b in self.computed
        ]
        return f"feature cache {self.policy}: skipped {self.skipped_total} of {self.evaluations} DiT evaluations" + (
            f" ({', '.join(parts)})" if parts else ""
        )

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "num_steps": self.num_steps,
            "evaluations": self.evaluations,
            "skipped": self.skipped_total,
            "per_branch": {
                b: {"computed": self.computed[b], "skipped": self.skipped.get(b, [])} for b in self.computed
            },
        }


@dataclass
class _Branch:
    state: BranchState = field(default_factory=BranchState)
    step: int = 0
    last_t: float | None = None
    prev_indicator: dict[str, torch.Tensor] = field(default_factory=dict)
    residual: torch.Tensor | None = None


class FeatureCache:
    """Residual caching of the DiT block stack under a `CachePolicy`, cond and uncond kept apart.

    num_steps: the run length (needed for the end step and MagCache's table); `begin_run` may
    give it per run. trace: also record, per evaluation, every indicator's change and the
    residual magnitude ratio / cosine distance (used by calibration; costs a little time).
    """

    def __init__(self, policy: CachePolicy, num_steps: int | None = None, trace: bool = False):
        self.policy = policy
        self.num_steps = num_steps
        self.trace_enabled = trace
        self.trace: list[dict] = []
        self._branches: dict[str, _Branch] = {}
        self._model = None
        self._orig: dict[str, object] = {}
        self._t: float | None = None
        self._e: torch.Tensor | None = None
        self._last_call: tuple[float | None, str | None] = (None, None)

    # ---- the layer ------------------------------------------------------------------------
    name = "cache"

    def needed(self, model) -> bool:
        return layer_state(model).cache is not self

    def apply(self, model) -> None:
        self.attach(model)

    def remove(self, model) -> None:
        if layer_state(model).cache is self:
            self.detach()

    def attach(self, model) -> FeatureCache:
        if self._model is not None:
            raise RuntimeError("this FeatureCache is already attached to a model")
        if layer_state(model).cache is not None:
            raise RuntimeError("the model already has a feature cache attached; detach it first")
        self._orig = {name: model.__dict__.get(name) for name in ("embed_time", "forward_blocks")}
        inner_embed, inner_blocks = model.embed_time, model.forward_blocks

        def embed_time(t):
            e, e0 = inner_embed(t)
            self._t = float(t.reshape(-1)[0])
            self._e = e
            return e, e0

        def forward_blocks(x, e0, context, context_img, rope):
            return self._forward_blocks(inner_blocks, x, e0, context, context_img, rope)

        model.embed_time = embed_time
        model.forward_blocks = forward_blocks
        layer_state(model).cache = self
        self._model = model
        return self

    def detach(self) -> None:
        """Restore the model's own methods and free the cached tensors."""
        model = self._model
        if model is None:
            return
        for name, orig in self._orig.items():
            if orig is None:
                model.__dict__.pop(name, None)
            else:
                model.__dict__[name] = orig
        layer_state(model).cache = None
        self._model = None
        self._free()

    def _free(self) -> None:
        for b in self._branches.values():
            b.residual = None
            b.prev_indicator.clear()
        self._e = None

    # ---- runs -----------------------------------------------------------------------------
    def begin_run(self, num_steps: int | None = None) -> None:
        """Forget the previous run (residuals, states, counts); call before each sampling run."""
        if num_steps is not None:
            self.num_steps = int(num_steps)
        self._free()
        self._branches = {}
        self.trace = []
        self._last_call = (None, None)

    def report(self) -> CacheReport:
        return CacheReport(
            policy=self.policy.describe(),
            num_steps=self.num_steps,
            computed={k: list(b.state.computed) for k, b in self._branches.items()},
            skipped={k: list(b.state.skipped) for k, b in self._branches.items()},
        )

    # ---- the wrapped block stack --------------------------------------------------------
    def _which_branch(self) -> str:
        name = current_branch()
        if name is None:
            last_t, last_branch = self._last_call
            name = UNCOND if (last_t == self._t and last_branch == COND) else COND
        self._last_call = (self._t, name)
        return name

    def _indicator(self, kind: str, x, e0) -> torch.Tensor:
        if kind == "e0":
            return e0
        if kind == "e":
            if self._e is None:
                raise RuntimeError("the 'e' indicator needs the time embedding; was embed_time bypassed?")
            return self._e
        blk = self._model.blocks[0]
        mod = blk.modulation.float() + e0  # [B, 6, C], or [B, L, 6, C] per token (Wan2.2 TI2V)
        shift1, scale1 = mod[..., :2, :].unbind(-2)  # 2 x [B, C] (or [B, L, C])
        if mod.dim() == 3:
            shift1, scale1 = shift1[:, None], scale1[:, None]  # [B, 1, C]
        return blk.norm1(x) * (1 + scale1) + shift1  # [B, L, C] float32

    def _forward_blocks(self, inner, x, e0, context, context_img, rope):
        name = self._which_branch()
        br = self._branches.get(name)
        if br is None or (self._t is not None and br.last_t is not None and self._t > br.last_t):
            if br is not None and br.step:
                log.debug("feature cache: branch %s starts a new run (timestep rose)", name)
            br = self._branches[name] = _Branch()
        br.last_t = self._t
        step = br.step
        br.step += 1
        n = self.num_steps
        if n is None:
            raise RuntimeError(
                "FeatureCache does not know the run length: pass num_steps to FeatureCache(...) or begin_run(num_steps)"
            )
        if step >= n:
            raise RuntimeError(
                f"branch {name!r} evaluated {step + 1} times in a {n}-step run; call begin_run() between runs"
            )

        kinds = INDICATORS if self.trace_enabled else ((self.policy.indicator,) if self.policy.indicator else ())
        changes: dict[str, float | None] = {}
        for kind in kinds:
            cur = self._indicator(kind, x, e0)
            prev = br.prev_indicator.get(kind)
            changes[kind] = rel_l1(cur, prev) if prev is not None and prev.shape == cur.shape else None
            br.prev_indicator[kind] = cur.detach()
        change = changes.get(self.policy.indicator) if self.policy.indicator else None

        res = br.residual
        can_skip = res is not None and res.shape == x.shape and res.device == x.device
        st = br.state
        skip = self.policy.decide(st, step, n, name, change, can_skip)
        if skip:
            st.skips += 1
            st.skipped.append(step)
            out = x + res
        else:
            st.skips = 0
            st.computed.append(step)
            out = inner(x, e0, context, context_img, rope)
            new_res = out - x
            if self.trace_enabled:
                self._trace_residual(name, step, new_res, res, changes)
            br.residual = new_res
        if self.trace_enabled and skip:
            self.trace.append({"branch": name, "step": step, "t": self._t, "skipped": True, "changes": changes})
        return out

    def _trace_residual(self, name, step, res, prev, changes) -> None:
        rec = {
            "branch": name,
            "step": step,
            "t": self._t,
            "skipped": False,
            "changes": changes,
            "mag_ratio": None,
            "cos_dis": None,
        }
        if prev is not None and prev.shape == res.shape:
            r = res.float()
            p = prev.float()
            rec["mag_ratio"] = (r.norm(dim=-1) / p.norm(dim=-1)).mean().item()
            rec["cos_dis"] = (1 - torch.nn.functional.cosine_similarity(r, p, dim=-1, eps=1e-8)).mean().item()
        self.trace.append(rec)


@contextlib.contextmanager
def feature_cache(model, cache: FeatureCache | None, num_steps: int | None = None) -> Iterator[FeatureCache | None]:
    """Attach `cache` for one run (begin_run included) and detach it afterwards, even on error.

    `cache=None` is a no-op, so callers need no branch of their own.
    """
    if cache is None:
        yield None
        return
    apply_layers(model, [cache])
    try:
        cache.begin_run(num_steps)
        yield cache
    finally:
        cache.remove(model)
