"""Flow-matching samplers for Wan2.1: UniPC (base model), Euler, and the step-distilled schedule.

Wan2.1 is a rectified-flow model: a latent at noise level ``sigma`` is ``x = (1 - sigma) * x0 + sigma * noise``
and the DiT predicts the velocity ``v = noise - x0``, so ``x0 = x - sigma * v``.  A scheduler owns two tables:

- ``sigmas``    float32 ``[N + 1]``: the noise level before each step, then 0 after the last one;
- ``timesteps`` float32 ``[N]``: the ``t`` handed to the DiT at step ``i`` (0..1000 scale).

``t`` is *not* always ``1000 * sigma``: the official UniPC path truncates it to an integer (see
``unipc_schedule``); the other two pass ``1000 * sigma`` unrounded.

Each table reproduces a reference bit for bit, float op for float op, because ``t`` is later truncated or
fed to a sinusoidal embedding and a one-ulp drift would change it:

- ``"unipc"``:   official Wan ``FlowUniPCMultistepScheduler(shift=1)`` + ``set_timesteps(N, shift=shift)``
  (wan/text2video.py, wan/image2video.py; LightX2V's ``WanScheduler`` is the same).  diffusers'
  ``UniPCMultistepScheduler(use_flow_sigmas=True)`` samples a grid offset by 0.001 (it starts at sigma 1.0,
  not 0.999); we follow the official code.
- ``"euler"``:   diffusers ``FlowMatchEulerDiscreteScheduler(shift=shift)`` + ``set_timesteps(N)``.
- ``"distill"``: LightX2V ``WanStepDistillScheduler`` (``denoising_step_list`` = indices into a shifted
  1000-entry table).

State: UniPC is multistep (it remembers the last two x0 predictions and the last input).  ``step(.., i=0, ..)``
always starts a fresh run, ``reset()`` does the same explicitly, and steps must then come in order
``i, i + 1, ...``; so one scheduler object can be reused for any number of runs without leaking state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

# The 4-step schedule of LightX2V's step-distilled models and LoRAs (Wan2.1 and Wan2.2 alike)
DISTILL_STEPS = (1000, 750, 500, 250)

SCHEDULER_NAMES: dict[str, str] = {
    "unipc": "unipc",
    "flow_unipc": "unipc",
    "euler": "euler",
    "flow_euler": "euler",
    "distill": "distill",
    "step_distill": "distill",
}


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow 'shift' warp ``s' = shift*s / (1 + (shift-1)*s)``: spends more steps at high noise when shift > 1.

    Written in the references' operation order so that float32/float64 results match them exactly.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _linspace64(start: float, stop: float, num: int) -> torch.Tensor:
    """``numpy.linspace(start, stop, num)`` in float64, same rounding (``i*step + start``, last = stop).

    ``torch.linspace`` rounds differently in its second half, which would move truncated integer timesteps.
    """
    i = torch.arange(num, dtype=torch.float64)
    if num == 1:
        return i + start
    y = i * ((stop - start) / (num - 1)) + start
    y[-1] = stop
    return y


def unipc_schedule(steps: int, shift: float, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Official Wan UniPC tables: ``(timesteps [N] float32, sigmas [N+1] float32)``.

    sigma grid = ``linspace(sigma_max, 0, N + 1)[:-1]`` with ``sigma_max = float32(1 - 1/T)`` (0.999 for
    T = 1000, the first entry of the training table), shifted in float64, then stored as float32.
    ``t = int(1000 * sigma)``: truncated toward zero in float64, as ``.to(torch.int64)`` does there.
    """
    sigma_max = float(torch.tensor(1.0 - 1.0 / num_train_timesteps, dtype=torch.float32))
    sigmas = shift_sigmas(_linspace64(sigma_max, 0.0, steps + 1)[:-1], shift)  # [N] float64
    timesteps = (sigmas * num_train_timesteps).to(torch.int64).to(torch.float32)
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)  # [N + 1]
    return timesteps, sigmas


