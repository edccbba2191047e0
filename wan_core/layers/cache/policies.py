"""When to skip a DiT evaluation: the TeaCache and MagCache decision rules.

A policy is plain configuration plus one method, `decide`, called once per evaluation of one
guidance branch with that branch's small mutable state (`BranchState`). It never sees tensors:
the caching layer (`layer.py`) measures the indicator and owns the residuals, so a rule can be
unit-tested, simulated over a published curve (benchmarks/bench_cache.py) and reasoned about
without a model.

Both rules follow the reference implementations (TeaCache4Wan2.1 / MagCache4Wan2.1 and LightX2V's
`WanTransformerInferTeaCaching` / `WanTransformerInferMagCaching`) step for step, plus two
things the references do not have: a threshold <= 0 switches skipping off entirely (so
"threshold 0" is exactly the uncached run, even though a TeaCache polynomial can go negative),
and an optional cap on consecutive skips for TeaCache (MagCache's K is that cap already).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BranchState", "CachePolicy", "TeaCachePolicy", "MagCachePolicy", "resample_nearest", "simulate", "INDICATORS"]

# What a TeaCache-style policy measures between two steps of one branch:
#   "e"      the time embedding [B, dim]           (TeaCache4Wan2.1 without ret steps)
#   "e0"     the time projection [B, 6, dim]        (TeaCache4Wan2.1 with ret steps)
#   "block0" the modulated input of block 0, norm1(x) * (1 + scale1) + shift1 [B, L, dim]
#            (the TeaCache paper's indicator; content-dependent; needs calibrated coefficients)
INDICATORS = ("e", "e0", "block0")


@dataclass
class BranchState:
    """Decision state of one guidance branch within one run (reset by `FeatureCache.begin_run`)."""

    acc: float = 0.0  # TeaCache: accumulated rescaled change; MagCache: accumulated error
    ratio: float = 1.0  # MagCache: product of magnitude ratios since the last computed step
    skips: int = 0  # consecutive skipped steps since the last computed one
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)

    def reset_accumulators(self) -> None:
        self.acc, self.ratio, self.skips = 0.0, 1.0, 0


class CachePolicy:
    """Base class. `indicator` names the change measure the layer must supply (None: none)."""

    name = "NoCaching"
    indicator: str | None = None

    def decide(
        self, st: BranchState, step: int, num_steps: int, branch: str, change: float | None, can_skip: bool
    ) -> bool:
        """True to reuse the branch's cached residual at `step` (0-based) of a `num_steps` run.

        change: the indicator's relative L1 change since this branch's previous step (None when
        there is no previous step); can_skip: False when the layer has no usable residual.
        Implementations must leave `st` consistent whatever they return.
        """
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


def _end(end_step: int | None, num_steps: int) -> int:
    if end_step is None:
        return num_steps
    return end_step if end_step >= 0 else num_steps + end_step


@dataclass
class TeaCachePolicy(CachePolicy):
    """TeaCache: accumulate poly(relative L1 change of the indicator); skip while below `thresh`.

    start_step: steps before it are always computed (TeaCache's "ret steps": 5 with
    `use_ret_steps`, else 1); end_step: steps from it on are always computed (None: none, the
    reference with ret steps; -1: the last step, the reference without); max_skips: cap on
    consecutive skips (None: no cap, as the reference). `coefficients` (highest degree first,
    `numpy.poly1d` order) rescale the raw change into an estimate of the output change; None
    uses the raw change.
    """

    thresh: float = 0.2
    coefficients: Sequence[float] | None = None
    indicator: str = "e0"
    start_step: int = 5
    end_step: int | None = None
    max_skips: int | None = None
    name = "Tea"

    def __post_init__(self):
        if self.indicator not in INDICATORS:
            raise ValueError(f"TeaCache indicator must be one of {INDICATORS}, got {self.indicator!r}")
        if self.max_skips is not None and self.max_skips < 0:
            raise ValueError(f"max_skips must be >= 0 or None, got {self.max_skips}")
        self._poly = np.poly1d(list(self.coefficients)) if self.coefficients is not None else None

    def rescale(self, change: float) -> float:
        return float(self._poly(change)) if self._poly is not None else float(change)

    def decide(self, st, step, num_steps, branch, change, can_skip):
        if self.thresh <= 0 or change is None or step < self.start_step or step >= _end(self.end_step, num_steps):
            st.acc = 0.0
            return False
        st.acc += self.rescale(change)
        capped = self.max_skips is not None and st.skips >= self.max_skips
        if can_skip and st.acc < self.thresh and not capped:
            return True
        st.acc = 0.0
        return False

    def describe(self) -> str:
        cap = f", max {self.max_skips} in a row" if self.max_skips is not None else ""
        end = f", end {self.end_step}" if self.end_step is not None else ""
        return f"Tea(thresh {self.thresh}, indicator {self.indicator}, start {self.start_step}{end}{cap})"


def resample_nearest(values: Sequence[float], n: int) -> list[float]:
    """A per-step table for `n` steps from one made for len(values) steps (MagCache's nearest rule)."""
    src = np.asarray(values, dtype=np.float64)
    if n == len(src):
        return src.tolist()
    if n == 1:
        return [float(src[-1])]
    idx = np.round(np.arange(n) * ((len(src) - 1) / (n - 1))).astype(int)
    return src[idx].tolist()


@dataclass
class MagCachePolicy(CachePolicy):
    """MagCache: skip while the accumulated |1 - prod(magnitude ratios)| stays below `thresh`.

    ratios: (cond table, uncond table), per step of the run the table was calibrated on
    (resampled to the run's step count); a branch other than "uncond" uses the cond table.
    K: cap on consecutive skips; retention_ratio: the first int(num_steps * ratio) steps are
    always computed (start_step overrides it); end_step: steps from it on are always computed
    (None: none, as the reference). The decision depends on the step only, never on the data.
    """

    ratios: tuple[Sequence[float], Sequence[float]] = ((), ())
    thresh: float = 0.24
    K: int = 6
    retention_ratio: float = 0.2
    start_step: int | None = None
    end_step: int | None = None
    name = "Mag"
    indicator = None

    def __post_init__(self):
        if len(self.ratios) != 2 or not len(self.ratios[0]) or not len(self.ratios[1]):
            raise ValueError("MagCache needs two non-empty magnitude-ratio tables (cond, uncond)")
        self._tables: dict[int, tuple[list[float], list[float]]] = {}

    def table(self, branch: str, num_steps: int) -> list[float]:
        if num_steps not in self._tables:
            self._tables[num_steps] = tuple(resample_nearest(r, num_steps) for r in self.ratios)
        return self._tables[num_steps][1 if branch == "uncond" else 0]

    def first_step(self, num_steps: int) -> int:
        return self.start_step if self.start_step is not None else int(num_steps * self.retention_ratio)

    def decide(self, st, step, num_steps, branch, change, can_skip):
        if self.thresh <= 0 or step < self.first_step(num_steps) or step >= _end(self.end_step, num_steps):
            st.reset_accumulators()
            return False
        st.ratio *= self.table(branch, num_steps)[step]
        st.acc += abs(1.0 - st.ratio)
        # the reference counts this step before comparing with K: at most K skips in a row
        if can_skip and st.acc < self.thresh and st.skips + 1 <= self.K:
            return True
        st.reset_accumulators()
        return False

    def describe(self) -> str:
        return f"Mag(thresh {self.thresh}, K {self.K}, retention {self.retention_ratio})"


def simulate(policy: CachePolicy, num_steps: int, changes: Sequence[float] | None = None, branch: str = "cond") -> list[bool]:
    """The computed (True) / skipped (False) pattern of one branch over a run, without a model.

    changes[i]: the indicator change at step i (ignored at step 0, which has no previous step);
    needed by TeaCache, unused by MagCache (whose pattern depends on the step only). Mirrors
    what the caching layer does around `decide`.
    """
    st, computed = BranchState(), []
    for i in range(num_steps):
        change = None if changes is None or i == 0 else float(changes[i])
        skip = policy.decide(st, i, num_steps, branch, change, can_skip=i > 0)
        st.skips = st.skips + 1 if skip else 0
        computed.append(not skip)
    return computed
