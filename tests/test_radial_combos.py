"""Radial attention (`radial_attn`) with the other features, through the real doors (issue 25):
LoRA (merged, and as branches beside FP8 linears) at the model cache's lease, CPU offload
("model" / "block"), feature caching (MagCache skipping whole forwards), the two Wan2.2 A14B
experts and TI2V-5B through `WanPipeline`; the multi-GPU samplers' door refuses a ring degree.

Each run is compared with a reference assembled here: the same door with exact attention, each
block's self-attention then replaced by a float64 softmax, masked by `radial_plan` of the token grid
the test computes by hand (latent frames x (h / 2) x (w / 2)), dense in the first `dense_layers`
blocks and during the first `dense_timesteps` steps. The reference counts steps by its own
guidance calls (one per step, skipped forwards included), not by the engine's `sampling_step`,
so a step count thrown off by the cache or the expert switch would show. The grid, 9 x 8 x 12 =
864 tokens, keeps 49 % of the 7 x 7 blocks at decay 0.2: the mask changes the output (checked).

No CUDA: the backend runs its torch path (tests/test_radial_attention.py checks it, the Triton
and 8-bit kernels against the same float64 softmax); offload runs with the CPU as its device
(tests/test_offload_doors.py)."""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch

from wan_core.kernels import radial_attention as ra
from wan_core.kernels.attention_context import current_step
from wan_core.kernels.radial_attention import RadialAttention, RadialOptions
from wan_core.kernels.radial_mask import radial_plan
from wan_core.layers.cache import guided_velocity_branches
from wan_core.layers.lora import lora_report
from wan_core.layers.offload import offload_handle
from wan_core.loading.tiny import write_tiny_model
from wan_core.model_cache import clear_cache, lease
from wan_core.pipeline import WanPipeline
from wan_core.sampling.loop import guided_velocity, make_noise
from wan_core.spec import ModelSpec

from .test_radial_attention import masked_attention
from .test_radial_fp8 import eight_bit_here  # noqa: F401  (a fixture, asked for by name)

GRID = (9, 8, 12)  # latent frames, token rows, token columns (after the 1 x 2 x 2 patch)
SIZE = dict(target_video_length=33, target_height=128, target_width=192)  # Wan2.1 VAE (8x): latent 9 x 16 x 24
TOL = 1e-5  # float32 runs against the float64 reference, over a few steps
PROMPT = "a red fox in the snow"


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(autouse=True)
def fresh_cache():
    """An empty model cache around each test (the references change attention functions of cached
    models), and one thread: these small CPU runs are ~30x slower when the threads of a shared machine contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    clear_cache()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*saves no memory")
        yield
    clear_cache()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("radial_combos") / "t2v", "t2v", "wan", seed=3)


def dense64(q, k, v) -> torch.Tensor:
    s = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhlm,bmhd->blhd", torch.softmax(s, -1), v.double())


class Reference:
    """radial_attn with `options` on `grid`, written out: install() puts it in a model's blocks;
    predict() wraps a guidance step to count the steps (one call per step)."""

    def __init__(self, options: RadialOptions, grid=GRID):
        self.options, self.plan = options, radial_plan(grid[0], grid[1] * grid[2], options.decay_factor)
        self.step, self.calls = None, 0

    def install(self, *models) -> None:
        for model in models:
            for i, blk in enumerate(model.blocks):
                blk.self_attn.attn_fn = functools.partial(self.attend, i)

    def attend(self, layer: int, q, k, v) -> torch.Tensor:
        o = self.options
        dense = layer < o.dense_layers or (self.step is not None and self.step < o.dense_timesteps)
        return (dense64(q, k, v) if dense else masked_attention(q, k, v, self.plan)).to(q.dtype)

    def predict(self, inner=guided_velocity):
        def step(model, x, t, cond, uncond, guidance):
            self.step, self.calls = self.calls, self.calls + 1
            return inner(model, x, t, cond, uncond, guidance)

        return step


@pytest.fixture
def sparse_steps(monkeypatch):
    """The step (`current_step()`) of every call of radial's sparse path, in order."""
    seen = []
    real = ra.radial_attention_torch
    monkeypatch.setattr(ra, "radial_attention_torch", lambda *a, **kw: seen.append(current_step()) or real(*a, **kw))
    return seen


