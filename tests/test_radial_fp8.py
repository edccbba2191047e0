"""The block-sparse 8-bit attention (`sage_sparse_kernel`, `radial_attention_fp8`): the kernel in
Triton's interpreter against the dense 8-bit kernel (every block kept: the same tiles, the same
bits), against the 8-bit math in torch restricted to the mask (`sage_attention.reference` with
`keep`) and against a float64 masked softmax; both 8-bit kernels compiled for sm_90; the radial
backend's kernel choice (fast mode: an FP8 DiT gets the 8-bit kernel with no extra option) in the
table, the model cache and the pipeline; a GPU run (marker gpu)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wan_core.kernels import radial_attention as ra
from wan_core.kernels import sage_attention as sa
from wan_core.kernels.attention import get_attention
from wan_core.kernels.attention_context import video_grid
from wan_core.kernels.radial_attention import RadialOptions, for_model
from wan_core.kernels.radial_mask import expand_block_mask, radial_plan

from .test_dit import rel_err
from .test_radial_attention import _inputs, _model, masked_attention
from .triton_tools import compile_for_hopper, needs_triton, run_interpreted


def cos(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), 0).item()


INTERP_SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
import triton_interp  # noqa: F401  (before any kernel is defined)
import torch
from tests.test_radial_attention import custom_plan, masked_attention
from wan_core.kernels import sage_attention as sa
from wan_core.kernels.radial_attention import radial_attention_fp8
from wan_core.kernels.radial_mask import expand_block_mask, radial_plan
g = torch.Generator().manual_seed(0)
res = {{"full": {{}}, "masked": {{}}}}

def qkv(b, length, h):
    q = torch.randn(b, length, h, 128, generator=g)
    k = torch.randn(b, length, h, 128, generator=g) + 2.0  # keys with a channel bias, smoothed away
    v = torch.randn(b, length, h, 128, generator=g) + 1.0
    return q, k, v

# every block kept: the sparse kernel runs the dense kernel's tiles (L = 300: a ragged last block)
# (both loop forms: plain, and the next tile's Q·Kᵀ issued before this one's softmax)
for int8, tma, bm, bn, length, pipe in ((False, False, 64, 64, 300, False), (False, True, 128, 128, 300, False),
                                        (True, False, 64, 128, 300, False), (False, True, 64, 64, 256, False),
                                        (False, True, 64, 64, 300, True), (True, False, 128, 128, 300, True)):
    q, k, v = qkv(1, length, 2)
    packed = sa.quantize(q, k, v, qk_int8=int8)
    n = -(-length // 128)
    blocks = (torch.full((n,), n, dtype=torch.int32), torch.arange(n, dtype=torch.int32).repeat(n, 1), 128)
    cfg = {{"BLOCK_M": bm, "BLOCK_N": bn}}
    dense = sa._launch(*packed, length, length, torch.float32, config=cfg, use_tma=tma, pipeline=False)
    sparse = sa._launch(*packed, length, length, torch.float32, config=cfg, use_tma=tma, blocks=blocks, pipeline=pipe)
    res["full"][f"{{int8}}-{{tma}}-{{bm}}x{{bn}}-{{length}}-{{pipe}}"] = (sparse - dense).abs().max().item()

# real radial masks (several frames, L not a multiple of 128), a random plan with an empty row, 64-token blocks
rand = (torch.rand(6, 6, generator=g) < 0.4) | torch.eye(6, dtype=torch.bool)
rand[2] = False  # exactly one block row keeps nothing
cases = [  # name, heads, plan, tiles, TMA, pipelined loop
    ("21x100-bf16", 1, radial_plan(21, 100, 0.2), (64, 64), False, False),  # the backend's own path: bf16 in and out
    ("21x100", 2, radial_plan(21, 100, 0.2), (128, 128), True, False),
    ("9x100", 2, radial_plan(9, 100, 1.0), (64, 128), False, False),
    ("random", 1, custom_plan(rand, 6 * 128 - 50), (64, 64), True, False),
    ("bs64", 1, radial_plan(9, 90, 0.5, block_size=64), (64, 64), False, False),
    ("21x100-pipelined", 1, radial_plan(21, 100, 0.2), (64, 64), True, True),
    ("random-pipelined", 1, custom_plan(rand, 6 * 128 - 50), (128, 64), False, True),
]
for name, h, plan, (bm, bn), tma, pipe in cases:
    q, k, v = qkv(1, plan.length, h)
    cfg = {{"BLOCK_M": bm, "BLOCK_N": bn}}
    if name.endswith("bf16"):
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        out = radial_attention_fp8(q, k, v, plan, config=cfg)
    else:
        out = sa._launch(*sa.quantize(q, k, v), plan.length, plan.length, torch.float32, config=cfg, use_tma=tma,
                         blocks=(plan.counts, plan.indices, plan.block_size), pipeline=pipe)
    keep = expand_block_mask(plan.mask, plan.length, plan.block_size)
    ref8 = sa.reference(*sa.quantize(q, k, v), plan.length, plan.length, out.dtype, block_n=bn, keep=keep).float()
    out = out.float()
    exact = masked_attention(q.float(), k.float(), v.float(), plan)
    unmasked = sa.reference(*sa.quantize(q, k, v), plan.length, plan.length, torch.float32, block_n=bn)
    empty = (~plan.mask.any(1)).repeat_interleave(plan.block_size)[: plan.length]
    res["masked"][name] = dict(
        rel_ref8=((out - ref8).norm() / ref8.norm()).item(),
        rel_exact=((out.double() - exact).norm() / exact.norm()).item(),
        cos_exact=torch.nn.functional.cosine_similarity(out.flatten().double(), exact.flatten(), 0).item(),
        rel_unmasked=((out - unmasked).norm() / unmasked.norm()).item(),
        empty_rows=int(empty.sum()), empty_abs=out[:, empty].abs().sum().item(),
        shape=list(out.shape), finite=bool(torch.isfinite(out).all()), density=plan.density,
    )
print(json.dumps(res))
"""


