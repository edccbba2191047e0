"""Radial Attention (`radial_attn`): the block mask against the reference method's own output
(tests/reference/radial_masks.json, computed by running mit-han-lab/radial-attention's
`gen_log_mask_shrinked` at 72788d4) and against a token-level re-derivation of its rule written
here; the block-sparse kernel (Triton, through its interpreter) and the torch path against a
float64 softmax over the expanded mask; the backend in the DiT (layout from the forward, dense
layers and dense steps honoured, Ulysses equal to one process) and its errors; the config keys."""

from __future__ import annotations

import base64
import json
import math
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wan_core.kernels import radial_attention as ra
from wan_core.kernels.attention import APPROXIMATE, get_attention, resolve_name
from wan_core.kernels.attention_context import sampling_step, video_grid
from wan_core.kernels.radial_attention import RadialOptions, radial_attention_torch
from wan_core.kernels.radial_mask import RadialPlan, expand_block_mask, radial_block_mask, radial_plan
from wan_core.loading.dit import build_model

from .test_dit import random_state_dict, rel_err, tiny_cfg
from .triton_tools import compile_for_hopper, needs_triton, run_interpreted

REFERENCE = json.loads((Path(__file__).parent / "reference" / "radial_masks.json").read_text())["cases"]


def _unpack(case) -> torch.Tensor:
    n, m = case["shape"]
    bits = np.frombuffer(zlib.decompress(base64.b64decode(case["packbits_zlib_b64"])), np.uint8)
    return torch.from_numpy(np.unpackbits(bits)[: n * m].reshape(n, m).astype(bool))


# ---- the mask ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(REFERENCE))
def test_mask_equals_the_reference_methods(key):
    """Wan 480p (21 x 1560 = 32,760 tokens) and 720p (21 x 3600 = 75,600), decay 0.2 and 1.0, and
    small layouts (block size 64 too): same shape, same kept blocks per row, same mask."""
    case = REFERENCE[key]
    mask = radial_block_mask(case["frames"], case["tokens_per_frame"], case["block_size"], case["decay_factor"])
    assert (
        list(mask.shape)
        == case["shape"]
        == [math.ceil(case["frames"] * case["tokens_per_frame"] / case["block_size"])] * 2
    )
    assert mask.sum(1).tolist() == case["row_counts"]
    assert int(mask.sum()) == case["kept"]
    assert torch.equal(mask, _unpack(case))


