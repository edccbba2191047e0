"""Attention outputs stored as e4m3 codes for the FP8 output projection (`attn.codes`, the "fused"
block ops' `attend`): the 8-bit kernels (dense and block-sparse) and the text kernel store, bit for
bit, their own float32 output times one multiplier per batch item, and that multiplier's bound holds
(no output is clamped); the paths without such a kernel quantise per token; the block ops hand codes
only to a projection that takes them, from a backend that has them. The GPU run: marker gpu."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wan_core.kernels import radial_attention as ra
from wan_core.kernels import sage_attention as sa
from wan_core.kernels.attention_context import video_grid
from wan_core.kernels.block_ops import get_block_ops
from wan_core.kernels.fp8_rows import FP8_DTYPE, head_rows_codes, quantize_rows, row_scales
from wan_core.kernels.fused_ops import QuantRows
from wan_core.kernels.text_attention import text_attention, text_attention_codes, text_multiplier

from .test_text_attention import padded_text
from .triton_tools import compile_for_hopper, needs_triton, run_interpreted


def test_multipliers_bound_the_outputs_and_rows_get_their_inverse():
    """out_multiplier: 448 / max(|vm| + 448 vs) per batch item; text_multiplier: 448 / (max |v| +
    max |v_img|); row_scales repeats each item's inverse over its rows."""
    vs = torch.tensor([[[0.5, 1.0]], [[0.01, 0.02]]])  # [B, H, D]
    vm = torch.tensor([[[-300.0, 1.0]], [[0.0, 2.0]]])
    mult = sa.out_multiplier(vs, vm)
    assert mult.dtype == torch.float32 and torch.allclose(mult, torch.tensor([448 / 524.0, 448 / (2 + 448 * 0.02)]))
    v = torch.zeros(2, 3, 1, 2)
    v[0, 1, 0, 1], v[1, 2, 0, 0] = -7.0, 2.0
    v_img = torch.full((2, 4, 1, 2), 0.5)
    assert torch.allclose(text_multiplier(v), torch.tensor([64.0, 224.0]))
    assert torch.allclose(text_multiplier(v, v_img), torch.tensor([448 / 7.5, 448 / 2.5]))
    scales = row_scales(torch.tensor([2.0, 4.0]), 3)
    assert scales.shape == (6, 1) and scales.flatten().tolist() == [0.5] * 3 + [0.25] * 3


def test_text_codes_off_cuda_are_the_per_token_codes_of_the_output():
    """Without the kernel (the CPU; a long prompt on CUDA) the codes are the output quantised per
    token: what the FP8 projection would have done with the bf16 output."""
    q, k, v, n = padded_text(dtype=torch.bfloat16)
    codes, scale = text_attention_codes(q, k, v, n)
    want_codes, want_scale = head_rows_codes(text_attention(q, k, v, n))
    assert codes.dtype == FP8_DTYPE and codes.shape == q.shape and scale.shape == (q.shape[0] * q.shape[1], 1)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8)) and torch.equal(scale, want_scale)
    with pytest.raises(ValueError, match="both k_img and v_img"):
        text_attention_codes(q, k, v, n, k, None)


def test_head_rows_codes_is_one_scale_per_token_over_all_heads():
    out = torch.randn(2, 5, 3, 8).bfloat16()
    codes, scale = head_rows_codes(out)
    want, want_scale = quantize_rows(out.reshape(10, 24))
    assert codes.shape == out.shape and torch.equal(codes.reshape(10, 24).view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(scale, want_scale)


def test_radial_codes_off_cuda_follow_the_backend_path():
    """The radial backend's codes: the bf16 / torch path quantises its output per token; a dense
    step takes the dense backend's codes when it has them (else quantises per token too)."""
    from wan_core.kernels.attention_context import sampling_step

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3 * 100, 2, 16, generator=g).bfloat16() for _ in range(3))
    calls = []

    def dense(q, k, v):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    def dense_codes(q, k, v):
        calls.append("codes")
        return head_rows_codes(dense(q, k, v))

    backend = ra.make_radial(ra.RadialOptions(dense_timesteps=1, kernel="bf16"), dense, "cpu")
    with video_grid((3, 10, 10)):
        codes, scale = backend.codes(q, k, v)
        want, want_scale = head_rows_codes(backend(q, k, v))
        assert torch.equal(codes.view(torch.uint8), want.view(torch.uint8)) and torch.equal(scale, want_scale)
        with sampling_step(0):  # a dense step: the dense backend's output, quantised per token
            codes0, _ = backend.codes(q, k, v)
            assert torch.equal(codes0.view(torch.uint8), head_rows_codes(dense(q, k, v))[0].view(torch.uint8))
            dense.codes = dense_codes
            backend.codes(q, k, v)
    assert calls == ["codes"]


