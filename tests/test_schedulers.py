"""wan_core.sampling.schedulers against diffusers' schedulers, the official Wan UniPC file and LightX2V's distill formula.

The "model" is a fixed random affine map ``v = x @ A^T + b`` (deterministic, cheap), so whole sampling loops can be
compared step for step.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from wan_core.sampling.schedulers import (
    SCHEDULER_NAMES,
    FlowEulerScheduler,
    FlowUniPCScheduler,
    make_scheduler,
    scheduler_from_config,
)

OFFICIAL_UNIPC = Path(os.environ.get("WAN_REF_DIR", "/work/ref/Wan-Video+Wan2.1")) / "wan/utils/fm_solvers_unipc.py"

# Official Wan2.1 timesteps (FlowUniPCMultistepScheduler(shift=1).set_timesteps(N, shift=s)), recorded from
# wan/utils/fm_solvers_unipc.py: the defaults of generate.py for t2v (50, 5.0), i2v-480p (40, 3.0), i2v-720p (40, 5.0).
OFFICIAL_TIMESTEPS = {
    (50, 5.0): [999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 920, 913, 906, 898, 890,
                882, 873, 863, 854, 843, 833, 821, 809, 796, 783, 768, 753, 737, 720, 701, 681, 660, 636, 611, 584,
                555, 522, 487, 448, 405, 356, 302, 241, 172, 92],
    (40, 3.0): [999, 991, 982, 973, 963, 954, 944, 933, 922, 911, 899, 887, 874, 861, 847, 832, 817, 801, 785, 767,
                749, 730, 710, 688, 666, 642, 617, 590, 562, 531, 499, 465, 428, 388, 345, 299, 249, 195, 136, 71],
    (40, 5.0): [999, 994, 989, 983, 978, 972, 965, 959, 952, 944, 937, 929, 920, 911, 902, 892, 882, 870, 859, 846,
                833, 818, 803, 786, 768, 749, 728, 706, 681, 654, 624, 591, 555, 514, 468, 416, 356, 288, 208, 113],
}  # fmt: skip

CASES = [(1, 5.0), (2, 5.0), (3, 3.0), (7, 1.0), (10, 5.0), (25, 8.0), (40, 3.0), (50, 5.0)]
SHAPE = (1, 4, 2, 3, 3)  # [B, C, F, H, W]


def linear_model(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    d = int(torch.tensor(SHAPE).prod())
    a = (torch.randn(d, d, generator=g) * 0.5 / d**0.5).to(dtype)
    b = (torch.randn(d, generator=g) * 0.3).to(dtype)
    x = torch.randn(SHAPE, generator=g).to(dtype)
    return (lambda x: (x.flatten() @ a.T + b).view(SHAPE)), x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_ours(sched, model, x, start: int = 0):
    for i in range(start, len(sched)):
        x = sched.step(model(x), i, x)
    return x


def run_diffusers(sched, model, x, timesteps):
    for t in timesteps:
        x = sched.step(model(x), t, x, return_dict=False)[0]
    return x


def diffusers_unipc(shift: float) -> UniPCMultistepScheduler:
    """Configured as the Wan2.1 *-Diffusers repos' scheduler_config.json (used by diffusers' WanPipeline)."""
    return UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, disable_corrector=[],
        final_sigmas_type="zero", timestep_spacing="linspace",
    )  # fmt: skip


def official_unipc_grid(steps: int) -> np.ndarray:
    """The official unshifted sigma grid linspace(float32(0.999), 0, N+1)[:-1], as input for diffusers' `sigmas=`."""
    top = float(torch.tensor(0.999, dtype=torch.float32))
    return np.linspace(top, 0.0, steps + 1)[:-1]


def diffusers_unipc_official_grid(steps: int, shift: float) -> UniPCMultistepScheduler:
    d = diffusers_unipc(shift)
    d.set_timesteps(sigmas=official_unipc_grid(steps))
    return d


def load_official():
    if not OFFICIAL_UNIPC.is_file():
        pytest.skip(f"official Wan2.1 source not found at {OFFICIAL_UNIPC} (set WAN_REF_DIR)")
    spec = importlib.util.spec_from_file_location("_wan_official_fm_solvers_unipc", OFFICIAL_UNIPC)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.FlowUniPCMultistepScheduler


def official_unipc(steps: int, shift: float):
    s = load_official()(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)  # as wan/text2video.py
    s.set_timesteps(steps, shift=shift)
    return s