@needs_triton
def test_sparse_kernel_in_the_interpreter():
    """The kernel itself through Triton's interpreter.

    Every block kept: bit for bit the dense 8-bit kernel (FP8 and INT8 Q·Kᵀ, pointer and TMA loads,
    64/128 tiles, a ragged last block and an exact one, both loop forms). Radial masks (21 and 9 frames, L = 2100 and
    900, not multiples of 128; bf16 in and out through the backend's function), a random plan with
    an empty row, 64-token blocks: equal to the 8-bit math in torch over the same mask (the dense
    kernel's interpreter bar, 1e-3: e4m3 roundings of P at ties; the bf16 case against the
    reference rounded to bf16), within 8-bit error of the float64 masked softmax (cosine >= 0.998,
    the sage tests' bar), and zeros on a row that keeps nothing.
    """
    res = run_interpreted(INTERP_SCRIPT)
    assert len(res["full"]) == 6
    for key, diff in res["full"].items():
        assert diff == 0.0, (key, diff)
    assert len(res["masked"]) == 7
    for name, r in res["masked"].items():
        assert r["finite"] and r["shape"][1] > 0 and r["shape"][3] == 128, name
        assert r["rel_ref8"] < 1e-3, (name, r)
        assert r["cos_exact"] >= 0.998, (name, r)
        assert r["rel_exact"] < 0.03, (name, r)
        assert r["rel_unmasked"] > 0.03, (name, r)  # the mask changes the result far beyond these bars
        assert r["empty_rows"] == (128 if name.startswith("random") else 0) and r["empty_abs"] == 0.0, (name, r)
        assert 0.15 < r["density"] < 0.6, (name, r)  # the mask drops blocks: the test is not dense attention
    assert res["masked"]["21x100"]["density"] < 0.25  # Wan's 21 frames: a sparse mask, as at 480p / 720p


def _signature(bm: int, bn: int, tma: bool, sparse: bool, qk: str = "fp8e4nv") -> dict:
    d = 128
    if tma:  # host-side tensor descriptors, their tiles as the autotuner's pre-hook sets them
        sig = {"Q": f"tensordesc<{qk}[{bm}, {d}]>", "K": f"tensordesc<{qk}[{bn}, {d}]>",
               "VT": f"tensordesc<fp8e4nv[{d}, {bn}]>"}  # fmt: skip
    else:
        sig = {"Q": f"*{qk}", "K": f"*{qk}", "VT": "*fp8e4nv"}
    sig.update(QS="*fp32", KS="*fp32", VS="*fp32", VM="*fp32", O="*bf16", OS="*fp32")
    if sparse:
        sig.update(CNT="*i32", IDX="*i32")
    ints = ("lq", "lk", "lqp", "lkp", "heads", *(("max_cnt",) if sparse else ()), "stride_ob", "stride_ol", "stride_oh")
    return dict(sig, **{n: "i32" for n in ints})