class _Linear(torch.nn.Module):
    """An output projection stand-in that says whether it takes codes and records its input type."""

    def __init__(self, takes: bool):
        super().__init__()
        self.takes_codes = takes
        self.seen = []

    def forward(self, x):
        self.seen.append(type(x).__name__)
        return x


def test_fused_attend_hands_codes_only_to_a_projection_that_takes_them():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 4, generator=g) for _ in range(3))

    def attn(q, k, v):
        return q + k + v

    def attn_codes(q, k, v):
        return head_rows_codes(attn(q, k, v))

    plain = lambda q, k, v: attn(q, k, v)  # noqa: E731  (a wrapper, as sequence parallel makes: no codes)
    attn.codes = attn_codes
    fused, torch_ops = get_block_ops("fused"), get_block_ops("torch")
    got = fused.attend(attn, _Linear(True), q, k, v)
    assert isinstance(got, QuantRows) and got.codes.shape == (1, 6, 8) and got.scale.shape == (6, 1)
    for ops, fn, o in ((fused, attn, _Linear(False)), (fused, plain, _Linear(True)), (torch_ops, attn, _Linear(True))):
        out = ops.attend(fn, o, q, k, v)
        assert isinstance(out, torch.Tensor) and torch.equal(out, (q + k + v).flatten(2))


INTERP_SCRIPT = r"""
import json, sys
sys.path[:0] = [{tests!r}, {root!r}]
import triton_interp  # noqa: F401  (before any kernel is defined)
import torch
from wan_core.kernels import sage_attention as sa
from wan_core.kernels import text_attention as ta
from wan_core.kernels.fp8_rows import FP8_DTYPE, quantize_rows, row_scales
from wan_core.kernels.radial_mask import radial_plan
from tests.test_text_attention import padded_text, image_kv
g = torch.Generator().manual_seed(0)
res = {{}}

def report(name, out, codes, mult):
    scaled = out.float() * mult.view(-1, *(1,) * (out.dim() - 1))
    want = scaled.clamp(-448, 448).to(FP8_DTYPE)
    b, l = out.shape[:2]
    rows = out.float().reshape(b * l, -1)
    tok_codes, tok_scale = quantize_rows(rows)  # what the projection would do with the output: per token
    err = lambda back: ((back - rows).norm() / rows.norm()).item()  # noqa: E731
    res[name] = dict(dtype=str(codes.dtype), shape=list(codes.shape) == list(out.shape),
                     equal=bool(torch.equal(codes.view(torch.uint8), want.view(torch.uint8))),
                     peak=scaled.abs().amax().item(), floor=scaled.abs().amax((1, 2, 3)).min().item(),
                     err=err(codes.float().reshape(b * l, -1) * row_scales(mult, l)),
                     err_token=err(tok_codes.float() * tok_scale))

# 8-bit kernels: two batch items 100x apart, heads of different ranges, v with a channel bias
q = torch.randn(2, 300, 2, 128, generator=g)
k = torch.randn(2, 300, 2, 128, generator=g) + 2.0
v = (torch.randn(1, 300, 2, 128, generator=g) + 1.0) * torch.tensor([1.0, 30.0]).view(1, 1, 2, 1)
v = torch.cat([v, v * 0.01])  # the second item's values 100 times smaller
packed = sa.quantize(q, k, v)
mult = sa.out_multiplier(packed[5], packed[6])
res["mult_ratio"] = (mult[1] / mult[0]).item()
plan = radial_plan(3, 100, 1.0)
cfg = {{"BLOCK_M": 64, "BLOCK_N": 64}}
for name, blocks, tma, pipe in (("dense", None, False, False), ("dense-tma", None, True, False),
                                ("sparse", (plan.counts, plan.indices, plan.block_size), False, True),
                                ("sparse-tma", (plan.counts, plan.indices, plan.block_size), True, False)):
    kw = dict(config=cfg, blocks=blocks, use_tma=tma, pipeline=pipe)
    out = sa._launch(*packed, 300, 300, torch.float32, **kw)
    codes = sa._launch(*packed, 300, 300, torch.float32, out_mult=mult, **kw)
    report(name, out, codes, mult)

# the text kernel, float32 inputs (its float32 output is what the codes round), with and without the image branch
q, k, v, n = padded_text(lengths=(7, 40))
v[1] *= 0.01
for name, img in (("text", None), ("text-img", image_kv(q, 33))):
    ki, vi = img if img is not None else (None, None)
    mult = ta.text_multiplier(v, vi)
    out = ta._launch(q, k, v, n, ki, vi)
    codes = ta._launch(q, k, v, n, ki, vi, out_mult=mult)
    report(name, out, codes, mult)
print(json.dumps(res))
"""