# ---------------------------------------------------------------------------------------------------------------
# UniPC
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps,shift", list(OFFICIAL_TIMESTEPS))
def test_unipc_timesteps_equal_recorded_official(steps, shift):
    s = make_scheduler("unipc", steps, shift)
    assert s.timesteps.dtype == torch.float32 and s.sigmas.dtype == torch.float32
    assert s.timesteps.tolist() == [float(t) for t in OFFICIAL_TIMESTEPS[(steps, shift)]]
    assert s.sigmas.shape == (steps + 1,) and s.sigmas[-1] == 0
    # t is int(1000 * sigma): truncated, so never above 1000 * sigma and less than 1 below it
    diff = s.sigmas[:-1].double() * 1000 - s.timesteps.double()
    assert (diff >= 0).all() and (diff < 1).all()


@pytest.mark.parametrize("steps,shift", CASES + [(200, 5.0), (13, 0.5), (30, 3.7)])
def test_unipc_tables_equal_official_file(steps, shift):
    o = official_unipc(steps, shift)
    s = make_scheduler("unipc", steps, shift)
    assert torch.equal(s.timesteps, o.timesteps.float())
    assert torch.equal(s.sigmas, o.sigmas)


@pytest.mark.parametrize("steps,shift", CASES)
def test_unipc_tables_equal_diffusers_given_official_grid(steps, shift):
    d = diffusers_unipc_official_grid(steps, shift)
    s = make_scheduler("flow_unipc", steps, shift)
    assert torch.equal(s.timesteps, d.timesteps.float())
    assert torch.equal(s.sigmas, d.sigmas)


def test_diffusers_default_unipc_grid_differs_from_official():
    """Documents why we don't follow diffusers' own set_timesteps(N): its unshifted grid starts at 1.0 (minus 1e-6),
    the official one at 0.999, so every sigma differs (and some integer timesteps)."""
    d = diffusers_unipc(5.0)
    d.set_timesteps(10)
    s = make_scheduler("unipc", 10, 5.0)
    assert d.sigmas[0] > 0.99999 and s.sigmas[0] < 0.9999
    assert not torch.equal(d.timesteps.float(), s.timesteps)
    assert (d.sigmas[:-1] - s.sigmas[:-1]).abs().min() > 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("steps,shift", CASES)
def test_unipc_loop_equals_diffusers(steps, shift, dtype):
    model, x = linear_model(dtype)
    d = diffusers_unipc_official_grid(steps, shift)
    d.set_begin_index(0)  # as WanPipeline does
    ref = run_diffusers(d, model, x.clone(), d.timesteps)
    out = run_ours(make_scheduler("unipc", steps, shift), model, x.clone())
    assert out.dtype == dtype
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("steps,shift", [(2, 5.0), (10, 5.0), (50, 5.0), (40, 3.0)])
def test_unipc_loop_equals_official(steps, shift):
    model, x = linear_model(torch.float32)
    o = official_unipc(steps, shift)
    ref = run_diffusers(o, model, x.clone(), o.timesteps)  # same step() calling convention as wan/text2video.py
    out = run_ours(make_scheduler("unipc", steps, shift), model, x.clone())
    assert rel_err(out, ref) <= 1e-5
    # diffusers with the official grid is the same algorithm: near-identical to the official file
    d = diffusers_unipc_official_grid(steps, shift)
    d.set_begin_index(0)
    assert rel_err(run_diffusers(d, model, x.clone(), d.timesteps), ref) <= 1e-6


def test_unipc_loop_with_corrector_is_not_euler():
    """The multistep/corrector path matters: a plain Euler walk over the same sigmas ends elsewhere."""
    model, x = linear_model(torch.float64)
    s = make_scheduler("unipc", 10, 5.0)
    euler = FlowEulerScheduler(s.timesteps, s.sigmas)
    assert rel_err(run_ours(euler, model, x.clone()), run_ours(s, model, x.clone())) > 1e-3


def test_unipc_start_mid_schedule_equals_diffusers_begin_index():
    model, x = linear_model(torch.float64)
    d = diffusers_unipc_official_grid(12, 5.0)
    d.set_begin_index(4)
    ref = run_diffusers(d, model, x.clone(), d.timesteps[4:])
    out = run_ours(make_scheduler("unipc", 12, 5.0), model, x.clone(), start=4)
    assert rel_err(out, ref) <= 1e-6


def test_unipc_last_step_lands_on_x0_prediction():
    model, x = linear_model(torch.float64)
    s = make_scheduler("unipc", 1, 5.0)
    v = model(x)
    assert torch.allclose(s.step(v, 0, x), x - s.sigmas[0].item() * v, rtol=0, atol=1e-12)


