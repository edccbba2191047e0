"""The fused block ops on a GPU (marker gpu; run on the device machine): Triton kernels vs their
torch reference at the 14B widths, cuBLASLt's GELU epilogue is the tanh form, the block forward
with the "fused" ops vs the "torch" ops, compiled by inductor."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from wan_core.kernels import fused_ops as fo
from wan_core.layers.fp8 import quantize_model
from wan_core.loading.dit import build_model

from .test_dit import random_state_dict, tiny_cfg

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
    pytestmark = [pytest.mark.gpu, pytest.mark.skip(reason="needs a CUDA GPU and triton")]


@pytest.mark.parametrize("flags", ["00010", "00011", "11100", "11101", "10010", "10011"])
def test_add_norm_mod_kernel_equals_reference(flags):
    has_res, has_gate, aff, mod, quant = (f == "1" for f in flags)
    g = torch.Generator(device="cuda").manual_seed(0)
    b, l, c = 2, 777, 5120
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    args = (r(b, l, c) * 3 + 1, r(b, l, c).bfloat16() if has_res else None, r(b, c) if has_gate else None,
            1 + 0.1 * r(c) if aff else None, 0.1 * r(c) if aff else None, 0.2 * r(b, c) if mod else None,
            0.2 * r(b, c) if mod else None, 1e-6, quant, torch.bfloat16)
    got, ref = fo._launch_add_norm_mod(*args), fo.reference_add_norm_mod(*args)
    if has_res:
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-5)  # an FMA may round once less
    # the normalised rows: the sums run in another order, so a bf16 / e4m3 tie may round the other way
    mismatch = (got[1].float() != ref[1].float()).float().mean().item()
    assert mismatch < 1e-3, mismatch
    rel = ((got[1].float() - ref[1].float()).norm() / ref[1].float().norm()).item()
    assert rel < 1e-3, rel
    if quant:
        torch.testing.assert_close(got[2], ref[2], rtol=1e-2, atol=0)


def test_gelu_quant_kernel_equals_reference():
    g = torch.Generator(device="cuda").manual_seed(1)
    u = (torch.randn(2, 333, 13824, device="cuda", generator=g) * 2).bfloat16()
    got, ref = fo._launch_gelu_quant(u), fo.reference_gelu_quant(u)
    assert (got[0].float() != ref[0].float()).float().mean().item() < 1e-3
    torch.testing.assert_close(got[1], ref[1], rtol=1e-2, atol=0)


def test_rms_norm_rope_kernel_equals_reference():
    from wan_core.kernels.rope import rope_tables

    g = torch.Generator(device="cuda").manual_seed(4)
    grid = (3, 10, 12)
    q = (torch.randn(2, 360, 5120, device="cuda", generator=g) * 2).bfloat16()
    cos, sin = rope_tables(grid, 128, "cuda")
    w = 1 + 0.1 * torch.randn(5120, device="cuda", generator=g)
    got = fo._launch_rms_norm_rope(q, w, cos, sin, 1e-6, 40)
    ref = fo.reference_rms_norm_rope(q, w, cos, sin, 1e-6, 40)
    assert (got.float() != ref.float()).float().mean().item() < 1e-3
    assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-3


def test_quant_rows_kernel_equals_reference():
    from wan_core.kernels import fp8_rows as linear

    g = torch.Generator(device="cuda").manual_seed(5)
    for k in (5120, 13824):
        a = (torch.randn(1000, k, device="cuda", generator=g) * 3).bfloat16()
        got, ref = linear.launch_quant_rows(a), linear.quantize_rows(a)
        assert (got[0].float() != ref[0].float()).float().mean().item() < 1e-3
        torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=0)  # the same multiplier; 1/x rounds once more


def test_linear_gelu_epilogue_is_the_tanh_gelu():
    """In float32 the two GELU forms differ by up to ~1e-3 (|x| ~ 2); the op must match tanh."""
    g = torch.Generator(device="cuda").manual_seed(2)
    lin = torch.nn.Linear(256, 512, device="cuda")
    x = torch.randn(3, 100, 256, device="cuda", generator=g)
    torch.backends.cuda.matmul.allow_tf32 = False
    y = fo.linear_gelu(x, lin)
    lin_out = lin(x)
    tanh, erf = F.gelu(lin_out, approximate="tanh"), F.gelu(lin_out)
    assert (y - tanh).abs().max().item() < 1e-5
    assert (tanh - erf).abs().max().item() > 1e-4  # the check above can tell the two apart
    xb = x.bfloat16()
    yb = fo.linear_gelu(xb, lin.bfloat16())
    ref = F.gelu(lin(xb), approximate="tanh")
    assert ((yb.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


def _cos(a, b):
    return F.cosine_similarity(a.flatten(), b.flatten(), 0).item()


@pytest.mark.parametrize("fp8", [False, True])
def test_fused_block_compiled_equals_block(fp8):
    """bf16: fused (eager and compiled) == unfused up to summation order. FP8: a sum in another
    order moves some e4m3 roundings a whole step (1/8), so the fused and unfused FP8 outputs are
    each compared with the unquantised model: the fused one must be as close to it."""
    cfg = tiny_cfg(dim=1024, ffn_dim=2816, num_heads=8, text_dim=256)
    sd = random_state_dict(cfg)
    model = build_model(cfg, sd, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(2, 16, 5, 16, 16, device="cuda", generator=g).bfloat16()
    t, ctx = torch.tensor([500.0, 20.0], device="cuda"), torch.randn(2, 32, 256, device="cuda", generator=g).bfloat16()
    with torch.no_grad():
        exact = model(x, t, ctx).float()
        if fp8:
            quantize_model(model, kernel="auto")
        assert {b.ops.name for b in model.blocks} == {"torch"}  # build_model's default
        ref = model(x, t, ctx).float()
        model.set_block_ops("auto")  # on CUDA with Triton: the fused ops
        assert {b.ops.name for b in model.blocks} == {"fused"}
        eager = model(x, t, ctx).float()
        for blk in model.blocks:
            blk.compile(fullgraph=True)
        compiled = model(x, t, ctx).float()
    torch._dynamo.reset()
    for out in (eager, compiled):
        if fp8:
            assert _cos(out, exact) >= _cos(ref, exact) - 5e-4, (_cos(out, exact), _cos(ref, exact))
            assert _cos(out, ref) > 0.999
        else:
            assert _cos(out, ref) > 0.9999, _cos(out, ref)


def test_loader_chooses_the_fused_ops_on_cuda(tmp_path):
    """load_dit on CUDA (Triton installed): every block and self-attention runs the fused ops,
    compiled or not (chosen at build, like the attention backend)."""
    from wan_core.loading.dit import load_dit, save_dit

    cfg = tiny_cfg()
    path = save_dit(random_state_dict(cfg), str(tmp_path / "dit"), cfg=cfg)
    model = load_dit(path, dtype=torch.bfloat16, device="cuda")
    assert {m.ops.name for b in model.blocks for m in (b, b.self_attn)} == {"fused"}