def euler_schedule(steps: int, shift: float, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(N)`` tables.

    Note the quirk we reproduce: diffusers first shifts its float32 training table (so its smallest sigma is
    ``shift(1/T)``), spaces ``N`` timesteps linearly between ``1000 * shift(1)`` and ``1000 * shift(1/T)``, then
    shifts again.  ``t = 1000 * sigma`` in float32, not rounded.
    """
    ends = torch.tensor([num_train_timesteps, 1], dtype=torch.float32) / num_train_timesteps  # [2] float32
    sigma_max, sigma_min = shift_sigmas(ends, shift).tolist()
    ts = _linspace64(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, steps)
    sigmas = shift_sigmas(ts / num_train_timesteps, shift).to(torch.float32)  # [N]
    timesteps = sigmas * num_train_timesteps
    return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)])


def check_denoising_step_list(step_list: Sequence[float], num_train_timesteps: int = 1000) -> list[int]:
    """Validate a ``denoising_step_list`` and return it as ints; raises ``ValueError`` with the reason."""
    if isinstance(step_list, (str, bytes)) or not isinstance(step_list, Sequence) or len(step_list) == 0:
        raise ValueError(f"denoising_step_list must be a non-empty list of integers, got {step_list!r}")
    out = []
    for x in step_list:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not float(x).is_integer():
            raise ValueError(
                f"denoising_step_list entries must be integers (indices into the {num_train_timesteps}-entry "
                f"sigma table), got {x!r} in {list(step_list)}"
            )
        if not 1 <= x <= num_train_timesteps:
            raise ValueError(
                f"denoising_step_list entries must lie in [1, {num_train_timesteps}], got {x!r} in {list(step_list)}"
                + (
                    " (0 would index past the table's last entry; the final step always ends at sigma 0)"
                    if x == 0
                    else ""
                )
            )
        out.append(int(x))
    if any(b >= a for a, b in zip(out, out[1:])):
        raise ValueError(f"denoising_step_list must be strictly decreasing (high noise first), got {out}")
    return out


def distill_schedule(
    step_list: Sequence[float], shift: float, num_train_timesteps: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """LightX2V ``WanStepDistillScheduler`` tables for an explicit ``denoising_step_list``.

    Table: ``sigma_k = shift(linspace(1, 0, T + 1)[k])`` for k = 0..T-1 (float32, torch.linspace); the entry
    ``x`` of the list selects ``k = T - x``.  So 1000 -> sigma 1.0, 750 -> shift(0.75), 999 -> shift(0.999).
    ``t = 1000 * sigma`` in float32 (e.g. 937.5 for 750 at shift 5), not rounded.  Sigma after the last step: 0.
    """
    idx = [num_train_timesteps - x for x in check_denoising_step_list(step_list, num_train_timesteps)]
    table = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float32)[:-1]  # [T]
    table = shift_sigmas(table, shift)
    sigmas = table[idx]  # [N]
    timesteps = sigmas * num_train_timesteps
    return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)])


# ----------------------------------------------------------------------------------------------------------------
# Steppers
# ----------------------------------------------------------------------------------------------------------------


class FlowScheduler:
    """Common part: the two tables, index bookkeeping, dtype policy.

    ``step(model_output, i, sample)`` takes the velocity predicted at ``(sample, timesteps[i])`` and returns the
    sample at ``sigmas[i + 1]``.  Math runs in float32 (float64 if the sample is float64); the result has the
    sample's dtype.
    """

    name = ""

    def __init__(self, timesteps: torch.Tensor, sigmas: torch.Tensor):
        self.timesteps = timesteps  # [N] float32: t the DiT receives
        self.sigmas = sigmas  # [N + 1] float32, last = 0
        self._next: int | None = None  # index the next step() must have; None = fresh run
        self.reset()

    def __len__(self) -> int:
        return len(self.timesteps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={len(self)}, timesteps={[round(t, 3) for t in self.timesteps.tolist()]})"

    def reset(self) -> None:
        """Forget any previous run (also done automatically by ``step(..., i=0, ...)``)."""
        self._next = None

    def _begin(self, model_output: torch.Tensor, i: int, sample: torch.Tensor) -> torch.dtype:
        """Check the call and advance the step counter; returns the compute dtype."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self):
            raise ValueError(f"step index must be an int in [0, {len(self) - 1}], got {i!r}")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}")
        if i == 0:
            self.reset()
        if self._next is not None and i != self._next:
            raise ValueError(f"steps must run in order: expected step {self._next}, got {i} (call reset() to restart)")
        self._next = i + 1
        return torch.float64 if sample.dtype == torch.float64 else torch.float32

    def step(self, model_output: torch.Tensor, i: int, sample: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FlowEulerScheduler(FlowScheduler):
    """First-order flow ODE step ``x_next = x + (sigma_next - sigma) * v`` (stateless apart from the counter)."""

    def __init__(self, timesteps: torch.Tensor, sigmas: torch.Tensor, name: str = "euler"):
        super().__init__(timesteps, sigmas)
        self.name = name

    def step(self, model_output: torch.Tensor, i: int, sample: torch.Tensor) -> torch.Tensor:
        dtype = self._begin(model_output, i, sample)
        dt = (self.sigmas[i + 1] - self.sigmas[i]).item()  # float32 difference, as diffusers
        return (sample.to(dtype) + dt * model_output.to(dtype)).to(sample.dtype)


def _log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma (half log-SNR of the flow path)."""
    return math.log(1.0 - sigma) - math.log(sigma)


class FlowUniPCScheduler(FlowScheduler):
    """UniPC multistep, as configured by the official Wan code: order 2, x0-prediction, B(h) = expm1(-h) ("bh2"),
    order 1 on the first step (warm-up) and on the last step (lower_order_final), corrector on every step after
    the first of a run (no disable_corrector).

    Per step ``i`` (sigma ``s = sigmas[i]`` -> ``t = sigmas[i+1]``, ``x0_i = x_i - s * v_i``):

    1. UniC corrector (``i`` > first step of the run): re-does the previous step ``i-1 -> i`` with the fresh
       ``x0_i`` added to the fit, replacing ``x_i`` before it is used below.
    2. UniP predictor of order p: ``x_t = (t/s) x_i - alpha_t (e^{-h} - 1) x0_i  [- alpha_t (e^{-h} - 1) / 2 * D1]``
       with ``h = lambda_t - lambda_s`` and, for p = 2, ``D1 = (x0_{i-1} - x0_i) / r``,
       ``r = (lambda_{i-1} - lambda_s) / h``.  At t = 0 (last step, p = 1) this is exactly ``x0_i``.

    Coefficients are computed in float64 from the float32 sigma table (the reference does them in float32;
    the difference is ~1e-7 relative).
    """

    name = "unipc"

    def reset(self) -> None:
        super().reset()
        self._x0: list[torch.Tensor] = []  # x0 predictions of this run, newest last (at most 2 kept)
        self._last_sample: torch.Tensor | None = None  # input x of the previous step (after its correction)
        self._last_order = 0  # predictor order used by the previous step

    def _lam(self, k: int) -> float:
        return _log_snr(self.sigmas[k].item())

    def step(self, model_output: torch.Tensor, i: int, sample: torch.Tensor) -> torch.Tensor:
        dtype = self._begin(model_output, i, sample)  # i == 0 (or a fresh run) starts with empty history
        x = sample.to(dtype)
        x0 = x - self.sigmas[i].item() * model_output.to(dtype)

        if self._last_sample is not None:
            x = self._correct(i, x0)
        self._x0 = (self._x0 + [x0])[-2:]
        # warm-up (one order per step done) and lower_order_final (order 1 on the last step)
        order = min(2, len(self) - i, len(self._x0))
        self._last_sample, self._last_order = x, order
        return self._predict(i, x, order).to(sample.dtype)

    def _predict(self, i: int, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP-order ``order`` from sigmas[i] to sigmas[i+1], using self._x0 = [..., x0_{i-1}, x0_i]."""
        s, t = self.sigmas[i].item(), self.sigmas[i + 1].item()
        m0 = self._x0[-1]
        if t == 0.0:  # h = inf: exp(-h) = 0, the step lands on the x0 prediction (order 1 here by construction)
            return m0.clone()
        h = self._lam(i + 1) - self._lam(i)
        e = math.expm1(-h)  # h*phi_1(-h) = B(h) for bh2
        x_t = (t / s) * x - ((1.0 - t) * e) * m0
        if order == 2:
            r = (self._lam(i - 1) - self._lam(i)) / h
            d1 = (self._x0[-2] - m0) / r
            x_t = x_t - ((1.0 - t) * e * 0.5) * d1
        return x_t

    def _correct(self, i: int, x0_new: torch.Tensor) -> torch.Tensor:
        """UniC: refit the step sigmas[i-1] -> sigmas[i] with x0_new, from the stored input of step i-1."""
        s, t = self.sigmas[i - 1].item(), self.sigmas[i].item()
        x, m0 = self._last_sample, self._x0[-1]
        h = self._lam(i) - self._lam(i - 1)
        hh = -h
        e = math.expm1(hh)
        base = (t / s) * x - ((1.0 - t) * e) * m0
        if self._last_order == 1:
            rho_d1, rho_t = 0.0, 0.5
            d1 = None
        else:
            # Solve [[1, 1], [r, 1]] @ [rho_d1, rho_t] = [b1, b2] with b_k = k! * phi_{k+1}(hh) * hh / B(h)
            r = (self._lam(i - 2) - self._lam(i - 1)) / h
            phi2 = e / hh - 1.0
            phi3 = phi2 / hh - 0.5
            b1, b2 = phi2 / e, 2.0 * phi3 / e
            rho_d1 = (b1 - b2) / (1.0 - r)
            rho_t = b1 - rho_d1
            d1 = (self._x0[-2] - m0) / r
        corr = rho_t * (x0_new - m0)
        if d1 is not None:
            corr = corr + rho_d1 * d1
        return base - ((1.0 - t) * e) * corr


# ----------------------------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------------------------


def _check_common(steps: object, shift: object, num_train_timesteps: object) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")


def make_scheduler(
    name: str,
    steps: int | None,
    shift: float,
    denoising_step_list: Sequence[float] | None = None,
    num_train_timesteps: int = 1000,
) -> FlowScheduler:
    """Build a scheduler by name: "unipc"/"flow_unipc", "euler"/"flow_euler", "distill"/"step_distill".

    ``steps`` is the number of DiT evaluations; for "distill" it may be None (taken from
    ``denoising_step_list``, which that scheduler requires and the others reject).
    """
    key = SCHEDULER_NAMES.get(name) if isinstance(name, str) else None
    if key is None:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULER_NAMES)}")
    if key == "distill":
        if denoising_step_list is None:
            raise ValueError("the 'distill' scheduler needs denoising_step_list, e.g. [1000, 750, 500, 250]")
        n = len(denoising_step_list) if isinstance(denoising_step_list, Sequence) else 0
        if steps is None:
            steps = max(n, 1)
        _check_common(steps, shift, num_train_timesteps)
        if n and steps != n:
            raise ValueError(f"steps={steps} but denoising_step_list has {n} entries {list(denoising_step_list)}")
        return FlowEulerScheduler(*distill_schedule(denoising_step_list, shift, num_train_timesteps), name="distill")
    if denoising_step_list is not None:
        raise ValueError(f"denoising_step_list is only used by the 'distill' scheduler, not {name!r}")
    _check_common(steps, shift, num_train_timesteps)
    if key == "unipc":
        return FlowUniPCScheduler(*unipc_schedule(steps, shift, num_train_timesteps))
    return FlowEulerScheduler(*euler_schedule(steps, shift, num_train_timesteps), name="euler")