def test_unipc_state_does_not_leak_between_runs():
    model, x = linear_model(torch.float32)
    s = make_scheduler("unipc", 8, 5.0)
    first = run_ours(s, model, x.clone())
    # abandon a run half-way, then start again at step 0: same result as a brand-new object
    y = x.clone()
    for i in range(3):
        y = s.step(model(y) * 1.7, i, y)
    assert torch.equal(run_ours(s, model, x.clone()), first)
    assert torch.equal(run_ours(make_scheduler("unipc", 8, 5.0), model, x.clone()), first)
    s.reset()
    assert torch.equal(run_ours(s, model, x.clone(), start=0), first)


# ---------------------------------------------------------------------------------------------------------------
# Euler
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps,shift", CASES + [(4, 3.7), (30, 12.0)])
def test_euler_tables_equal_diffusers(steps, shift):
    d = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    d.set_timesteps(steps)
    s = make_scheduler("euler", steps, shift)
    assert torch.equal(s.timesteps, d.timesteps)
    assert torch.equal(s.sigmas, d.sigmas)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("steps,shift", [(1, 5.0), (4, 5.0), (20, 3.0), (50, 5.0)])
def test_euler_loop_equals_diffusers(steps, shift, dtype):
    model, x = linear_model(dtype)
    d = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    d.set_timesteps(steps)
    d.set_begin_index(0)
    ref = run_diffusers(d, model, x.clone(), d.timesteps)
    out = run_ours(make_scheduler("flow_euler", steps, shift), model, x.clone())
    assert out.dtype == dtype
    assert rel_err(out, ref) <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Step-distill (LightX2V)
# ---------------------------------------------------------------------------------------------------------------


def lightx2v_distill_tables(step_list, shift):
    """LightX2V WanStepDistillScheduler.set_denoising_timesteps, restated: a 1000-entry float32 table
    linspace(1, 0, 1001)[:-1], shifted, picked at 1000 - x."""
    table = torch.linspace(1.0, 0.0, 1001)[:-1]
    table = shift * table / (1 + (shift - 1) * table)
    idx = [1000 - x for x in step_list]
    return table[idx] * 1000, table[idx]


@pytest.mark.parametrize("step_list", [[1000, 750, 500, 250], [999, 750, 500, 250], [1000, 500], [600]])
@pytest.mark.parametrize("shift", [5, 5.0, 3.0, 8.0])
def test_distill_tables_equal_lightx2v(step_list, shift):
    t_ref, s_ref = lightx2v_distill_tables(step_list, shift)
    s = make_scheduler("distill", None, shift, step_list)
    assert len(s) == len(step_list)
    assert torch.equal(s.timesteps, t_ref)
    assert torch.equal(s.sigmas[:-1], s_ref) and s.sigmas[-1] == 0


def test_distill_known_values():
    s = make_scheduler("step_distill", 4, 5.0, [1000, 750, 500, 250])
    torch.testing.assert_close(s.timesteps, torch.tensor([1000.0, 937.5, 2500 / 3, 625.0]))
    torch.testing.assert_close(s.sigmas, torch.tensor([1.0, 0.9375, 5 / 6, 0.625, 0.0]))
    # 999 is table entry 1: unshifted 0.999, shifted 4.995 / 4.996; t not rounded
    s = make_scheduler("distill", 4, 5.0, [999, 750, 500, 250])
    assert abs(s.timesteps[0].item() - 4995 / 4.996) < 1e-3
    # float entries that are whole numbers (LightX2V-style JSON 1000.0) are accepted
    assert torch.equal(
        make_scheduler("distill", None, 5.0, [1000.0, 750.0]).timesteps, s.timesteps.new_tensor([1000, 937.5])
    )


def test_distill_euler_steps_by_hand():
    """LightX2V step_post: x0 = x - sigma * v; x = x0 + sigma_next * v (x0 itself after the last step)."""
    model, x = linear_model(torch.float32)
    s = make_scheduler("distill", None, 5.0, [1000, 750, 500, 250])
    _, sig = lightx2v_distill_tables([1000, 750, 500, 250], 5.0)
    ref, out = x.clone(), x.clone()
    for i in range(4):
        v = model(ref)
        ref = ref - sig[i].item() * v
        if i < 3:
            ref = ref + sig[i + 1].item() * v
        out = s.step(model(out), i, out)
    assert rel_err(out, ref) <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Interface, config mapping, dtypes, errors
# ---------------------------------------------------------------------------------------------------------------