@needs_triton
def test_kernels_store_their_own_output_times_the_multiplier_in_the_interpreter():
    """The kernels themselves (Triton's interpreter): with codes, each stores exactly
    e4m3(out · multiplier), `out` its float32 output without codes (dense and sparse 8-bit, pointer
    and TMA loads, both loop forms; the text kernel with and without the image branch); no output
    passes 448 before the clamp (the bound holds) and every item uses its range (its largest code
    is not tiny: the items' multipliers differ as their values do); the codes are as close to the
    float32 output as per-token codes of it are."""
    res = run_interpreted(INTERP_SCRIPT)
    assert res.pop("mult_ratio") == pytest.approx(100.0, rel=1e-3)
    assert set(res) == {"dense", "dense-tma", "sparse", "sparse-tma", "text", "text-img"}
    for name, r in res.items():
        assert r["dtype"] == "torch.float8_e4m3fn" and r["shape"] and r["equal"], (name, r)
        assert r["peak"] <= 448.0, (name, r)
        assert r["floor"] > 8.0, (name, r)  # each batch item's largest output within ~6 binades of the bound
        # as accurate as one scale per token (e4m3's relative step does not depend on the scale)
        assert r["err"] < 1.1 * r["err_token"] and r["err"] < 0.03, (name, r)
    print({name: (round(r["err"], 5), round(r["err_token"], 5)) for name, r in res.items()})


@needs_triton
def test_codes_kernels_compile_for_hopper():
    """With CODES the kernels store e4m3 (the interpreter does not compile): the sparse kernel's
    Hopper tile and the dense kernel's first, with TMA; the text kernel with the image branch."""
    from wan_core.kernels import sage_kernel, sage_sparse_kernel, text_attention_kernel

    from .test_radial_fp8 import _signature

    for fn, sparse, cfg, extra in ((sage_sparse_kernel.attn_fwd_sparse, True, sage_sparse_kernel.CONFIGS[0],
                                    {"MASK_BLOCK": 128, "PIPELINE": True}),
                                   (sage_kernel.attn_fwd, False, sage_kernel.CONFIGS[0], {"PIPELINE": False})):  # fmt: skip
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        sig = dict(_signature(bm, bn, True, sparse), O="*fp8e4nv")
        consts = dict(cfg.kwargs, HEAD_DIM=128, QK_INT8=False, USE_TMA=True, KBLK=sa.KBLK, CODES=True, **extra)
        assert "cubin" in compile_for_hopper(fn, sig, consts, cfg.num_warps, cfg.num_stages).asm
    from .test_text_attention import text_kernel_signature

    c = text_attention_kernel.CONFIGS[0]
    sig = dict(text_kernel_signature(), O="*fp8e4nv")
    consts = dict(HEAD_DIM=128, HAS_IMG=True, CODES=True, **c.kwargs)
    assert "cubin" in compile_for_hopper(text_attention_kernel.text_attn_fwd, sig, consts, c.num_warps,
                                         c.num_stages).asm  # fmt: skip


# ---- on a GPU ---------------------------------------------------------------------------------------

_GPU = torch.cuda.is_available() and sa.available("cuda") is None