def _forward(model, channels=16, seed=0):
    """One DiT forward on a latent of the test grid."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, GRID[0], 2 * GRID[1], 2 * GRID[2], generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([700.0]), [torch.randn(7, model.cfg.text_dim, generator=g)])


def _backends(model) -> list:
    return [blk.self_attn.attn_fn for blk in model.blocks]


def _pipe(path, model_cls="wan2.1", **params) -> WanPipeline:
    return WanPipeline(path, model_cls, dtype="fp32", device="cpu").create_generator(**{**SIZE, **params})


def _sample(pipe, predict=None, seed=1):
    """The pipeline's denoising stage (text encoded, noise of `seed`; no VAE decode: 33 frames take ~25 s on the CPU)."""
    cond, uncond = pipe.encode_text(PROMPT)
    return pipe.sample(make_noise(pipe.latent_shape(None), seed), cond, uncond, predict=predict)


# ---- LoRA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp8,mode,fast", [(None, "merged", False), ("dequant", "branched", False),
                                          ("dequant", "branched", True)])  # fmt: skip
def test_lora_merged_and_as_branches_beside_fp8_linears(model_dir, loras, request, fp8, mode, fast):
    """A leased DiT with radial_attn and two LoRAs (merged into high-precision weights; branches beside
    FP8 linears) equals the same lease with exact attention and the reference's; LoRA changes on the
    cached radial base keep its backends and options. fast: where the 8-bit kernels run (pretended
    here, `eight_bit_here`), the FP8 DiT's kernel "auto" is the 8-bit sparse one, LoRA branches or not
    (its dense layers would run the 8-bit dense kernel, which needs CUDA: none here)."""
    eight_bit = request.getfixturevalue("eight_bit_here") if fast else None
    opts = RadialOptions(decay_factor=0.2, dense_layers=0 if fast else 1)
    spec = ModelSpec(dit=model_dir, dtype="fp32", device="cpu", fp8=fp8, attention="radial_attn", radial=opts,
                     loras=((loras[0], 1.0), (loras[1], 0.7)))  # fmt: skip
    with lease(spec.replace(loras=())) as base:
        plain = _forward(base)
    with lease(spec) as model:
        assert model is base and all(getattr(s, mode) > 0 for s in lora_report(model).loras)
        fns = _backends(model)
        assert [f.backend_name for f in fns] == (["radial_attn"] * 2 if fast else ["sdpa", "radial_attn"])
        assert fns[1].options == (RadialOptions(0.2, kernel="fp8") if fast else opts) and fns[1].eight_bit == fast
        got = _forward(model)
    if fast:
        assert len(eight_bit) == 2 * 2  # the 2 sparse layers, in both forwards
    with lease(spec.replace(loras=())) as again:
        assert again is base and _backends(again) == fns
        assert torch.equal(_forward(again), plain)
    clear_cache()
    with lease(spec.replace(attention="auto", radial=None)) as exact:
        dense = _forward(exact)
        Reference(opts).install(exact)
        ref = _forward(exact)
    assert rel_err(got, ref) <= TOL, rel_err(got, ref)
    assert rel_err(got, dense) > 1e-3 and rel_err(got, plain) > 1e-2  # the mask and the LoRAs both matter here


