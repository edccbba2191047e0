"""Cross-attention to a short prompt through its output projection (`wan_core.kernels.text_projected`):
P · (V W_o) equals the projection of the attention output (float: to rounding; FP8: within the
error of the plain path's codes), the op falls back to the plain path where the projected form
does not pay, the weights kernel equals the torch weights (Triton's interpreter; sm_90 compile),
the fused block ops route to it only where the projection hands its operands over, and a whole
DiT forward is unchanged by it."""

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wan_core.kernels import text_projected as tp
from wan_core.kernels.block_ops import get_block_ops
from wan_core.kernels.text_attention import text_attention
from wan_core.layers.fp8 import FP8Linear, _cpu_has_scaled_mm, quantize_weight

from .test_text_attention import full_attention, image_kv, padded_text
from .triton_tools import compile_for_hopper, needs_triton, run_interpreted


def projection(n_out=48, c=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_out, c, generator=g) / c**0.5, torch.randn(n_out, generator=g)


def plain(q, k, v, n, w, bias, k_img=None, v_img=None):
    """The model's plain path: attention over every padded row (+ the image branch), then the projection."""
    out = full_attention(q, k, v)
    if k_img is not None:
        out = out + full_attention(q, k_img, v_img)
    return F.linear(out.flatten(2), w, bias)


@pytest.mark.parametrize("heads", [3, 8])
@pytest.mark.parametrize("lengths", [(7, 40), (0, 39), (40, 1), (12, 3)])
def test_projected_equals_the_projection_of_the_attention(lengths, heads):
    """Short and empty prompts, one without padding, a batch of two lengths, and keys fewer than
    the count the weights are padded to (lk = 13 below: 16 for 3 heads, 14 for 8: heads x keys a
    multiple of 16)."""
    lk = 13 if max(lengths) <= 12 else 40
    q, k, v, n = padded_text(lk=lk, lengths=lengths, heads=heads, d=32)
    if lk == 13:
        assert tp._padded_keys(n, lk, heads) == {3: 16, 8: 14}[heads]
    w, bias = projection(c=heads * 32)
    assert tp.projects(q, k, n, None)
    got = tp.text_attention_projected(q, k, v, n, None, None, w, None, bias, "linear")
    torch.testing.assert_close(got, plain(q, k, v, n, w, bias), atol=1e-5, rtol=1e-5)


def test_projected_without_a_bias():
    q, k, v, n = padded_text(lengths=(7, 9))
    w, _ = projection()
    got = tp.text_attention_projected(q, k, v, n, None, None, w, None, None, "linear")
    torch.testing.assert_close(got, plain(q, k, v, n, w, None), atol=1e-5, rtol=1e-5)


def test_weights_are_the_softmax_over_the_collapsed_keys():
    q, k, v, n = padded_text(lengths=(7, 40))
    p = tp.reference_text_probs(q, k, n, 48)  # [B, Lq, H, 48]
    assert p.shape == (2, 37, 3, 48)
    assert (p[0, ..., 8:] == 0).all() and (p[1, ..., 40:] == 0).all()  # past each item's n + 1 keys
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 37, 3))
    # weights times the values = attention over all padded rows (the padding row stands for its count)
    vv = F.pad(v, (0, 0, 0, 0, 0, 8))
    torch.testing.assert_close(torch.einsum("blhj,bjhd->blhd", p, vv), full_attention(q, k, v), atol=2e-6, rtol=2e-5)


def test_value_projection_is_each_heads_values_through_its_columns():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(5, 3, 4, generator=g)  # [Lk, H, D]
    w = torch.randn(7, 12, generator=g)
    u = tp.value_projection(v, 16, w)  # [N, H·16]
    assert u.shape == (7, 48)
    for h in range(3):
        torch.testing.assert_close(u[:, h * 16 : h * 16 + 5], w[:, h * 4 : h * 4 + 4] @ v[:, h].T)
        assert (u[:, h * 16 + 5 : (h + 1) * 16] == 0).all()


