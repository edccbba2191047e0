"""Whole Wan2.2 runs against diffusers' pipelines on the same random weights (CPU, fp32).

A14B T2V / I2V: two tiny experts with different random weights, the official boundary rule
(t >= boundary * 1000: high-noise expert with its own guidance scale), UniPC on the official grid.
diffusers 0.42.1 (pipelines/wan/pipeline_wan.py, pipeline_wan_i2v.py) applies the same rule:
`transformer` is the high-noise expert with `guidance_scale`, `transformer_2` the low-noise one
with `guidance_scale_2`, switched where `t >= boundary_ratio * num_train_timesteps`. Its default
UniPC grid starts at sigma 1.0 (the official one at 0.999), so its scheduler is handed the official
grid as for Wan2.1 (`_FixedGrid`, tests/test_pipeline.py). Both sides get the same prompt
embeddings (diffusers' zero-padded to 512; ours unpadded, the DiT pads) and the same noise.

I2V-A14B: no CLIP image encoder; y = 4 mask channels + the tiny Wan2.1 VAE's latent of [image,
black frames], built by our `prepare_i2v` and by diffusers' `prepare_latents` from the same image
(diffusers is given the image already resized to the size the official rule picks).

TI2V-5B: one dense 48-channel model, per-token timesteps (diffusers' `expand_timesteps=True`).
Text only: uniform per-token t == our scalar t. With an image: latent frame 0 held at the image's
latent z (tiny Wan2.2 VAE), its tokens at t = 0. Mechanism difference (not a result difference):
the official loop (wan/textimage2video.py) writes z into frame 0 before the first step and after
every scheduler step; diffusers blends z into the *model input* only, lets the scheduler carry its
own frame 0, and blends once at the end. The UniPC update is elementwise with scalar
coefficients, so frames 1.. see identical arithmetic either way and the final latents agree; we
follow the official loop.

The ComfyUI / LightX2V step split (`ExpertSwitch(step=k)`) has no diffusers counterpart: it is
checked against a hand-written loop over diffusers' transformers and scheduler.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch

from wan_core.loading.dit import build_model
from wan_core.loading.vae import diffusers_to_official
from wan_core.loading.vae22 import diffusers22_to_official
from wan_core.models.conditioning import image_to_tensor, prepare_i2v, prepare_ti2v, resize_image
from wan_core.models.vae import WanVAE, WanVAEConfig
from wan_core.models.vae22 import Wan22VAE
from wan_core.sampling.denoise import denoise
from wan_core.sampling.experts import Experts, ExpertSwitch
from wan_core.sampling.first_frame import FirstFrame
from wan_core.sampling.loop import Cond, make_noise, sample
from wan_core.sampling.schedulers import make_scheduler

from .test_dit import random_state_dict, rel_err
from .test_pipeline import _FixedGrid
from .test_schedulers import diffusers_unipc, official_unipc_grid
from .test_vae import TINY as TINY_VAE21
from .test_vae import _randomize
from .test_vae22 import TINY as TINY_VAE22
from .test_vae22 import TINY_CONFIG as TINY_VAE22_CONFIG
from .test_wan22_dit import diffusers22, tiny22

TOL = 1e-4  # the bound for whole runs (fp32)


# ----------------------------------------------------------------------------------------------
# tiny models: ours and diffusers' with the same random weights


def _dit_pair(kind: str, seed: int):
    cfg = tiny22(kind)
    sd = random_state_dict(cfg, seed=seed)
    return build_model(cfg, sd, dtype=torch.float32), diffusers22(cfg, sd)


@pytest.fixture(scope="module")
def t2v_experts():
    (hi, dhi), (lo, dlo) = _dit_pair("t2v", 21), _dit_pair("t2v", 22)
    return hi, lo, dhi, dlo


@pytest.fixture(scope="module")
def i2v_experts():
    (hi, dhi), (lo, dlo) = _dit_pair("i2v", 31), _dit_pair("i2v", 32)
    return hi, lo, dhi, dlo


@pytest.fixture(scope="module")
def vae21():
    from diffusers import AutoencoderKLWan

    ref = AutoencoderKLWan(**TINY_VAE21).eval()
    _randomize(ref, seed=5)
    ours = WanVAE(WanVAEConfig(dim=8)).eval()
    ours.load_state_dict(diffusers_to_official(ref.state_dict()), strict=True)
    return ours, ref


@pytest.fixture(scope="module")
def vae22():
    from diffusers import AutoencoderKLWan

    ref = AutoencoderKLWan(**TINY_VAE22).eval()
    _randomize(ref, seed=6)
    ours = Wan22VAE(TINY_VAE22_CONFIG).eval()
    ours.load_state_dict(diffusers22_to_official(ref.state_dict()), strict=True)
    return ours, ref


def _embeds(text_dim: int, seed: int, n_cond: int = 9, n_neg: int = 5):
    """(ours cond, ours uncond, diffusers prompt_embeds, negative_prompt_embeds): random T5-like
    features; diffusers gets them zero-padded to 512 tokens as its encode_prompt makes them."""
    g = torch.Generator().manual_seed(seed)
    ctx, neg = torch.randn(n_cond, text_dim, generator=g), torch.randn(n_neg, text_dim, generator=g)

    def pad(c):
        return torch.cat([c, c.new_zeros(512 - c.shape[0], text_dim)])[None]  # [1, 512, D]

    return Cond([ctx]), Cond([neg]), pad(ctx), pad(neg)


def _diffusers_pipe(cls_name: str, steps: int, shift: float, vae=None, **components):
    import diffusers

    pipe = getattr(diffusers, cls_name)(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=diffusers_unipc(shift), **components
    )
    _FixedGrid.install(pipe.scheduler, official_unipc_grid(steps))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def _recording(*models):
    """Per module, the timestep of each forward call (ours: 2nd argument; diffusers': `timestep=`)."""
    seen = [[] for _ in models]

    def hook(log):
        return lambda m, args, kw: log.append((kw["timestep"] if "timestep" in kw else args[1]).clone())

    handles = [m.register_forward_pre_hook(hook(log), with_kwargs=True) for m, log in zip(models, seen)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _run_diffusers(pipe, noise, pe, npe, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # [-1, 1] image tensors, progress bars
        with torch.no_grad():
            out = pipe(prompt_embeds=pe, negative_prompt_embeds=npe, latents=noise.clone(), output_type="latent",
                       num_inference_steps=kw.pop("steps"), **kw)  # fmt: skip
    return out.frames


# ----------------------------------------------------------------------------------------------
# A14B T2V: two experts, boundary switch, guidance per expert


@pytest.mark.parametrize("boundary", [0.875, 0.892])  # official T2V; t = 892 on the boundary: high (t >= b)
def test_a14b_t2v_two_experts_equal_diffusers(t2v_experts, boundary):
    hi, lo, dhi, dlo = t2v_experts
    steps, shift, g_high, g_low = 8, 5.0, 4.0, 3.0  # the official T2V scales: (low 3, high 4)
    sched = make_scheduler("unipc", steps, shift)
    plan = ExpertSwitch(boundary=boundary).plan(sched.timesteps)
    assert plan == [True] * 4 + [False] * 4  # t 999 972 937 892 | 833 749 624 416: both run several steps
    cond, uncond, pe, npe = _embeds(hi.cfg.text_dim, seed=1)
    noise = make_noise((1, 16, 3, 4, 6), seed=7)

    experts = Experts(hi, lo, ExpertSwitch(boundary=boundary), guidance_high=g_high, guidance_low=g_low)
    with _recording(hi, lo) as ours_calls:
        got, report = denoise(experts, noise, sched, cond, uncond, guidance=99.0)  # `guidance` unused with Experts
    assert report is None and [len(c) for c in ours_calls] == [8, 8]  # 4 CFG steps each

    pipe = _diffusers_pipe("WanPipeline", steps, shift, transformer=dhi, transformer_2=dlo, boundary_ratio=boundary)
    with _recording(dhi, dlo) as ref_calls:
        exp = _run_diffusers(pipe, noise, pe, npe, steps=steps, height=32, width=48, num_frames=9,
                             guidance_scale=g_high, guidance_scale_2=g_low)  # fmt: skip
    assert [len(c) for c in ref_calls] == [8, 8]
    assert [float(t) for t in ref_calls[0][::2] + ref_calls[1][::2]] == sched.timesteps.tolist()
    assert got.shape == exp.shape == noise.shape
    err = rel_err(got, exp)
    assert err <= TOL, err  # measured 2.0e-6

    # each expert's own weights and scale matter: one expert for all steps, or swapped scales, end elsewhere
    with torch.no_grad():
        only_high = sample(Experts(hi, hi, ExpertSwitch(boundary=boundary), g_high, g_low), noise, sched, cond, uncond)
        swapped = sample(Experts(hi, lo, ExpertSwitch(boundary=boundary), g_low, g_high), noise, sched, cond, uncond)
    assert rel_err(only_high, exp) > 1e-2 and rel_err(swapped, exp) > 1e-3


def _hand_loop(models_per_step, guidance_per_step, sched, noise, pe, npe):
    """A reference denoising loop written out: diffusers' transformers and scheduler, CFG per step."""
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        m, g = models_per_step[i], guidance_per_step[i]
        tt = t.expand(x.shape[0]).float()
        v_c = m(x, tt, pe, return_dict=False)[0]
        v_u = m(x, tt, npe, return_dict=False)[0]
        x = sched.step(v_u + g * (v_c - v_u), t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("k", [2, 5])
def test_step_split_equals_hand_written_loop(t2v_experts, k):
    """ExpertSwitch(step=k) (ComfyUI's KSamplerAdvanced split, LightX2V's boundary_step_index):
    steps 0..k-1 on the high-noise expert, whatever the timesteps."""
    hi, lo, dhi, dlo = t2v_experts
    steps, shift, g_high, g_low = 6, 5.0, 3.5, 2.0
    sched = make_scheduler("unipc", steps, shift)
    boundary_plan = ExpertSwitch(boundary=0.875).plan(sched.timesteps)
    assert sum(boundary_plan) == 3 != k  # the step split is not the boundary split here
    cond, uncond, pe, npe = _embeds(hi.cfg.text_dim, seed=2)
    noise = make_noise((1, 16, 2, 4, 4), seed=3)
    with torch.no_grad():
        got = sample(Experts(hi, lo, ExpertSwitch(step=k), g_high, g_low), noise, sched, cond, uncond)
        ref_sched = diffusers_unipc(shift)
        ref_sched.set_timesteps(sigmas=official_unipc_grid(steps))
        high = [i < k for i in range(steps)]
        exp = _hand_loop(
            [dhi if h else dlo for h in high], [g_high if h else g_low for h in high], ref_sched, noise, pe, npe
        )
        by_boundary = sample(Experts(hi, lo, ExpertSwitch(boundary=0.875), g_high, g_low), noise, sched, cond, uncond)
    err = rel_err(got, exp)
    assert err <= TOL, err  # measured 3.5e-6
    assert rel_err(by_boundary, exp) > 1e-3


# ----------------------------------------------------------------------------------------------
# A14B I2V: no CLIP, y = mask + first-frame latent (Wan2.1 VAE)


def test_a14b_i2v_two_experts_equal_diffusers(i2v_experts, vae21):
    hi, lo, dhi, dlo = i2v_experts
    vae, ref_vae = vae21
    assert not hasattr(hi, "img_emb") and dhi.config.image_dim is None
    steps, shift, boundary, g_high, g_low = 6, 5.0, 0.900, 3.5, 2.5  # official I2V boundary
    sched = make_scheduler("unipc", steps, shift)
    assert ExpertSwitch(boundary=boundary).plan(sched.timesteps) == [True] * 3 + [False] * 3  # 999 961 908 | 833 ...
    frames = 9
    rng = np.random.RandomState(0)
    image = torch.from_numpy(rng.rand(3, 40, 60).astype(np.float32)) * 2 - 1  # aspect 2:3 -> 32 x 48 at this area
    c = prepare_i2v(image, vae, None, frames, max_area=32 * 48)
    assert (c.height, c.width, c.clip_fea) == (32, 48, None) and c.y.shape == (1, 20, 3, 4, 6)
    cond, uncond, pe, npe = _embeds(hi.cfg.text_dim, seed=4)
    cond, uncond = Cond(cond.context, y=c.y), Cond(uncond.context, y=c.y)
    noise = make_noise((1, 16, 3, 4, 6), seed=9)
    with _recording(hi, lo) as ours_calls:
        got, _ = denoise(
            Experts(hi, lo, ExpertSwitch(boundary=boundary), g_high, g_low), noise, sched, cond, uncond, 1.0
        )
    assert [len(x) for x in ours_calls] == [6, 6]

    pipe = _diffusers_pipe("WanImageToVideoPipeline", steps, shift, vae=ref_vae, transformer=dhi, transformer_2=dlo,
                           boundary_ratio=boundary, image_encoder=None, image_processor=None)  # fmt: skip
    resized = resize_image(image, 32, 48)[None]  # the official bicubic resize; diffusers' own resize is PIL's
    with torch.no_grad():  # diffusers' condition from the same image: mask exact, latent within VAE error
        _, ref_y = pipe.prepare_latents(resized, 1, 16, 32, 48, frames, torch.float32, torch.device("cpu"), None, noise)
    assert torch.equal(c.y[:, :4], ref_y[:, :4]) and rel_err(c.y[:, 4:], ref_y[:, 4:]) <= 1e-5
    with _recording(dhi, dlo) as ref_calls:
        exp = _run_diffusers(pipe, noise, pe, npe, steps=steps, image=resized, height=32, width=48,
                             num_frames=frames, guidance_scale=g_high, guidance_scale_2=g_low)  # fmt: skip
    assert [len(x) for x in ref_calls] == [6, 6]
    err = rel_err(got, exp)
    assert err <= TOL, err  # measured 3.0e-6
    # the image reaches the result: another image's y ends elsewhere
    y2 = prepare_i2v(-image, vae, None, frames, max_area=32 * 48).y
    with torch.no_grad():
        other = sample(Experts(hi, lo, ExpertSwitch(boundary=boundary), g_high, g_low), noise, sched,
                       Cond(cond.context, y=y2), Cond(uncond.context, y=y2))  # fmt: skip
    assert rel_err(other, exp) > 1e-3


# ----------------------------------------------------------------------------------------------
# TI2V-5B: per-token timesteps, first-frame latent replacement (Wan2.2 VAE)


@pytest.fixture(scope="module")
def ti2v_pair():
    return _dit_pair("ti2v", 41)


def test_ti2v_text_only_equals_diffusers(ti2v_pair, vae22):
    model, dm = ti2v_pair
    steps, shift, guidance = 4, 5.0, 5.0
    cond, uncond, pe, npe = _embeds(model.cfg.text_dim, seed=5)
    noise = make_noise((1, 48, 3, 4, 6), seed=11)
    with torch.no_grad():
        got = sample(model, noise, make_scheduler("unipc", steps, shift), cond, uncond, guidance=guidance)
    pipe = _diffusers_pipe("WanPipeline", steps, shift, vae=vae22[1], transformer=dm, expand_timesteps=True)
    with _recording(dm) as (seen,):
        exp = _run_diffusers(pipe, noise, pe, npe, steps=steps, height=64, width=96, num_frames=9,
                             guidance_scale=guidance)  # fmt: skip
    assert seen[0].shape == (1, 3 * 2 * 3) and (seen[0] == 999).all()  # diffusers really runs per-token t
    err = rel_err(got, exp)
    assert err <= TOL, err  # measured 5.7e-6


def test_ti2v_image_equals_diffusers(ti2v_pair, vae22):
    from PIL import Image

    model, dm = ti2v_pair
    vae, ref_vae = vae22
    steps, shift, guidance, frames = 4, 5.0, 5.0, 9
    rng = np.random.RandomState(1)
    pil = Image.fromarray((rng.rand(64, 96, 3) * 255).astype(np.uint8))  # already the best output size: no resize
    c = prepare_ti2v(pil, vae, max_area=64 * 96)
    assert (c.width, c.height) == (96, 64) and c.z.shape == (1, 48, 1, 4, 6)
    x = image_to_tensor(pil)[None]  # [1, 3, 64, 96] in [-1, 1]: what prepare_ti2v encoded
    with torch.no_grad():
        assert torch.equal(c.z, vae.encode(x[:, :, None]))
    cond, uncond, pe, npe = _embeds(model.cfg.text_dim, seed=6)
    noise = make_noise((1, 48, 3, 4, 6), seed=13)
    sched = make_scheduler("unipc", steps, shift)
    with torch.no_grad(), _recording(model) as (ours_t,):
        got = sample(model, noise, sched, cond, uncond, guidance=guidance, first_frame=FirstFrame(c.z))
    assert torch.equal(got[:, :, :1], c.z)  # latent frame 0 is exactly the image's latent
    assert ours_t[0].shape == (1, 18) and (ours_t[0][0, :6] == 0).all() and (ours_t[0][0, 6:] == 999).all()

    pipe = _diffusers_pipe("WanImageToVideoPipeline", steps, shift, vae=ref_vae, transformer=dm, expand_timesteps=True,
                           image_encoder=None, image_processor=None)  # fmt: skip
    with torch.no_grad():  # diffusers' own first-frame latent of the same image
        _, ref_z, ref_mask = pipe.prepare_latents(
            x, 1, 48, 64, 96, frames, torch.float32, torch.device("cpu"), None, noise
        )
    assert rel_err(c.z, ref_z) <= 1e-5 and ref_mask[0, 0, 0].eq(0).all() and ref_mask[0, 0, 1:].eq(1).all()
    with _recording(dm) as (ref_t,):
        exp = _run_diffusers(pipe, noise, pe, npe, steps=steps, image=x, height=64, width=96, num_frames=frames,
                             guidance_scale=guidance)  # fmt: skip
    torch.testing.assert_close(ref_t[0].float(), ours_t[0].float(), rtol=0, atol=0)  # the same per-token t
    err = rel_err(got, exp)
    assert err <= TOL, err  # measured 5.5e-6
    # the anchoring matters: the text-only run from the same noise ends elsewhere
    with torch.no_grad():
        assert rel_err(sample(model, noise, sched, cond, uncond, guidance=guidance), exp) > 1e-2