def scheduler_from_config(cfg: Mapping) -> FlowScheduler:
    """Build a scheduler from a LightX2V-style (or official Wan CLI-style) config dict.

    Keys read (others ignored):
    - ``denoising_step_list`` (LightX2V): present and not None -> "distill"; its length sets the step count,
      overriding ``infer_steps`` as LightX2V does.  ``scheduler_type: "WanStepDistillScheduler"`` also selects
      "distill" (then the list is required).
    - ``sample_solver`` (official Wan ``--sample_solver``; LightX2V has no such key): a scheduler name,
      default "unipc" (what both the official code and LightX2V's ``WanScheduler`` run).
    - ``infer_steps`` (LightX2V) or ``sample_steps`` (official Wan): number of steps.
    - ``sample_shift`` (both): the shift (required).
    - ``num_train_timesteps`` (official config): default 1000.
    """
    step_list = cfg.get("denoising_step_list")
    if step_list is not None or cfg.get("scheduler_type") == "WanStepDistillScheduler":
        solver = "distill"
    else:
        solver = cfg.get("sample_solver", "unipc")
        if solver == "dpm++":
            raise ValueError("sample_solver 'dpm++' is not implemented; use 'unipc' (the official default) or 'euler'")
    if "sample_shift" not in cfg:
        raise ValueError("config has no 'sample_shift' (e.g. 5.0 for t2v / i2v-720p, 3.0 for i2v-480p)")
    shift = cfg["sample_shift"]
    if isinstance(shift, (list, tuple)):
        raise ValueError(f"per-stage sample_shift lists are not supported (Wan2.1 uses one shift), got {shift!r}")
    num_train = cfg.get("num_train_timesteps", 1000)
    if SCHEDULER_NAMES.get(solver) == "distill":
        return make_scheduler("distill", None, shift, step_list, num_train)

    steps = [cfg[k] for k in ("infer_steps", "sample_steps") if cfg.get(k) is not None]
    if not steps:
        raise ValueError("config has no 'infer_steps' (or 'sample_steps')")
    if len(steps) == 2 and steps[0] != steps[1]:
        raise ValueError(f"infer_steps={steps[0]} and sample_steps={steps[1]} disagree")
    return make_scheduler(solver, steps[0], shift, None, num_train)
