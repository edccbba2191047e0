"""8-bit attention (wan_core/sage_attention.py): the quantisation, the torch reference of the
kernel's math against exact attention, the Triton kernel itself through Triton's interpreter
(a CPU subprocess), and the backend's errors. The GPU run of the kernel is test_sage_gpu.py."""

import pytest
import torch
import torch.nn.functional as F

from wan_core.kernels import sage_attention as sa
from wan_core.kernels.attention import APPROXIMATE, get_attention, resolve_name

from .triton_tools import compile_for_hopper, needs_triton, run_interpreted


def exact(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def cos(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), 0).item()


def qkv(b, lq, lk, h, d, key_bias=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, lq, h, d, generator=g)
    k = torch.randn(b, lk, h, d, generator=g) + key_bias * torch.randn(1, 1, h, d, generator=g)
    v = torch.randn(b, lk, h, d, generator=g)
    return q, k, v


@pytest.mark.parametrize("qk_int8", [True, False])
def test_quantize_codes_times_scales_reconstruct_the_inputs(qk_int8):
    q, k, v = qkv(2, 150, 150, 3, 64)
    qc, qs, kc, ks, vt, vs, vm = sa.quantize(q, k, v, qk_int8=qk_int8, smooth_k=False)
    assert qc.shape == (2, 3, 256, 64) and qs.shape == (2, 3, 256) and vt.shape == (2, 3, 64, 256)
    assert ks.shape == (2, 3, 256 // sa.KBLK)  # one k scale per KBLK keys
    assert qc.dtype == (torch.int8 if qk_int8 else sa.FP8) and vt.dtype == sa.FP8
    # padded tokens are zero codes (the kernel masks padded keys; padded query rows are not stored)
    assert qc[:, :, 150:].float().abs().sum() == 0 and vt[..., 150:].float().abs().sum() == 0
    tol = 0.5 / 127 if qk_int8 else 2.0**-4  # half a step of the int8 grid / e4m3's relative half-ulp
    k_back = (kc.float() * ks.repeat_interleave(sa.KBLK, -1)[..., None])[:, :, :150].transpose(1, 2)  # [B, L, H, D]
    amax = torch.stack([k[:, i : i + sa.KBLK].abs().amax((1, 3)) for i in range(0, 150, sa.KBLK)], 1)  # [B, nblk, H]
    amax = amax.repeat_interleave(sa.KBLK, 1)[:, :150, :, None]
    assert ((k_back - k).abs() <= tol * amax + 1e-6).all()
    q_back = (qc.float() * qs[..., None])[:, :, :150].transpose(1, 2) * (64**0.5) / sa.LOG2E
    assert torch.allclose(q_back, q, atol=(tol * q.abs().amax()).item())
    v_back = (vt.float() * vs[..., None])[..., :150].permute(0, 3, 1, 2) + vm[:, None]  # the mean is added back
    assert torch.allclose(vm[:, None], v.mean(1, keepdim=True), atol=1e-6)
    assert ((v_back - v).abs() <= 2.0**-4 * (v - vm[:, None]).abs().amax(1, keepdim=True) + 1e-6).all()


@pytest.mark.parametrize("qk_int8", [True, False])
def test_reference_math_is_close_to_exact_attention(qk_int8):
    q, k, v = qkv(1, 300, 300, 4, 128, key_bias=3.0)
    out = sa.reference(*sa.quantize(q, k, v, qk_int8=qk_int8), 300, 300, torch.float32)
    assert cos(out, exact(q, k, v)) >= 0.998


def test_smoothing_k_is_what_keeps_a_biased_key_accurate():
    """Keys with a large shared channel bias (as real models' keys have): without smoothing the
    per-token 8-bit grid is spent on the bias and the error grows several-fold."""
    q, k, v = qkv(1, 256, 256, 2, 128, key_bias=20.0)
    ref = exact(q, k, v)
    err = {}
    for smooth in (True, False):
        out = sa.reference(*sa.quantize(q, k, v, qk_int8=True, smooth_k=smooth), 256, 256, torch.float32)
        err[smooth] = ((out - ref).norm() / ref.norm()).item()
    assert err[True] < 0.05 and err[False] > 3 * err[True]


def test_smoothing_v_keeps_values_with_a_shared_bias_accurate():
    """Values = a per-channel bias + small variations (as a linear's bias gives): the mean is
    taken out before the e4m3 rounding and added back exactly, so the error is that of the
    variations only: well under the error of quantising the biased values directly."""
    q, k, _ = qkv(1, 512, 512, 2, 128)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(1, 1, 2, 128, generator=g) + 0.2 * torch.randn(1, 512, 2, 128, generator=g)
    ref = exact(q, k, v)
    packed = list(sa.quantize(q, k, v))
    smooth = sa.reference(*packed, 512, 512, torch.float32)
    # the same without smoothing: quantise v itself (a zero mean handed to the kernel)
    vs = v.abs().amax(1) / sa.FP8_MAX  # [B, H, D]
    codes = (v / vs[:, None]).to(sa.FP8).permute(0, 2, 3, 1)  # vᵀ [B, H, D, L]
    packed[4:7] = F.pad(codes, (0, packed[2].shape[2] - 512)).contiguous(), vs, torch.zeros_like(vs)
    plain = sa.reference(*packed, 512, 512, torch.float32)
    err = lambda o: ((o - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(smooth) < 0.01 and err(plain) > 3 * err(smooth)


def test_backend_names_and_errors():
    assert resolve_name("sage_attn2") == "sage_triton_int8"  # LightX2V's name for SageAttention2's scheme
    assert {"sage_triton", "sage_triton_int8"} <= set(APPROXIMATE)
    with pytest.raises((RuntimeError, ImportError), match="sage_triton"):
        get_attention("sage_triton", "cpu")  # CUDA only: a clear error at build time, no fallback


INTERP_SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
import triton_interp  # noqa: F401  (before any kernel is defined)
import torch
from wan_core.kernels import sage_attention as sa
res = {{}}
for qk_int8, tma, pipe, ws in ((True, False, False, False), (False, False, True, False), (False, True, True, False),
                               (True, True, False, False), (False, True, False, True)):
    for (b, lq, lk, h, bn) in ((2, 200, 200, 2, 64), (1, 70, 300, 3, 128)):
        g = torch.Generator().manual_seed(lq + lk)
        q = torch.randn(b, lq, h, 128, generator=g)
        k = torch.randn(b, lk, h, 128, generator=g) + 2.0
        v = torch.randn(b, lk, h, 128, generator=g)
        packed = sa.quantize(q, k, v, qk_int8=qk_int8)
        out = sa._launch(*packed, lq, lk, torch.float32, config={{"BLOCK_M": 64, "BLOCK_N": bn}}, use_tma=tma, pipeline=pipe, warp_spec=ws)
        ref = sa.reference(*packed, lq, lk, torch.float32, block_n=bn)
        res[f"{{qk_int8}}{{tma}}{{pipe}}{{ws}}-{{lq}}-{{lk}}"] = [((out - ref).norm() / ref.norm()).item(), list(out.shape), out.stride()[1]]
print(json.dumps(res))
"""


@needs_triton
def test_triton_kernel_equals_reference_in_the_interpreter():
    """The kernel itself (not a copy of its math) run by Triton's interpreter on the CPU: equal to
    the torch reference, for INT8 and FP8 Q·Kᵀ, pointer and tensor-descriptor loads, with and
    without the software pipeline, with a masked partial key block, Lq != Lk, B = 2."""
    res = run_interpreted(INTERP_SCRIPT)
    assert len(res) == 10
    for key, (rel, shape, stride_l) in res.items():
        assert rel < 1e-3, (key, rel)  # only e4m3 roundings of P at ties may differ (exp2 argument order)
        lq = int(key.split("-")[1])
        assert shape[1] == lq and shape[3] == 128 and stride_l == shape[2] * 128  # [B, Lq, H, D] contiguous


def test_eight_bit_self_attention_keeps_cross_attention_exact(monkeypatch):
    """WanModel.set_attention: with an 8-bit self-attention and no cross backend named, the
    cross-attention stays on exact SDPA ("auto"); named, it is what was named. (The 8-bit kernel
    needs CUDA, so a stand-in function is registered under its name here.)"""
    import wan_core.kernels.attention as attention
    from wan_core.loading.dit import build_model

    from .test_dit import random_state_dict, tiny_cfg

    def stand_in(q, k, v):
        return exact(q, k, v)

    monkeypatch.setitem(attention.BACKENDS, "sage_triton", (None, lambda: stand_in))
    monkeypatch.setattr(sa, "available", lambda device: None)
    cfg = tiny_cfg()
    model = build_model(cfg, random_state_dict(cfg), dtype=torch.float32, device="cpu")
    model.set_attention("sage_triton")
    assert model.blocks[0].self_attn.attn_fn is stand_in
    assert model.blocks[0].cross_attn.attn_fn.backend_name == "sdpa"  # "auto" on a CPU
    model.set_attention("sage_triton", "sage_triton")
    assert model.blocks[0].cross_attn.attn_fn is stand_in
    model.set_attention("sdpa_math")  # an exact backend: cross-attention follows it
    assert model.blocks[0].cross_attn.attn_fn.backend_name == "sdpa_math"


QUANT_SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
import triton_interp  # noqa: F401  (before any kernel is defined)
import torch
from wan_core.kernels import sage_attention as sa
g = torch.Generator().manual_seed(0)
res = {{}}
for (b, l, h) in ((2, 300, 2), (1, 256, 3), (1, 70, 1)):  # partial blocks, an exact block, a short one
    q = torch.randn(b, l, h, 128, generator=g).bfloat16()
    k = (torch.randn(b, l, h, 128, generator=g) + 2).bfloat16()  # keys and values with a channel bias
    v = (torch.randn(b, l, h, 128, generator=g) + 1).bfloat16()
    got, ref = sa._launch_quantize(q, k, v), sa.quantize(q, k, v)
    res[f"{{b}}-{{l}}-{{h}}"] = [[list(a.shape) == list(r.shape) and a.dtype == r.dtype,
                                 (a.float() != r.float()).float().mean().item(),
                                 ((a.float() - r.float()).abs().max() / r.float().abs().max()).item()]
                                for a, r in zip(got, ref)]
print(json.dumps(res))
"""


@needs_triton
def test_quantize_kernels_equal_torch_quantize_in_the_interpreter():
    """The Triton quantisation (stats pass + codes pass) against `quantize` in Triton's
    interpreter: every code tensor and scale identical in shape, dtype and value, except that the
    means are summed in another order (a last-bit difference in v's means and scales)."""
    res = run_interpreted(QUANT_SCRIPT)
    for key, tensors in res.items():
        assert len(tensors) == 7
        for i, (same_layout, mismatch, rel) in enumerate(tensors):
            assert same_layout, (key, i)
            if i in (0, 1, 2, 4):  # codes and the q scales
                assert mismatch == 0.0, (key, i, mismatch)
            else:  # k block scales, v scales, v means: they follow the means
                assert rel < 1e-6, (key, i, rel)


@pytest.mark.parametrize("op", ["sage_quantize", "fa3_quantize"])  # this kernel's and FlashAttention-3's inputs
def test_quantize_op_fake_matches_real(op):
    from torch.library import opcheck

    import wan_core.kernels.fa3_fp8  # noqa: F401  (registers fa3_quantize)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 300, 2, 128, generator=g).bfloat16() for _ in range(3))
    opcheck(getattr(torch.ops.wan_core, op).default, (q, k, v))


@needs_triton
def test_quantize_kernels_compile_for_hopper():
    """Every tile the autotuners try, for both attentions' quantisation, compiles for sm_90 (the
    interpreter does not compile)."""
    from wan_core.kernels import sage_quant_kernel as kern

    build = compile_for_hopper
    sig = {"k_ptr": "*bf16", "v_ptr": "*bf16", "part_ptr": "*fp32", "L": "i32", "C": "i32", "n_chunks": "i32"}
    for cfg in kern.kv_stats_tuned.configs:
        assert "cubin" in build(kern.kv_stats, sig, dict(cfg.kwargs, BLOCK_L=256), cfg.num_warps).asm
        assert "cubin" in build(kern.kv_stats, dict(sig, q_ptr="*bf16"), dict(cfg.kwargs, BLOCK_L=256, QK_RANGE=True),
                                cfg.num_warps).asm  # fmt: skip
    qsig = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr")}
    qsig.update({n: "*fp32" for n in ("km_ptr", "vm_ptr", "qd_ptr", "kd_ptr", "vd_ptr")})
    qsig.update({n: "*fp8e4nv" for n in ("qc_ptr", "kc_ptr", "vc_ptr")}, L="i32", H="i32")
    for cfg in kern.quantize_per_head_tuned.configs:
        assert "cubin" in build(kern.quantize_per_head, qsig, dict(cfg.kwargs, HEAD_DIM=128), cfg.num_warps).asm
    sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "km_ptr": "*fp32", "vm_ptr": "*fp32", "vs_ptr": "*fp32",
           "qc_ptr": "*fp8e4nv", "qs_ptr": "*fp32", "kc_ptr": "*fp8e4nv", "ks_ptr": "*fp32", "vt_ptr": "*fp8e4nv",
           "L": "i32", "Lp": "i32", "H": "i32", "q_extra": "fp32"}
    for sub in (16, 32, 64):
        assert "cubin" in build(kern.quantize_qkv, sig, {"HEAD_DIM": 128, "KBLK": sa.KBLK, "SUB": sub}, 4).asm