@pytest.mark.gpu
@pytest.mark.skipif(not _GPU, reason="needs a CUDA GPU with FP8 and triton")
def test_codes_on_the_gpu_round_the_kernels_own_output():
    """Compiled for the GPU (autotuned tiles, the Hopper sparse tile): the codes of the radial 8-bit
    kernel and of the text kernel are the e4m3 rounding of the same kernel's float32 output (the
    autotuner may pick another tile for each: a code may move by one step at a rounding tie)."""
    from wan_core.kernels import text_attention as ta
    from wan_core.kernels.radial_mask import radial_plan

    def check(codes, scale, out, mult):
        want = (out * mult).clamp(-448, 448).to(FP8_DTYPE)
        step = (codes.float() - want.float()).abs() / want.float().abs().clamp(min=2.0**-6)
        assert (codes.view(torch.uint8) == want.view(torch.uint8)).float().mean() > 0.999 and step.max() <= 0.126
        assert torch.allclose(scale, (1.0 / mult).expand(out.shape[1], 1))

    g = torch.Generator(device="cuda").manual_seed(0)
    plan = radial_plan(21, 256, 0.2)
    q, k, v = (torch.randn(1, plan.length, 4, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    k, v = k + 1.0, v + 0.5
    packed = sa._quantize_op(q, k, v)  # the quantisation the backend runs
    out = sa._launch(*packed, plan.length, plan.length, torch.float32,
                     blocks=(plan.counts.cuda(), plan.indices.cuda(), plan.block_size))  # fmt: skip
    check(*ra.radial_attention_fp8(q, k, v, plan, codes=True), out, sa.out_multiplier(packed[5], packed[6]))

    n = torch.tensor([12], dtype=torch.int32)
    qt = torch.randn(1, 4096, 4, 128, device="cuda", generator=g)
    kt, vt = (torch.randn(1, 512, 4, 128, device="cuda", generator=g) for _ in range(2))
    kt[:, 12:], vt[:, 12:] = kt[:, 12:13].clone(), vt[:, 12:13].clone()  # the padding rows, all equal
    check(*text_attention_codes(qt, kt, vt, n), ta._launch(qt, kt, vt, n), text_multiplier(vt))


@pytest.mark.gpu
@pytest.mark.skipif(not _GPU, reason="needs a CUDA GPU with FP8 and triton")
@pytest.mark.parametrize("attn", ["sage_triton", "radial_attn"])
def test_fast_mode_forward_with_codes_is_as_accurate_as_the_bf16_handover(attn):
    """A small fast-mode DiT (FP8 linears, the fused block ops, 8-bit or radial self-attention over
    21 frames, compiled blocks): the output projections get codes, and the forward is as close to
    the same model whose output projections take bf16 unquantised (kernel "dequant") as the bf16
    handover (each projection quantising per token) is: the per-item scale costs no accuracy."""
    import dataclasses

    from wan_core.layers.fp8 import FP8Linear, quantize_model
    from wan_core.loading.dit import build_model

    from .test_dit import random_state_dict, tiny_cfg

    cfg = tiny_cfg(dim=512, ffn_dim=1024, num_heads=4, num_layers=2)
    sd = random_state_dict(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 21, 16, 16, generator=g).cuda()  # 21 x 8 x 8 = 1,344 tokens: a sparse radial mask
    t, ctx = torch.tensor([500.0]).cuda(), torch.randn(1, 7, cfg.text_dim, generator=g).cuda()
    fused = get_block_ops("fused")
    plain = get_block_ops("torch")
    bf16_handover = dataclasses.replace(fused, attend=plain.attend, cross_attend=plain.cross_attend)
    outs, seen = {}, []
    for name, ops in (("codes", fused), ("bf16", bf16_handover), ("unquantised", bf16_handover)):
        m = build_model(cfg, sd, dtype=torch.bfloat16, device="cuda")
        quantize_model(m)
        m.set_attention(attn, radial=ra.RadialOptions(kernel="fp8") if attn == "radial_attn" else None)
        m.set_block_ops(ops)
        if name == "unquantised":
            for blk in m.blocks:
                blk.self_attn.o.set_kernel("dequant")
                blk.cross_attn.o.set_kernel("dequant")
        if name == "codes":  # the types the output projections get (a hook would make them take bf16)
            o = m.blocks[0].self_attn.o
            assert isinstance(o, FP8Linear) and o.takes_codes
            orig = FP8Linear.forward

            def spy(self, inp, orig=orig, o=o):
                if self is o:
                    seen.append(type(inp).__name__)
                return orig(self, inp)

            FP8Linear.forward = spy
            try:
                with torch.inference_mode():
                    m(x, t, ctx)
            finally:
                FP8Linear.forward = orig
        for blk in m.blocks:
            blk.compile()
        with torch.inference_mode():
            outs[name] = m(x, t, ctx).float()
        torch._dynamo.reset()
    assert seen == ["QuantRows"]

    def err(name):
        return 1 - F.cosine_similarity(outs[name].flatten(), outs["unquantised"].flatten(), 0).item()

    assert 0 < err("codes") < 1.3 * err("bf16") + 1e-6, (err("codes"), err("bf16"))


@pytest.mark.parametrize("codes", [False, True])
def test_text_op_fake_matches_real(codes):
    """The text attention op, both outputs (off CUDA: its reference path), against its fake (what
    torch.compile traces with): same shapes, dtypes and strides."""
    from torch.library import opcheck

    q, k, v, n = padded_text(dtype=torch.bfloat16)
    opcheck(torch.ops.wan_core.text_attention.default, (q, k, v, n, None, None, codes))