@needs_triton
def test_both_8bit_kernels_compile_for_hopper():
    """Every tile the autotuners try, with TMA and pointer loads, compiles for sm_90 within the
    H100's shared memory: the sparse kernel (both loop forms) and the dense one, which shares its
    pieces (the interpreter does not compile). INT8 Q·Kᵀ once each."""
    from wan_core.kernels import sage_kernel, sage_sparse_kernel

    assert sage_sparse_kernel.attn_fwd_sparse_tuned.configs == sage_sparse_kernel.CONFIGS
    shared_max = 227 * 1024  # H100: dynamic shared memory per block
    sparse_fn, dense_fn = sage_sparse_kernel.attn_fwd_sparse, sage_kernel.attn_fwd
    kernels = [(sparse_fn, cfg, True, {"MASK_BLOCK": 128, "PIPELINE": p}) for cfg in sage_sparse_kernel.CONFIGS
               for p in (False, True)] + [(dense_fn, cfg, False, {"PIPELINE": False}) for cfg in sage_kernel.CONFIGS]
    for fn, cfg, sparse, extra in kernels:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        assert not sparse or (128 % bm == 0 and 128 % bn == 0)  # the radial mask's block
        for tma in (False, True):
            common = dict(cfg.kwargs, HEAD_DIM=128, QK_INT8=False, USE_TMA=tma, KBLK=sa.KBLK)
            out = compile_for_hopper(fn, _signature(bm, bn, tma, sparse), dict(common, **extra), cfg.num_warps,
                                     cfg.num_stages)  # fmt: skip
            assert "cubin" in out.asm and out.metadata.shared <= shared_max, (fn, cfg, tma, out.metadata.shared)
    consts = dict(BLOCK_M=64, BLOCK_N=128, HEAD_DIM=128, QK_INT8=True, USE_TMA=False, KBLK=sa.KBLK)
    for fn, sparse, extra in ((sparse_fn, True, {"MASK_BLOCK": 128, "PIPELINE": True}),
                              (dense_fn, False, {"PIPELINE": True})):  # fmt: skip
        assert "cubin" in compile_for_hopper(fn, _signature(64, 128, False, sparse, "i8"), dict(consts, **extra), 4).asm


# ---- the kernel choice ---------------------------------------------------------------------------


def test_sparse_tile_fixed_on_hopper_only_where_it_fits(monkeypatch):
    """On Hopper the sparse kernel runs the tile measured fastest (not the autotuner's pick), and
    only when that tile divides the mask block; other GPUs, other blocks and the CPU autotune
    (None)."""
    cap = {"v": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["v"])
    cuda = torch.device("cuda")
    hopper = sa._sparse_config(cuda, 128)
    assert hopper == sa.SPARSE_OPTIONS["configs"][(9, 0)] and 128 % hopper["BLOCK_N"] == 0
    assert sa._sparse_config(cuda, 256) == hopper
    assert sa._sparse_config(cuda, 64) is None  # 64-token blocks: the 128-key tile would straddle two
    cap["v"] = (8, 9)
    assert sa._sparse_config(cuda, 128) is None
    assert sa._sparse_config(torch.device("cpu"), 128) is None