# ---- CPU offload ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(model_dir):
    """(options, latent): the 3-step CFG run of `_sample` with the reference's attention."""
    opts = RadialOptions(decay_factor=0.2, dense_layers=0, dense_timesteps=1)
    clear_cache()
    pipe = _pipe(model_dir, infer_steps=3, sample_guide_scale=4.0)
    ref = Reference(opts)
    with lease(pipe.spec) as dit:
        ref.install(dit)
    latent = _sample(pipe, predict=ref.predict())
    assert ref.calls == 3
    clear_cache()
    return opts, latent


@pytest.mark.parametrize("granularity", ["model", "block"])
def test_cpu_offload(model_dir, reference_run, sparse_steps, granularity):
    """cpu_offload with radial_attn (LightX2V keys): the offloaded DiT keeps radial's backends and
    options, is brought in once for the loop, and the run is the reference's."""
    opts, ref = reference_run
    pipe = _pipe(model_dir, infer_steps=3, sample_guide_scale=4.0, self_attn_1_type="radial_attn",
                 dense_timesteps=1, cpu_offload=True, offload_granularity=granularity)  # fmt: skip
    latent = _sample(pipe)
    handle = offload_handle(pipe.dit)
    assert handle is not None and handle.stats["loads"] == 1 and not handle.is_loaded
    assert {fn.options for fn in _backends(pipe.dit)} == {opts}
    assert sparse_steps == [1] * 4 + [2] * 4  # steps 1 and 2 x cond / uncond x the 2 layers
    assert rel_err(latent, ref) <= TOL, rel_err(latent, ref)


# ---- feature caching ------------------------------------------------------------------------------

# MagCache with every ratio 1 (zero estimated error): a data-independent policy that skips every step
# its K allows (one in a row) from step 1 on, whatever the attention: the same steps in both runs.
MAG = dict(feature_caching="Mag", magcache_ratios=[[1.0] * 6, [1.0] * 6], magcache_thresh=1.0, magcache_K=1,
           magcache_start_step=1, magcache_retention_ratio=0.0)  # fmt: skip


def test_feature_cache_skips_and_the_dense_steps(model_dir, sparse_steps):
    """MagCache skips whole forwards (step 1 among them, before the last dense step): the dense steps
    still count the loop's steps, so the computed steps 0 and 2 run dense, the later ones sparse, and
    the run equals the reference run with the same skips."""
    opts = RadialOptions(decay_factor=0.2, dense_timesteps=3)
    params = dict(infer_steps=6, sample_guide_scale=4.0, **MAG)
    pipe = _pipe(model_dir, self_attn_1_type="radial_attn", dense_timesteps=3, **params)
    assert pipe.spec.radial == opts
    latent = _sample(pipe)
    report = pipe.cache_report
    computed, skipped = report.computed["cond"], report.skipped["cond"]
    assert report.computed["uncond"] == computed and 1 in skipped and min(computed) == 0
    assert any(s >= 3 for s in computed)  # some sparse steps come after the skips
    # each computed step from 3 on: the 2 sparse layers x cond / uncond; none before
    assert sparse_steps == [s for s in computed if s >= 3 for _ in range(4)]
    clear_cache()
    ref_pipe = _pipe(model_dir, **params)
    ref = Reference(opts)
    with lease(ref_pipe.spec) as dit:
        ref.install(dit)
    want = _sample(ref_pipe, predict=ref.predict(guided_velocity_branches))
    assert ref.calls == 6 and ref_pipe.cache_report.skipped == report.skipped
    assert rel_err(latent, want) <= TOL, rel_err(latent, want)


# ---- Wan2.2 ---------------------------------------------------------------------------------------