def test_names_and_aliases():
    assert set(SCHEDULER_NAMES) == {"unipc", "flow_unipc", "euler", "flow_euler", "distill", "step_distill"}
    assert isinstance(make_scheduler("flow_unipc", 5, 3.0), FlowUniPCScheduler)
    assert make_scheduler("flow_euler", 5, 3.0).name == "euler"
    assert make_scheduler("step_distill", None, 5.0, [1000, 500]).name == "distill"


def test_scheduler_from_config_lightx2v_keys():
    # configs/distill/wan_t2v_distill_lora_4step_cfg.json (scheduler-relevant part)
    cfg = {"infer_steps": 4, "sample_shift": 5, "enable_cfg": False, "denoising_step_list": [1000, 750, 500, 250]}
    s = scheduler_from_config(cfg)
    assert s.name == "distill" and s.timesteps.tolist() == [1000.0, 937.5, s.timesteps[2].item(), 625.0]
    # LightX2V takes the step count from the list, whatever infer_steps says
    assert len(scheduler_from_config({**cfg, "infer_steps": 8})) == 4
    base = scheduler_from_config({"infer_steps": 50, "sample_shift": 5.0, "sample_guide_scale": 5.0})
    assert isinstance(base, FlowUniPCScheduler)
    assert base.timesteps.tolist() == [float(t) for t in OFFICIAL_TIMESTEPS[(50, 5.0)]]
    # official CLI names: sample_solver / sample_steps
    e = scheduler_from_config({"sample_solver": "euler", "sample_steps": 20, "sample_shift": 3.0})
    assert e.name == "euler" and len(e) == 20
    with pytest.raises(ValueError, match="dpm"):
        scheduler_from_config({"sample_solver": "dpm++", "infer_steps": 20, "sample_shift": 3.0})
    with pytest.raises(ValueError, match="sample_shift"):
        scheduler_from_config({"infer_steps": 20})
    with pytest.raises(ValueError, match="infer_steps"):
        scheduler_from_config({"sample_shift": 5.0})
    with pytest.raises(ValueError, match="disagree"):
        scheduler_from_config({"infer_steps": 20, "sample_steps": 30, "sample_shift": 5.0})
    with pytest.raises(ValueError, match="denoising_step_list"):
        scheduler_from_config({"scheduler_type": "WanStepDistillScheduler", "infer_steps": 4, "sample_shift": 5})


@pytest.mark.parametrize("name", ["unipc", "euler", "distill"])
def test_low_precision_in_same_dtype_out(name):
    s = make_scheduler(name, 3, 5.0, [1000, 750, 500] if name == "distill" else None)
    model, x = linear_model(torch.float32)
    xb = x.bfloat16()
    out = run_ours(s, lambda y: model(y.float()).bfloat16(), xb)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, run_ours(s, model, x.clone())) < 3e-2


def test_bad_inputs():
    for steps in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="steps must be an int >= 1"):
            make_scheduler("unipc", steps, 5.0)
    with pytest.raises(ValueError, match=r"unknown scheduler 'dpm'.*'distill'.*'euler'.*'unipc'"):
        make_scheduler("dpm", 10, 5.0)
    for shift in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="shift must be"):
            make_scheduler("euler", 10, shift)
    for bad in ([1001, 500], [1000, -5], [0], [1000, 500, 0]):
        with pytest.raises(ValueError, match=r"in \[1, 1000\]"):
            make_scheduler("distill", None, 5.0, bad)
    with pytest.raises(ValueError, match="integers"):
        make_scheduler("distill", None, 5.0, [1000, 908.84])
    with pytest.raises(ValueError, match="strictly decreasing"):
        make_scheduler("distill", None, 5.0, [250, 500, 750, 1000])
    with pytest.raises(ValueError, match="non-empty"):
        make_scheduler("distill", None, 5.0, [])
    with pytest.raises(ValueError, match="needs denoising_step_list"):
        make_scheduler("distill", 4, 5.0)
    with pytest.raises(ValueError, match="4 entries"):
        make_scheduler("distill", 3, 5.0, [1000, 750, 500, 250])
    with pytest.raises(ValueError, match="only used by the 'distill'"):
        make_scheduler("unipc", 4, 5.0, [1000, 750, 500, 250])

    s = make_scheduler("unipc", 4, 5.0)
    x = torch.zeros(SHAPE)
    for i in (-1, 4, 1.0):
        with pytest.raises(ValueError, match=r"step index must be an int in \[0, 3\]"):
            s.step(x, i, x)
    with pytest.raises(ValueError, match="shape"):
        s.step(torch.zeros(2, 3), 0, x)
    s.step(x, 0, x)
    with pytest.raises(ValueError, match="expected step 1, got 2"):
        s.step(x, 2, x)