def test_kernel_option_and_its_errors():
    assert RadialOptions().kernel == "auto" and RadialOptions(kernel="fp8").dense_backend == "sage_triton"
    assert RadialOptions(kernel="bf16").dense_backend == RadialOptions().dense_backend == "auto"
    with pytest.raises(ValueError, match="kernel must be one of"):
        RadialOptions(kernel="int4")
    with pytest.raises(RuntimeError, match="kernel 'fp8'.*CUDA"):
        get_attention("radial_attn", "cpu", radial=RadialOptions(kernel="fp8"))  # an error at build time
    # fast mode: FP8 linears make "auto" the 8-bit kernel, where it runs (not on this CPU)
    assert for_model(None, True, "cpu") is None and for_model(RadialOptions(0.5), True, "cpu") == RadialOptions(0.5)
    q, k, v = (torch.randn(1, 300, 1, 64) for _ in range(3))
    with pytest.raises(ValueError, match="multiple of the tiles"):
        sa.sage_sparse_attention(q, k, v, torch.ones(3, dtype=torch.int32), torch.zeros(3, 1, dtype=torch.int32), 96)
    with pytest.raises(ValueError, match="block rows"):
        sa.sage_sparse_attention(q, k, v, torch.ones(2, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.int32), 128)


@pytest.fixture
def eight_bit_here(monkeypatch):
    """Pretend the 8-bit kernels run on this CPU, and record the 8-bit sparse calls (run by the torch
    path, exact: the kernel itself is tested in the interpreter and on the GPU)."""
    calls = []
    monkeypatch.setattr(sa, "available", lambda device: None)

    def fp8_path(q, k, v, plan, config=None):
        calls.append(tuple(q.shape))
        return ra.radial_attention_torch(q, k, v, plan)

    monkeypatch.setattr(ra, "radial_attention_fp8", fp8_path)
    return calls


def test_fp8_kernel_runs_the_sparse_layers_and_8bit_dense_ones(eight_bit_here):
    fn = get_attention("radial_attn", "cpu", radial=RadialOptions(0.2, 1, 1, kernel="fp8"))
    assert fn.eight_bit and fn.dense.backend_name == "sage_triton" and fn.for_layer(0) is fn.dense
    assert not get_attention("radial_attn", "cpu").eight_bit  # "auto" outside a model cache: the input dtype's
    assert for_model(None, True, "cpu") == RadialOptions(kernel="fp8")
    assert for_model(RadialOptions(0.5, 2), True, "cpu") == RadialOptions(0.5, 2, kernel="fp8")
    assert for_model(RadialOptions(kernel="bf16"), True, "cpu").kernel == "bf16"  # asked for: kept
    assert for_model(RadialOptions(0.5), False, "cpu") == RadialOptions(0.5)  # bf16 linears: unchanged
    q, k, v = (torch.randn(1, 1800, 2, 16) for _ in range(3))
    with video_grid((9, 10, 20)):
        out = fn(q, k, v)
    plan = radial_plan(9, 200)
    assert eight_bit_here == [(1, 1800, 2, 16)] and rel_err(out, masked_attention(q, k, v, plan)) < 1e-5


def test_fast_mode_dit_gets_the_8bit_sparse_kernel_without_options(tmp_path, eight_bit_here):
    """The pipeline with an FP8 DiT (dit_quantized, quantised on load) and self_attn_1_type radial_attn,
    nothing else: the leased DiT's sparse layers run the 8-bit kernel, its cross-attention stays
    exact; the same run with bf16 linears keeps the input dtype's kernel."""
    from wan_core.loading.tiny import write_tiny_model
    from wan_core.model_cache import lease
    from wan_core.pipeline import WanPipeline

    path = write_tiny_model(tmp_path / "t2v", "t2v", "wan", seed=3)
    common = dict(self_attn_1_type="radial_attn", infer_steps=2, sample_guide_scale=4.0, target_video_length=5,
                  target_height=32, target_width=48)  # fmt: skip
    for quantized in (True, False):
        eight_bit_here.clear()
        extra = dict(dit_quantized=True, dit_quant_scheme="dequant") if quantized else {}
        pipe = WanPipeline(path, dtype="fp32", device="cpu").create_generator(**common, **extra)
        assert pipe.spec.radial == RadialOptions()  # the config names no kernel
        with lease(pipe.spec) as dit:
            n_layers = len(dit.blocks)
            fns = {blk.self_attn.attn_fn for blk in dit.blocks}
            assert len(fns) == 1 and next(iter(fns)).eight_bit == quantized
            assert next(iter(fns)).options.kernel == ("fp8" if quantized else "auto")
            assert {blk.cross_attn.attn_fn.backend_name for blk in dit.blocks} == {"sdpa"}
        res = pipe.generate(3, "a fox in the snow", return_latent=True)
        assert torch.isfinite(res.latent).all()
        assert len(eight_bit_here) == (2 * 2 * n_layers if quantized else 0)  # steps x cond/uncond x layers