def _token_level_mask(frames: int, t: int, bs: int, decay: float) -> torch.Tensor:
    """The published rule, written token by token: each frame pair's T x T mask (sink, whole pairs at
    distance <= 1, log-decaying bands, the every-n-th-distance split below 128), placed at its
    offset in its 128-grid, cropped to ceil(T / bs) blocks, each block kept when > 60 % of its
    non-empty columns are > 1/3 set; the video/text border kept whole."""
    length = frames * t
    n, nb = -(-length // bs), -(-t // bs)
    out = torch.zeros(n, n, dtype=torch.bool)
    out[length // bs :] = True
    out[:, length // bs :] = True
    r = torch.arange(t)
    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            p2, g = 2 ** t.bit_length(), d.bit_length()
            if j == 0:
                tok = torch.ones(t, t, dtype=torch.bool)
            else:
                w = t if d <= 1 else max(p2 / 2**g * decay, bs)
                tok = (r[None, :] - r[:, None]).abs() <= w
                if p2 / 2**g < 128 and d % int(128 / (p2 / 2**g)):
                    tok[:] = False
            ri, rj = (i * t) % bs, (j * t) % bs
            grid = torch.zeros(nb * bs + bs, nb * bs + bs, dtype=torch.bool)
            grid[ri : ri + t, rj : rj + t] = tok
            cnt = grid[: nb * bs, : nb * bs].reshape(nb, bs, nb, bs).sum(1)  # [nb, nb, bs] set rows per column
            keep = 5 * (3 * cnt > bs).sum(-1) > 3 * (cnt > 0).sum(-1)
            bi, bj = i * t // bs, j * t // bs
            out[bi : bi + nb, bj : bj + nb] |= keep
    return out


LAYOUTS = [
    (6, 77, 32, 1.0),
    (11, 260, 128, 0.2),
    (9, 130, 64, 0.5),
    (17, 96, 32, 0.3),
    (4, 129, 128, 1.0),
    (3, 40, 16, 2.0),
]


@pytest.mark.parametrize("frames,t,bs,decay", LAYOUTS)
def test_mask_equals_a_token_level_rederivation(frames, t, bs, decay):
    assert torch.equal(radial_block_mask(frames, t, bs, decay), _token_level_mask(frames, t, bs, decay))


def _pure_blocks(mask: torch.Tensor, frames: int, t: int, bs: int = 128):
    """Frame of each block that lies wholly inside one frame (else -1)."""
    first = torch.arange(mask.shape[0]) * bs
    last = (first + bs - 1).clamp(max=frames * t - 1)
    return torch.where(first // t == last // t, first // t, -1)


@pytest.mark.parametrize("frames,t", [(21, 1560), (21, 3600)])
def test_wan_masks_have_the_rules_structure(frames, t):
    """Sink on key frame 0, whole frame pairs at distance 0 and 1 (the half-frame band LightX2V keeps at
    distance 1 is the reference's older rule), the padded last block whole, a decay symmetric in
    the two frames, and narrower bands at larger distances."""
    for decay, density in ((0.2, {1560: 0.34384, 3600: 0.26467}[t]), (1.0, None)):
        mask = radial_block_mask(frames, t, 128, decay)
        fr = _pure_blocks(mask, frames, t)
        assert mask[:, fr == 0].all()  # every query block attends to all of frame 0
        for i in range(frames):
            for j in range(max(0, i - 1), min(frames, i + 2)):
                assert mask[fr == i][:, fr == j].all(), (i, j)
        assert mask[-1].all() and mask[:, -1].all()  # the partial last block (real tokens + padding)
        counts = torch.zeros(frames, frames, dtype=torch.long)  # kept pure blocks per frame pair
        sizes = torch.zeros(frames, frames, dtype=torch.long)
        for i in range(frames):
            for j in range(frames):
                counts[i, j] = mask[fr == i][:, fr == j].sum()
                sizes[i, j] = (fr == i).sum() * (fr == j).sum()
        inner = counts[1:, 1:]
        assert torch.equal(inner, inner.T)  # symmetric decay (frame 0 is the sink)
        if density is not None:
            assert abs(mask.float().mean().item() - density) < 1e-4
            assert 0.1 < density < 0.4
    # decay 1.0 at 720p: bands of 1024, 512, 256 tokens at distances 2-3, 4-7, 8-15: strictly narrower
    if t == 3600:
        frac = counts.float() / sizes.float()
        by_group = [torch.stack([frac[i, j] for i in range(1, frames) for j in range(1, frames)
                                 if abs(i - j).bit_length() == g]).mean().item() for g in (2, 3, 4)]  # fmt: skip
        assert by_group[0] > by_group[1] > by_group[2] > 0.05, by_group


def test_plan_lists_the_kept_blocks_of_each_row():
    plan = radial_plan(9, 300, 0.3, block_size=64)
    assert plan.length == 2700 and plan.mask.shape == (43, 43)
    assert torch.equal(plan.counts, plan.mask.sum(1).to(torch.int32))
    for row in range(plan.mask.shape[0]):
        kept = torch.nonzero(plan.mask[row]).flatten()
        assert torch.equal(plan.indices[row, : plan.counts[row]].long(), kept)
    assert radial_plan(9, 300, 0.3, block_size=64) is plan  # made once
    assert expand_block_mask(plan.mask, 2700, 64).shape == (2700, 2700)


def test_mask_errors():
    with pytest.raises(ValueError, match="positive"):
        radial_block_mask(0, 100)
    with pytest.raises(ValueError, match="decay_factor"):
        radial_block_mask(3, 100, decay_factor=0.0)


# ---- the attention math --------------------------------------------------------------------------


def masked_attention(q, k, v, plan: RadialPlan) -> torch.Tensor:
    """float64 softmax over the expanded token mask; rows with no key: zeros."""
    keep = expand_block_mask(plan.mask, q.shape[1], plan.block_size)
    s = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhlm,bmhd->blhd", p, v.double())


def custom_plan(mask: torch.Tensor, length: int, block_size: int = 128) -> RadialPlan:
    counts = mask.sum(1).to(torch.int32)
    indices = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, : max(1, int(counts.max()))].to(torch.int32)
    return RadialPlan(length, block_size, mask, counts, indices.contiguous())


def _qkv(b, length, h, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, length, h, d, generator=g) for _ in range(3)]


def test_torch_path_equals_a_float64_softmax_and_ignores_dropped_blocks():
    plan = radial_plan(9, 200, 0.2)  # 1800 tokens: 14 full blocks + 8 tokens
    q, k, v = _qkv(2, 1800, 3, 32)
    out = radial_attention_torch(q, k, v, plan)
    assert rel_err(out, masked_attention(q, k, v, plan)) < 1e-6
    assert rel_err(radial_attention_torch(q, k, v, plan, max_bytes=1), out) < 1e-6  # one query block at a time
    # a key block that query block 0 drops: changing it leaves block 0's rows alone, and moves others'
    dropped = int(torch.nonzero(~plan.mask[0])[0])
    k2, v2 = k.clone(), v.clone()
    k2[:, dropped * 128 : (dropped + 1) * 128] += 3.0
    v2[:, dropped * 128 : (dropped + 1) * 128] -= 2.0
    out2 = radial_attention_torch(q, k2, v2, plan)
    assert torch.equal(out2[:, :128], out[:, :128])
    assert not torch.allclose(out2, out)
    # a block row with no key block (not a radial mask: any plan runs): zeros there, as the kernel
    mask = plan.mask.clone()
    mask[3] = False
    empty = custom_plan(mask, 1800)
    out3 = radial_attention_torch(q, k, v, empty)
    assert out3[:, 384:512].abs().sum() == 0 and rel_err(out3, masked_attention(q, k, v, empty)) < 1e-6


INTERP_SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
import triton_interp  # noqa: F401  (before any kernel is defined)
import torch
from tests.test_radial_attention import custom_plan, masked_attention
from wan_core.kernels.radial_attention import radial_attention_triton
from wan_core.kernels.radial_mask import radial_plan
res = {{}}
g = torch.Generator().manual_seed(0)
rand = torch.rand(7, 7, generator=g) < 0.4
rand[2] = False  # a row with nothing kept
cases = [  # name, b, h, d, dtype, plan, tiles
    ("fp32-5x100", 2, 2, 64, torch.float32, radial_plan(5, 100, 0.2), (64, 64)),
    ("bf16-9x200", 1, 2, 32, torch.bfloat16, radial_plan(9, 200, 0.2), (128, 64)),
    ("fp16-3x171", 1, 3, 16, torch.float16, radial_plan(3, 171, 1.0), (64, 128)),
    ("fp32-random", 1, 1, 32, torch.float32, custom_plan(rand, 7 * 128 - 35), (64, 64)),
    ("bf16-bs64", 1, 1, 16, torch.bfloat16, radial_plan(9, 90, 0.5, block_size=64), (32, 64)),
]
for name, b, h, d, dt, plan, (bm, bn) in cases:
    q, k, v = (torch.randn(b, plan.length, h, d, generator=g).to(dt) for _ in range(3))
    out = radial_attention_triton(q, k, v, plan, config={{"BLOCK_M": bm, "BLOCK_N": bn}})
    ref = masked_attention(q.float(), k.float(), v.float(), plan)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    res[name] = [err, list(out.shape), str(out.dtype), bool(torch.isfinite(out).all())]
# q/k/v as views of one packed [B, L, 3, H, D] tensor (non-contiguous, as a fused qkv projection gives)
qkv = torch.randn(1, 500, 3, 2, 32, generator=g)
plan = radial_plan(5, 100, 0.2)
out = radial_attention_triton(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], plan, config={{"BLOCK_M": 64, "BLOCK_N": 64}})
ref = masked_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], plan)
res["strided"] = [((out.double() - ref).norm() / ref.norm()).item(), list(out.shape), str(out.dtype), True]
print(json.dumps(res))
"""


@needs_triton
def test_triton_kernel_equals_masked_attention_in_the_interpreter():
    """The kernel itself through Triton's interpreter: fp32 / bf16 / fp16, L not a multiple of 128
    (padded keys masked, padded query rows not stored), several query tiles per mask row and key
    tiles per block, a random plan with an empty row, 64-token blocks, strided inputs."""
    res = run_interpreted(INTERP_SCRIPT)
    tol = {"torch.float32": 1e-5, "torch.bfloat16": 1e-2, "torch.float16": 2e-3}
    assert len(res) == 6
    for name, (err, shape, dtype, finite) in res.items():
        assert finite and err < tol[dtype], (name, err)
        assert shape[3] in (16, 32, 64)


@needs_triton
def test_triton_kernel_compiles_for_hopper():
    """Every tile the autotuner tries compiles for sm_90 in bf16, one in fp16 (the interpreter does not compile)."""
    from wan_core.kernels import radial_kernel as kern

    for dt, configs in (("bf16", kern.CONFIGS), ("fp16", kern.CONFIGS[:1])):
        sig = {n: f"*{dt}" for n in "QKVO"}
        sig.update(CNT="*i32", IDX="*i32", length="i32", heads="i32", max_cnt="i32", qk_scale="fp32")
        sig.update({f"stride_{t}{a}": "i32" for t in "qkvo" for a in "blh"})
        for cfg in configs:
            consts = dict(cfg.kwargs, HEAD_DIM=128, MASK_BLOCK=128)
            assert "cubin" in compile_for_hopper(kern.radial_fwd, sig, consts, cfg.num_warps).asm


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_on_the_gpu_equals_the_torch_path():
    plan = radial_plan(21, 1560, 0.2, "cuda")  # Wan 480p
    q, k, v = (t.cuda().bfloat16() for t in _qkv(1, plan.length, 4, 128))
    out = ra.radial_attention_triton(q, k, v, plan)
    ref = radial_attention_torch(q.float(), k.float(), v.float(), plan)
    assert rel_err(out.float(), ref) < 1e-2


# ---- the backend in the model --------------------------------------------------------------------


def _model(layers=2, heads=4):
    cfg = tiny_cfg(num_layers=layers, num_heads=heads)
    return build_model(cfg, random_state_dict(cfg, seed=1), dtype=torch.float32)


def _inputs(cfg, grid=(9, 10, 20), seed=0):  # 9 frames x 200 tokens: a mask keeping 77 % of the blocks
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, grid[0], 2 * grid[1], 2 * grid[2], generator=g)
    return x, torch.tensor([700.0]), [torch.randn(7, cfg.text_dim, generator=g)]


def test_backend_in_the_table():
    assert resolve_name("radial_attn") == resolve_name("radial") == "radial_attn" and "radial_attn" in APPROXIMATE
    fn = get_attention("radial_attn", "cpu", radial=RadialOptions(0.5, 1, 3))
    assert fn.backend_name == "radial_attn" and fn.options == RadialOptions(0.5, 1, 3)
    assert fn.dense.backend_name == "sdpa" and fn.for_layer(0) is fn.dense and fn.for_layer(1) is fn
    assert get_attention("radial_attn", "cpu").options == RadialOptions(0.2, 0, 0)  # LightX2V's: decay 0.2, all sparse


def test_radial_forward_attends_over_the_forwards_own_layout():
    """The DiT with radial_attn equals the DiT whose self-attention is the float64 masked softmax
    of the mask made for its grid (frames = latent frames, tokens per frame = h x w after patching)."""
    model = _model()
    x, t, ctx = _inputs(model.cfg)
    plan = radial_plan(9, 200, 0.5)
    with torch.no_grad():
        model.set_attention("radial_attn", radial=RadialOptions(decay_factor=0.5))
        got = model(x, t, ctx)
        for blk in model.blocks:
            blk.self_attn.attn_fn = lambda q, k, v: masked_attention(q, k, v, plan).to(q.dtype)
        ref = model(x, t, ctx)
    assert rel_err(got, ref) < 1e-5


def test_dense_layers_are_honoured():
    """dense_layers = all layers: bit for bit the dense forward; fewer: the forward differs, by more
    the more layers are sparse. Cross-attention stays exact (the dense backend) throughout."""
    model = _model(layers=3)
    x, t, ctx = _inputs(model.cfg)
    out = {}
    with torch.no_grad():
        model.set_attention("sdpa")
        out["dense"] = model(x, t, ctx)
        for n in (3, 5, 2, 0):
            model.set_attention("radial_attn", radial=RadialOptions(dense_layers=n))
            assert all(blk.cross_attn.attn_fn.backend_name == "sdpa" for blk in model.blocks)
            assert [blk.self_attn.attn_fn.backend_name for blk in model.blocks][: min(n, 3)] == ["sdpa"] * min(n, 3)
            out[n] = model(x, t, ctx)
    assert torch.equal(out[3], out["dense"]) and torch.equal(out[5], out["dense"])
    assert 1e-4 < rel_err(out[2], out["dense"]) < rel_err(out[0], out["dense"])


def test_dense_timesteps_are_honoured(monkeypatch):
    """A 3-step CFG run: steps below dense_timesteps run the dense backend, the others the sparse
    path, in every non-dense layer; all steps dense equals the dense run bit for bit."""
    from wan_core.sampling.loop import Cond, make_noise, sample
    from wan_core.sampling.schedulers import make_scheduler

    model = _model(layers=2)
    g = torch.Generator().manual_seed(4)
    noise = make_noise((1, 16, 9, 20, 40), seed=2)
    cond, uncond = (
        Cond([torch.randn(5, model.cfg.text_dim, generator=g)]),
        Cond([torch.randn(3, model.cfg.text_dim, generator=g)]),
    )
    calls = []
    sparse = ra.radial_attention_torch
    monkeypatch.setattr(ra, "radial_attention_torch", lambda *a, **kw: calls.append(1) or sparse(*a, **kw))

    def run(opts):
        calls.clear()
        model.set_attention("radial_attn", radial=opts)
        with torch.no_grad():
            return sample(model, noise, make_scheduler("euler", 3, 5.0), cond, uncond, guidance=4.0)

    with torch.no_grad():
        model.set_attention("sdpa")
        dense = sample(model, noise, make_scheduler("euler", 3, 5.0), cond, uncond, guidance=4.0)
    assert torch.equal(run(RadialOptions(dense_timesteps=3)), dense) and calls == []
    one = run(RadialOptions(dense_timesteps=1, dense_layers=1))
    assert len(calls) == 2 * 2 * 1  # steps 1, 2 x cond/uncond x the one sparse layer
    assert rel_err(one, dense) > 1e-4
    run(RadialOptions())
    assert len(calls) == 3 * 2 * 2
    with torch.no_grad(), sampling_step(0), video_grid((9, 10, 20)):  # declared by hand: step 0 is dense
        fn = get_attention("radial_attn", "cpu", radial=RadialOptions(dense_timesteps=1))
        calls.clear()
        fn(*_qkv(1, 1800, 1, 16))
        assert calls == []


def test_compiled_blocks_run_radial_as_one_op_in_one_graph():
    """A compiled block holds radial attention as one opaque op (fullgraph: no graph break, which
    would split the block into several graphs and lose the fusions around attention), one graph
    shared by every block and step, and the op still reads the layout and the step when it runs:
    a compiled 3-step run with a dense first step equals the eager one, and so does a forward at
    another layout."""
    from wan_core.sampling.loop import Cond, make_noise, sample
    from wan_core.sampling.schedulers import make_scheduler

    model = _model(layers=2)
    g = torch.Generator().manual_seed(4)
    noise = make_noise((1, 16, 9, 20, 40), seed=2)
    cond, uncond = (Cond([torch.randn(5, model.cfg.text_dim, generator=g)]),
                    Cond([torch.randn(3, model.cfg.text_dim, generator=g)]))  # fmt: skip
    x, t, ctx = _inputs(model.cfg, grid=(5, 10, 20))
    model.set_attention("radial_attn", radial=RadialOptions(dense_timesteps=1))

    def run():
        with torch.no_grad():
            return sample(model, noise, make_scheduler("euler", 3, 5.0), cond, uncond, guidance=4.0), model(x, t, ctx)

    eager = run()
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    for blk in model.blocks:
        blk.compile(backend="aot_eager", fullgraph=True, dynamic=False)
    compiled = run()
    assert rel_err(compiled[0], eager[0]) < 1e-6 and rel_err(compiled[1], eager[1]) < 1e-6
    assert counts["stats"]["unique_graphs"] == 2  # one per token count (1800, 1000), not per block or step
    torch._dynamo.reset()


def test_a_copied_model_runs_radial_after_the_original_is_gone():
    """The op finds its backend by a token: a deep copy of the model gets backends of its own, so it
    still runs (and equals the original's output) once the original is deleted."""
    import copy
    import gc

    model = _model()
    x, t, ctx = _inputs(model.cfg)
    model.set_attention("radial_attn", radial=RadialOptions(decay_factor=0.5))
    with torch.no_grad():
        ref = model(x, t, ctx)
        twin = copy.deepcopy(model)
        tokens = {blk.self_attn.attn_fn._token for blk in model.blocks}
        del model
        gc.collect()
        assert not tokens & set(ra._BACKENDS)  # the original's backends are gone from the registry
        assert torch.equal(twin(x, t, ctx), ref)


def test_errors_for_what_cannot_work():
    fn = get_attention("radial_attn", "cpu")
    q, k, v = _qkv(1, 1800, 2, 16)
    with pytest.raises(RuntimeError, match="video layout"):
        fn(q, k, v)  # outside a model forward: no layout
    with video_grid((9, 10, 20)), pytest.raises(ValueError, match="whole sequence"):
        fn(q[:, :900], k[:, :900], v[:, :900])  # a chunk of the sequence (ring attention would pass one)
    model = _model()
    with pytest.raises(ValueError, match="cross-attention needs an exact backend"):
        model.set_attention("sdpa", "radial_attn")
    for bad, key in ((dict(decay_factor=0), "decay_factor"), (dict(dense_layers=-1), "dense_layers"),
                     (dict(dense_timesteps=1.5), "dense_timesteps")):  # fmt: skip
        with pytest.raises(ValueError, match=key):
            RadialOptions(**bad)
    # ring attention splits the sequence: refused where the layer is applied (no process group needed to say so)
    from wan_core.layers.parallel import ParallelConfig
    from wan_core.layers.parallel.apply import SequenceParallelLayer

    model.set_attention("radial_attn")
    with pytest.raises(ValueError, match="ring attention"):
        SequenceParallelLayer(SimpleNamespace(config=ParallelConfig(ulysses=2, ring=2))).apply(model)
    assert all(blk.self_attn.attn_fn.backend_name == "radial_attn" for blk in model.blocks)  # left unwrapped


def _ulysses_worker(rank: int, world: int, init_file: str):
    import torch.distributed as dist

    from wan_core.layers.parallel import (
        ParallelConfig,
        build_groups,
        disable_sequence_parallel,
        enable_sequence_parallel,
    )
    from wan_core.layers.parallel.group import init_process_group

    torch.set_num_threads(1)
    init_process_group("cpu", rank=rank, world_size=world, init_method=f"file://{init_file}", timeout_s=120)
    try:
        model = _model(heads=4)
        for grid in ((9, 10, 20), (9, 11, 19)):  # 1800 tokens, and 1881: one rank's chunk ends in padding
            x, t, ctx = _inputs(model.cfg, grid)
            with torch.no_grad():
                model.set_attention("sdpa")
                dense = model(x, t, ctx)
                model.set_attention("radial_attn", radial=RadialOptions(decay_factor=0.5))
                ref = model(x, t, ctx)
                assert rel_err(ref, dense) > 1e-4  # the mask matters here
                for chunks in (1, 2):  # plain, and head slices whose all-to-alls overlap
                    enable_sequence_parallel(
                        model, build_groups(ParallelConfig(ulysses=world, ulysses_chunks=chunks), 4)
                    )
                    got = model(x, t, ctx)
                    disable_sequence_parallel(model)
                    assert rel_err(got, ref) <= 1e-5, (grid, chunks, rel_err(got, ref))
    finally:
        dist.destroy_process_group()


def test_ulysses_equals_one_process(tmp_path):
    """Ulysses splits the heads and gathers the whole sequence: every rank's heads get the same
    mask, and two gloo processes give the one-process radial forward."""
    import torch.multiprocessing as mp

    mp.spawn(_ulysses_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


# ---- the config keys and the pipeline ------------------------------------------------------------


def test_config_keys():
    import warnings

    from wan_core.options import GenerationConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known keys: no "unknown keys" warning
        cfg = GenerationConfig.from_dict({"self_attn_1_type": "radial_attn", "decay_factor": 0.5, "dense_layers": 1,
                                          "dense_timesteps": 12.0})  # fmt: skip
    cfg.check()
    assert cfg.uses_radial() and cfg.radial_options() == RadialOptions(0.5, 1, 12)
    assert GenerationConfig().radial_options() == RadialOptions() and not GenerationConfig().uses_radial()
    for key, bad, why in (("decay_factor", "0.5", "must be a number"), ("dense_layers", [0], "must be an integer")):
        with pytest.raises(ValueError, match=f"{key} {why}"):
            GenerationConfig.from_dict({key: bad})
    for key, bad in (("decay_factor", -1.0), ("dense_timesteps", -2)):
        with pytest.raises(ValueError, match=key):
            GenerationConfig.from_dict({"self_attn_1_type": "radial_attn", key: bad}).check()
    ring = {"self_attn_1_type": "radial_attn", "parallel": {"seq_p_size": 2, "seq_p_attn_type": "ring"}}
    with pytest.raises(ValueError, match="seq_p_attn_type 'ulysses'"):
        GenerationConfig.from_dict(ring).check()
    GenerationConfig.from_dict({**ring, "parallel": {"seq_p_size": 2, "seq_p_attn_type": "ulysses"}}).check()


def test_pipeline_runs_radial_with_its_options(tmp_path, monkeypatch):
    """self_attn_1_type radial_attn is no longer a fallback: the spec carries the options, the leased
    DiT's first dense_layers blocks run dense, the dense steps reach the backend, and radial named
    for cross-attention falls back (with a warning) to the exact backend."""
    import warnings

    from wan_core.loading.tiny import write_tiny_model
    from wan_core.model_cache import lease
    from wan_core.pipeline import WanPipeline

    path = write_tiny_model(tmp_path / "t2v", "t2v", "wan", seed=3)
    calls = []
    sparse = ra.radial_attention_torch
    monkeypatch.setattr(ra, "radial_attention_torch", lambda *a, **kw: calls.append(a[0].shape) or sparse(*a, **kw))
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        pipe = WanPipeline(path, dtype="fp32", device="cpu").create_generator(
            self_attn_1_type="radial_attn", cross_attn_1_type="radial_attn", dense_layers=1, dense_timesteps=1,
            decay_factor=0.5, infer_steps=3, sample_guide_scale=4.0, target_video_length=5, target_height=32,
            target_width=48,
        )  # fmt: skip
    messages = " ".join(str(w.message) for w in warned)
    assert "self_attn_1_type" not in messages and "cross_attn_1_type='radial_attn' cannot run here" in messages
    assert pipe.spec.attention == "radial_attn" and pipe.spec.radial == RadialOptions(0.5, 1, 1)
    assert pipe.spec.cross_attention is None
    with lease(pipe.spec) as dit:
        names = [blk.self_attn.attn_fn.backend_name for blk in dit.blocks]
        assert names[0] == "sdpa" and set(names[1:]) == {"radial_attn"}
        assert dit.blocks[1].self_attn.attn_fn.options == RadialOptions(0.5, 1, 1)
        assert {blk.cross_attn.attn_fn.backend_name for blk in dit.blocks} == {"sdpa"}
    res = pipe.generate(3, "a fox in the snow", return_latent=True)
    assert torch.isfinite(res.latent).all()
    # steps 1 and 2 (step 0 dense), cond and uncond, the sparse layers; 2 frames x 2 x 3 tokens each
    assert len(calls) == 2 * 2 * (len(names) - 1) and all(s[1] == 2 * 2 * 3 for s in calls)