def test_wan22_a14b_both_experts(tiny22, sparse_steps):
    """wan2.2_moe: both experts get radial_attn with the run's options (each its own backend), the
    dense step counts the whole run's steps across the switch, and the run is the reference's with
    the reference in both experts."""
    path = tiny22("t2v", "wan")
    opts = RadialOptions(decay_factor=0.2, dense_layers=0, dense_timesteps=1)
    params = dict(infer_steps=4, boundary_step_index=2, sample_guide_scale=[4.0, 3.0])
    pipe = _pipe(path, "wan2.2_moe", self_attn_1_type="radial_attn", dense_timesteps=1, **params)
    assert pipe.spec.radial == pipe.spec_low.radial == opts
    latent = _sample(pipe)
    high, low = _backends(pipe.dit), _backends(pipe.dit_low)
    assert {f.options for f in high} == {f.options for f in low} == {opts} and not set(high) & set(low)
    assert sparse_steps == [s for s in (1, 2, 3) for _ in range(4)]  # steps 1 (high), 2, 3 (low) x 2 layers x CFG
    clear_cache()
    ref_pipe = _pipe(path, "wan2.2_moe", **params)
    ref = Reference(opts)
    with lease(ref_pipe.spec) as hi, lease(ref_pipe.spec_low) as lo:
        ref.install(hi, lo)
    want = _sample(ref_pipe, predict=ref.predict())
    assert ref.calls == 4
    assert rel_err(latent, want) <= TOL, rel_err(latent, want)


def test_ti2v_5b_token_grid(tiny22, monkeypatch):
    """TI2V-5B (48-channel latent, 16x VAE): 33 frames at 256 x 384 are 9 latent frames of 16 x 24, so
    the backend is handed 9 frames of 8 x 12 = 96 tokens, and the run is the reference's on that grid."""
    path = tiny22("ti2v", "wan")
    seen = []
    real_plan = RadialAttention.plan
    monkeypatch.setattr(
        RadialAttention, "plan", lambda self, f, t, dev: seen.append((f, t)) or real_plan(self, f, t, dev)
    )
    size = dict(target_video_length=33, target_height=256, target_width=384, infer_steps=2, sample_guide_scale=4.0)
    pipe = _pipe(path, "wan2.2", self_attn_1_type="radial_attn", **size)
    assert pipe.latent_shape(None) == (1, 48, 9, 16, 24)
    latent = _sample(pipe)
    assert set(seen) == {(9, 96)} and len(seen) == 2 * 2 * 2  # 2 steps x CFG x 2 layers
    clear_cache()
    ref_pipe = _pipe(path, "wan2.2", **size)
    ref = Reference(RadialOptions())
    with lease(ref_pipe.spec) as dit:
        dense = _forward(dit, channels=48)
        ref.install(dit)
        assert rel_err(_forward(dit, channels=48), dense) > 1e-3  # the mask matters on this grid
    want = _sample(ref_pipe, predict=ref.predict())
    assert rel_err(latent, want) <= TOL, rel_err(latent, want)


# ---- several GPUs ----------------------------------------------------------------------------------


def test_ring_attention_is_refused_before_any_worker_starts(model_dir, monkeypatch):
    """The multi-GPU samplers' door: a ring degree with radial_attn (on either expert) is a one-line error
    before the worker group starts (Ulysses keeps the whole sequence: tests/test_radial_attention.py)."""
    import wan_core.api as api
    from wan_core.layers.parallel import ParallelConfig
    from wan_core.sampling.experts import ExpertSwitch
    from wan_core.wan22 import ExpertPair

    monkeypatch.setattr(api, "get_worker_group", lambda *a, **kw: pytest.fail("a worker group was started"))
    radial = ModelSpec(dit=model_dir, dtype="fp32", device="cpu", attention="radial_attn")
    exact = radial.replace(attention="auto")
    targets = (radial, ExpertPair(exact.replace(expert="high"), radial.replace(expert="low"), ExpertSwitch(step=1)))
    for target in targets:
        for parallel in (ParallelConfig(ring=2), ParallelConfig(cfg=2, ulysses=2, ring=2)):
            with pytest.raises(ValueError, match=f"radial_attn needs every video token.*ring_degree {parallel.ring}"):
                api.run_sampler_on_workers(
                    target, api.SamplerSettings(steps=2), torch.zeros(3, 32), None, (33, 128, 192), parallel
                )