def test_model_with_fp8_kernel_equals_masked_attention_model(eight_bit_here):
    """The DiT whose radial backend runs the 8-bit path gets that path's output in every sparse
    layer (here the exact stand-in): the backend hands the forward's own plan and q/k/v through."""
    model = _model(layers=2)
    x, t, ctx = _inputs(model.cfg)
    with torch.no_grad():
        model.set_attention("radial_attn", radial=RadialOptions(0.5, kernel="fp8"))
        got = model(x, t, ctx)
        model.set_attention("radial_attn", radial=RadialOptions(0.5, kernel="bf16"))
        ref = model(x, t, ctx)
    assert len(eight_bit_here) == 2 and rel_err(got, ref) < 1e-6


# ---- on the GPU ----------------------------------------------------------------------------------


def _cuda_8bit() -> bool:
    return torch.cuda.is_available() and sa.available("cuda") is None


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_8bit(), reason="needs a CUDA GPU with FP8 tensor cores and triton")
def test_sparse_kernel_on_the_gpu():
    """The real kernel on CUDA (bf16 inputs as the DiT gives them): every block kept equals the
    dense 8-bit kernel; a radial mask at 9 x 300 tokens equals the 8-bit torch math over it (the
    dense kernel's GPU bar: tensor-core summation moves some P roundings), for each tile tried,
    TMA and pointer loads; at Wan 480p (21 x 1560) the autotuned kernel is within 8-bit error of
    the masked reference (the torch path, float32), as the dense 8-bit kernel is of dense attention,
    and the backend built with kernel "fp8" runs it."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def qkv(length, h=4):
        r = lambda: torch.randn(1, length, h, 128, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
        return r(), r() + 1.0, r()

    plan = radial_plan(9, 300, 0.2, "cuda")
    q, k, v = qkv(plan.length)
    packed = sa.quantize(q, k, v)
    n = plan.mask.shape[0]
    full = (
        torch.full((n,), n, dtype=torch.int32, device="cuda"),
        torch.arange(n, device="cuda", dtype=torch.int32).repeat(n, 1),
        128,
    )
    keep = expand_block_mask(plan.mask, plan.length)
    for bm, bn, w in ((128, 128, 8), (64, 64, 4), (64, 128, 4), (128, 64, 8)):
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w}
        for tma in (False, True):
            dense = sa._launch(
                *packed, plan.length, plan.length, torch.float32, config=cfg, use_tma=tma, pipeline=False
            )
            sparse = sa._launch(*packed, plan.length, plan.length, torch.float32, config=cfg, use_tma=tma, blocks=full)
            assert ((sparse - dense).norm() / dense.norm()).item() < 1e-3, (cfg, tma)
            out = sa._launch(*packed, plan.length, plan.length, torch.float32, config=cfg, use_tma=tma,
                             blocks=(plan.counts, plan.indices, 128))  # fmt: skip
            ref = sa.reference(*packed, plan.length, plan.length, torch.float32, block_n=bn, keep=keep)
            assert ((out - ref).norm() / ref.norm()).item() < 1e-2, (cfg, tma)

    plan = radial_plan(21, 1560, 0.2, "cuda")  # Wan 480p: 32,760 tokens, 34 % of the blocks
    q, k, v = qkv(plan.length, 8)
    out = ra.radial_attention_fp8(q, k, v, plan)  # autotuned
    ref = ra.radial_attention_torch(q.float(), k.float(), v.float(), plan)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    # as accurate as the dense 8-bit kernel against dense attention (~5 % relative error on such inputs)
    dense = get_attention("sage_triton", "cuda")(q, k, v)
    exact = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    err, err_dense = (((a.float() - b).norm() / b.norm()).item() for a, b in ((out, ref), (dense, exact)))
    assert cos(out, ref) >= 0.995 and err < 0.08 and err < 1.5 * err_dense, (err, err_dense)
    with video_grid((21, 30, 52)):
        backend = get_attention("radial_attn", "cuda", radial=RadialOptions(kernel="fp8"))
        assert backend.eight_bit and torch.equal(backend(q, k, v), out)