def test_long_prompts_and_the_image_branch_take_the_plain_path(monkeypatch):
    """Above PROJECTED_MAX_KEYS, or with I2V's image keys, the op is the plain path bit for bit."""
    q, k, v, n = padded_text(lk=tp.PROJECTED_MAX_KEYS + 20, lengths=(tp.PROJECTED_MAX_KEYS, 3))
    w, bias = projection()
    assert not tp.projects(q, k, n, None)
    got = tp.text_attention_projected(q, k, v, n, None, None, w, None, bias, "linear")
    assert torch.equal(got, F.linear(text_attention(q, k, v, n).flatten(2), w, bias))
    q, k, v, n = padded_text(lengths=(7, 9))
    k_img, v_img = image_kv(q)
    assert not tp.projects(q, k, n, k_img)
    got = tp.text_attention_projected(q, k, v, n, k_img, v_img, w, None, bias, "linear")
    torch.testing.assert_close(got, plain(q, k, v, n, w, bias, k_img, v_img), atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_refused():
    q, k, v, n = padded_text()
    w, bias = projection()
    with pytest.raises(ValueError, match="mm must be one of"):
        tp.text_attention_projected(q, k, v, n, None, None, w, None, bias, "sgl")
    with pytest.raises(ValueError, match="weight_scale goes with"):
        tp.text_attention_projected(q, k, v, n, None, None, w, torch.ones(48, 1), bias, "linear")
    with pytest.raises(ValueError, match="does not take"):
        tp.text_attention_projected(q, k, v, n, None, None, w[:, :64], None, bias, "linear")


@pytest.mark.skipif(not _cpu_has_scaled_mm(), reason="this torch has no rowwise _scaled_mm on the CPU")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp8_projected_error_is_that_of_the_plain_codes(seed, monkeypatch):
    """FP8: the weights as e4m3 codes, U quantised per output channel. Against float attention
    through the dequantised projection, its error stays within 1.6 times the plain path's (the
    attention output as codes, then the FP8 GEMM): two e4m3 roundings (P, U) against one."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 300, 4, 64, generator=g) * 2
    k, v = torch.randn(1, 40, 4, 64, generator=g), torch.randn(1, 40, 4, 64, generator=g)
    n = torch.tensor([12], dtype=torch.int32)
    k[:, 12:], v[:, 12:] = k[:, 12], v[:, 12]
    w, bias = projection(256, 256, seed)
    codes, scale = quantize_weight(w)
    want = plain(q, k, v, n, codes.float() * scale, bias)
    args = (q.bfloat16(), k.bfloat16(), v.bfloat16(), n, None, None, codes, scale, bias.bfloat16(), "scaled_mm_fast")

    def err(out):
        return ((out.float() - want).norm() / want.norm()).item()

    projected = err(tp.text_attention_projected(*args))
    monkeypatch.setattr(tp, "PROJECTED_MAX_KEYS", 0)
    plain_codes = err(tp.text_attention_projected(*args))
    assert 0 < projected < 1.6 * plain_codes and plain_codes < 0.03, (projected, plain_codes)


def _rms_parts(q, k, k_img=None, seed=4):
    """q's RMSNorm over its channels split as the fused block ops use it: the rows' factors r
    [B, Lq], the weight γ folded into k (and k_img); and the normalised q the plain path reads."""
    g = torch.Generator().manual_seed(seed)
    gamma = 1 + 0.5 * torch.randn(q.shape[2:], generator=g)  # [H, D]
    r = torch.rsqrt(q.float().square().mean(dim=(2, 3)) + 1e-6)
    qn = (q.float() * r[:, :, None, None] * gamma).to(q.dtype)

    def fold(t):
        return None if t is None else (t.float() * gamma).to(t.dtype)

    return r, fold(k), fold(k_img), qn


@pytest.mark.parametrize("lengths", [(7, 40), (12, 3)])
def test_rows_factor_with_the_weight_in_the_keys_is_the_normalised_query(lengths):
    """q_scale: text attention (both branches) and the projected form, fed q as the q linear wrote
    it, its rows' RMS factors and the keys times the norm's weight, equal the same ops fed the
    normalised q (float32: to rounding); a q_scale of another shape or dtype is refused."""
    q, k, v, n = padded_text(lengths=lengths)
    q = q * 3
    w, bias = projection()
    k_img, v_img = image_kv(q)
    r, kg, kg_img, qn = _rms_parts(q, k, k_img)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_attention(q, kg, v, n, q_scale=r), text_attention(qn, k, v, n), **tol)
    torch.testing.assert_close(text_attention(q, kg, v, n, kg_img, v_img, q_scale=r),
                               text_attention(qn, k, v, n, k_img, v_img), **tol)  # fmt: skip
    for ki, vi, kgi in ((None, None, None), (k_img, v_img, kg_img)):
        got = tp.text_attention_projected(q, kg, v, n, kgi, vi, w, None, bias, "linear", q_scale=r)
        torch.testing.assert_close(got, plain(qn, k, v, n, w, bias, ki, vi), **tol)
    for bad in (r[:, :5], r.double()):
        with pytest.raises(ValueError, match="q_scale must be float32 of shape"):
            tp.text_attention_projected(q, kg, v, n, None, None, w, None, bias, "linear", q_scale=bad)


def test_fused_cross_attention_folds_the_query_norm_only_with_the_projected_form(monkeypatch):
    """The fused block ops hand the projected form q before its RMSNorm with the rows' factors
    (the norm's weight in the keys): the torch ops' result to rounding. Without the projected form
    (no operands, PROJECTED_MAX_KEYS 0) or without a q norm they normalise q as the torch ops do."""
    from wan_core.models.dit import RMSNorm

    q, k, v, n = padded_text(lengths=(7, 9))
    q = q * 3
    norm = RMSNorm(96)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(96, generator=torch.Generator().manual_seed(8)))
    scales = []

    def fn(*args):
        return text_attention(*args)

    def projected(*a, q_scale=None):
        scales.append(q_scale)
        return tp.text_attention_projected(*a, q_scale=q_scale)

    fn.projected = projected
    fused, torch_ops = get_block_ops("fused"), get_block_ops("torch")
    o = nn.Linear(96, 48)
    args = (q, k, v, n, None, None)
    want = torch_ops.cross_attend(fn, o, norm, *args)
    torch.testing.assert_close(fused.cross_attend(fn, o, norm, *args), want, atol=1e-5, rtol=1e-5)
    assert len(scales) == 1 and scales[0].shape == (2, 37)
    torch.testing.assert_close(scales[0], torch.rsqrt(q.square().mean(dim=(2, 3)) + norm.eps))
    scales.clear()
    torch.testing.assert_close(fused.cross_attend(fn, o, nn.Identity(), *args), torch_ops.cross_attend(fn, o, nn.Identity(), *args))
    assert scales == [None]
    monkeypatch.setattr(tp, "PROJECTED_MAX_KEYS", 0)
    scales.clear()
    assert torch.equal(fused.cross_attend(fn, o, norm, *args), torch_ops.cross_attend(fn, o, norm, *args))
    assert scales == [None]


def test_op_passes_opcheck():
    q, k, v, n = padded_text(lengths=(7, 9))
    w, bias = projection()
    torch.library.opcheck(tp._projected_op, (q, k, v, n, None, None, w, None, bias, "linear"))


INTERP_SCRIPT = r"""
import json, sys
sys.path[:0] = [{tests!r}, {root!r}]
import triton_interp  # noqa: F401  (before any kernel is defined)
import torch
from wan_core.kernels import text_projected as tp
from wan_core.kernels.fp8_rows import FP8_DTYPE
from tests.test_text_attention import padded_text
res = []
for lengths, lk, lp in [((7, 40), 40, 48), ((0, 39), 40, 48), ((12, 3), 13, 16), ((30, 20), 40, 32)]:
    q, k, v, n = padded_text(lk=lk, lengths=lengths, dtype=torch.bfloat16)
    ref = tp.reference_text_probs(q.float(), k.float(), n, lp)
    p = tp.launch_text_probs(q, k, n, lp, codes=False).float()
    c = tp.launch_text_probs(q, k, n, lp, codes=True)
    dist = (c.float() - (ref * 448).to(FP8_DTYPE).float()).abs() / (ref * 448).clamp(min=2**-6)
    res.append([(p - ref).abs().max().item(), dist.max().item(), c.dtype == FP8_DTYPE,
                bool((p[0, ..., min(lengths[0] + 1, lk):] == 0).all())])
    # each row's scores times its factor (q's RMSNorm factor): the weights of q * r
    r = torch.rand(q.shape[:2], generator=torch.Generator().manual_seed(lk)) * 2 + 0.1
    ref = tp.reference_text_probs(q.float() * r[:, :, None, None], k.float(), n, lp)
    p = tp.launch_text_probs(q, k, n, lp, codes=False, q_scale=r).float()
    c = tp.launch_text_probs(q, k, n, lp, codes=True, q_scale=r)
    dist = (c.float() - (ref * 448).to(FP8_DTYPE).float()).abs() / (ref * 448).clamp(min=2**-6)
    res.append([(p - ref).abs().max().item(), dist.max().item(), c.dtype == FP8_DTYPE, True])
print(json.dumps(res))
"""


@needs_triton
def test_weights_kernel_equals_the_torch_weights_in_the_interpreter():
    """bf16 weights within bf16 rounding of float32 softmax; e4m3 codes within one e4m3 step
    (1/8 relative) of the codes of the float32 weights; zeros past the keys."""
    for bf16_err, code_dist, is_fp8, zeros in run_interpreted(INTERP_SCRIPT):
        assert bf16_err < 8e-3 and code_dist <= 0.13 and is_fp8 and zeros, (bf16_err, code_dist)


@needs_triton
def test_weights_kernel_compiles_for_hopper():
    from wan_core.kernels.text_attention_kernel import text_probs_fwd, text_probs_fwd_tuned

    for out in ("*fp8e4nv", "*bf16"):
        sig = {"Q": "*bf16", "K": "*bf16", "N": "*i32", "R": "*fp32", "P": out, "lq": "i32", "lk": "i32", "lp": "i32",
               "heads": "i32", "scale_log2": "fp32", "mult": "fp32"}
        sig.update({f"s{t}_{a}": "i32" for t in "qkp" for a in "blh"})
        for c in text_probs_fwd_tuned.configs:
            for keys, has_r in ((16, False), (64, False), (16, True)):
                compile_for_hopper(text_probs_fwd, sig, dict(HEAD_DIM=128, KEYS=keys, HAS_R=has_r, **c.kwargs), c.num_warps)


class _Hooked(nn.Linear):
    pass


def test_fused_attend_projects_only_through_a_projection_that_hands_its_operands():
    q, k, v, n = padded_text(lengths=(7, 9))
    calls = []

    def fn(*args):
        return text_attention(*args)

    fn.projected = lambda *a: calls.append(a[-1]) or tp.text_attention_projected(*a)
    fused, torch_ops = get_block_ops("fused"), get_block_ops("torch")
    o = nn.Linear(96, 48)
    want = o(text_attention(q, k, v, n).flatten(2))
    args = (q, k, v, n, None, None)
    torch.testing.assert_close(fused.attend(fn, o, *args), want, atol=1e-5, rtol=1e-5)
    assert calls == ["linear"]
    hooked = nn.Linear(96, 48)
    hooked.register_forward_hook(lambda m, i, out: out)  # a LoRA branch / offload: the layer's own forward
    fp8_dequant = FP8Linear.from_linear(o)  # kernel "dequant": no FP8 GEMM to hand over
    for ops, lin in ((fused, hooked), (fused, fp8_dequant), (torch_ops, o)):
        calls.clear()
        ops.attend(fn, lin, *args)
        assert calls == [], lin


def test_fp8_linear_hands_its_operands_only_for_scaled_mm():
    lin = FP8Linear.from_linear(nn.Linear(32, 16, dtype=torch.bfloat16))
    assert lin.projection_operands is None  # "dequant"
    if _cpu_has_scaled_mm():
        lin.set_kernel("scaled_mm_fast", "cpu")
        w, s, b, mm = lin.projection_operands
        assert w is lin.weight and s is lin.weight_scale and mm == "scaled_mm_fast" and b.dtype == lin.compute_dtype
        lin.register_forward_pre_hook(lambda m, a: None)
        assert lin.projection_operands is None


def test_dit_forward_is_unchanged_by_the_projected_cross_attention():
    """A tiny T2V DiT with the fused block ops on the CPU (their torch references), a batch of two
    prompts of different lengths: the same forward with the projected form as without it."""
    from wan_core.loading.dit import build_model

    from .test_dit import random_state_dict, tiny_cfg

    cfg = tiny_cfg()
    model = build_model(cfg, random_state_dict(cfg), dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 2, 4, 4, generator=g)
    ctx = [torch.randn(7, cfg.text_dim, generator=g), torch.randn(20, cfg.text_dim, generator=g)]
    t = torch.tensor([500.0, 300.0])
    model.set_attention("sdpa")
    fused = get_block_ops("fused")
    seen = []
    orig = tp._projected

    def spy(*a):
        seen.append(1)
        return orig(*a)

    tp_calls = pytest.MonkeyPatch()
    tp_calls.setattr(tp, "_projected", spy)
    try:
        model.set_block_ops(fused)
        with torch.no_grad():
            got = model(x, t, ctx)
    finally:
        tp_calls.undo()
    assert len(seen) == cfg.num_layers
    plain_ops = get_block_ops("torch")
    model.set_block_ops(dataclasses.replace(fused, attend=plain_ops.attend, cross_attend=plain_ops.cross_attend))
    with torch.no_grad():
        want = model(x, t, ctx)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="needs a CUDA GPU with FP8")  # fmt: skip
def test_projected_on_gpu_at_wan_sizes(monkeypatch):
    """Wan's 40 heads of 128 at 5,000 query rows, prompts of 0, 12 and 60 tokens: bf16 within bf16
    rounding of the float32 plain path; FP8 within 1.6 times the plain FP8 path's error."""
    from wan_core.layers.fp8 import FP8Linear

    torch.manual_seed(0)
    lin = nn.Linear(5120, 5120, device="cuda", dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(lin)
    fp8.set_kernel("scaled_mm_fast")
    w, s, b, mm = fp8.projection_operands
    for n in (0, 12, 60):
        q = torch.randn(1, 5000, 40, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 512, 40, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 512, 40, 128, device="cuda", dtype=torch.bfloat16)
        k[:, n:], v[:, n:] = k[:, n].clone(), v[:, n].clone()
        lengths = torch.tensor([n], dtype=torch.int32)
        want = plain(q.float(), k.float(), v.float(), lengths, lin.weight.float(), lin.bias.float())
        got = tp.text_attention_projected(q, k, v, lengths, None, None, lin.weight, None, lin.bias, "linear")
        assert ((got.float() - want).norm() / want.norm()).item() < 1e-2
        want = plain(q.float(), k.float(), v.float(), lengths, fp8.dequantized_weight(torch.float32), lin.bias.float())
        projected = tp.text_attention_projected(q, k, v, lengths, None, None, w, s, b, mm)
        with monkeypatch.context() as m:
            m.setattr(tp, "PROJECTED_MAX_KEYS", 0)
            plain_codes = tp.text_attention_projected(q, k, v, lengths, None, None, w, s, b, mm)
        e_p, e_c = ((projected.float() - want).norm() / want.norm()).item(), ((plain_codes.float() - want).norm() / want.norm()).item()
        assert e_p < 1.6 * e_c and e_c < 0.05, (n, e_p, e_c)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="needs a CUDA GPU with FP8")  # fmt: skip
def test_query_norm_folded_on_gpu_at_wan_sizes():
    """The fused cross-attention at Wan's sizes on the GPU (bf16, an FP8 output projection, a 12-,
    a 150- and a 300-token prompt: the weights kernel, the text kernel, the exact backend over all
    rows after `scale_rows`): q before its RMSNorm with the rows' factors is as close to the
    float32 result as the torch ops' normalised q."""
    from wan_core.models.dit import RMSNorm

    torch.manual_seed(0)
    fp8 = FP8Linear.from_linear(nn.Linear(5120, 5120, device="cuda", dtype=torch.bfloat16))
    fp8.set_kernel("scaled_mm_fast")
    norm = RMSNorm(5120).cuda()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(5120, device="cuda"))
    fused, torch_ops = get_block_ops("fused"), get_block_ops("torch")
    for n in (12, 150, 300):
        q = torch.randn(1, 5000, 40, 128, device="cuda", dtype=torch.bfloat16) * 4
        k = torch.randn(1, 512, 40, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 512, 40, 128, device="cuda", dtype=torch.bfloat16)
        k[:, n:], v[:, n:] = k[:, n].clone(), v[:, n].clone()
        lengths = torch.tensor([n], dtype=torch.int32)
        qn = norm(q.float().flatten(2)).view_as(q)
        want = plain(qn, k.float(), v.float(), lengths, fp8.dequantized_weight(torch.float32), fp8.bias.float())
        args = (tp.cross_text_attention, fp8, norm, q, k, v, lengths, None, None)

        def err(out, want=want):
            return ((out.float() - want).norm() / want.norm()).item()

        e_fold, e_torch = err(fused.cross_attend(*args)), err(torch_ops.cross_attend(*args))
        assert e_fold < 1.6 * e_torch and e_torch < 0.05, (n, e_fold, e_torch)
