"""FlashAttention-3 FP8 self-attention: our quantisation (CPU) and the backend's errors; the
kernel itself runs in tests/test_fa3_gpu.py (marker gpu, needs the flash_attn_3 package)."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from wan_core.kernels import fa3_fp8
from wan_core.kernels.attention import APPROXIMATE, get_attention, resolve_name

from .triton_tools import needs_triton, run_interpreted


def _exact(q, k, v):
    return F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)


def _cos(a, b):
    return F.cosine_similarity(a.flatten().float(), b.flatten().float(), 0).item()


def test_codes_fill_the_e4m3_range_per_head_and_dequantise_within_its_precision():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 300, 3, 64, generator=g) * torch.tensor([0.1, 1.0, 30.0])[:, None]  # heads of very different size
    codes, descale = fa3_fp8._per_head(x)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape and descale.shape == (2, 3)
    # the largest magnitude of each (batch, head) lands on e4m3's largest value
    torch.testing.assert_close(codes.float().abs().amax(dim=(1, 3)), torch.full((2, 3), 448.0))
    back = codes.float() * descale[:, None, :, None]
    # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4 in the normal range
    normal = x.abs() > descale[:, None, :, None] * 2**-6
    assert ((back - x).abs() <= x.abs() * 2**-4 + 1e-12)[normal].all()


def test_smoothing_keeps_biased_keys_and_values_accurate():
    """Real models' keys and values carry a large per-channel bias: with it removed before the
    rounding (and v's mean added back) the 8-bit attention stays close to exact; rounding the
    biased tensors directly would not (checked too, so the test knows what it protects)."""
    g = torch.Generator().manual_seed(1)
    b, l, h, d = 1, 512, 2, 64
    q = torch.randn(b, l, h, d, generator=g) * 2
    k = torch.randn(b, l, h, d, generator=g) * 2 + 40 * torch.randn(1, 1, h, d, generator=g)
    v = torch.randn(b, l, h, d, generator=g) + 20 * torch.randn(1, 1, h, d, generator=g)
    exact = _exact(q, k, v)
    ours = fa3_fp8.reference(q, k, v)
    assert _cos(ours - v.mean(1, keepdim=True), exact - v.mean(1, keepdim=True)) > 0.995
    # without smoothing: per-head rounding of the biased k and v
    qc, qd = fa3_fp8._per_head(q)
    kc, kd = fa3_fp8._per_head(k)
    vc, vd = fa3_fp8._per_head(v)
    naive = _exact(*(c.float() * s[:, None, :, None] for c, s in ((qc, qd), (kc, kd), (vc, vd))))
    assert _cos(naive - v.mean(1, keepdim=True), exact - v.mean(1, keepdim=True)) < 0.99


def test_reference_shapes_dtype_and_smoothing_invariance():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 100, 4, 32, generator=g).bfloat16() for _ in range(3))
    out = fa3_fp8.reference(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert _cos(out, _exact(q, k, v)) > 0.998
    # the k mean is removed: a shifted k quantises to the same codes (but for float32 rounding
    # at a few e4m3 midpoints)
    a = fa3_fp8.quantize(q, k, v)
    b_ = fa3_fp8.quantize(q, k.float() + 3.0, v)
    assert (a[2].float() != b_[2].float()).float().mean() < 0.01
    torch.testing.assert_close(a[3], b_[3])


def test_backend_names_and_clear_errors(monkeypatch):
    assert resolve_name("fa3_fp8") == resolve_name("flash_attn_3_fp8") == "flash_attn3_fp8"
    assert "flash_attn3_fp8" in APPROXIMATE  # fast mode: cross-attention stays exact
    if importlib.util.find_spec("flash_attn_interface") is None:
        with pytest.raises(ImportError, match="flash_attn_interface"):
            get_attention("fa3_fp8", "cpu")
    # with the package present, the CPU is refused with the reason
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn_interface" else real(n, *a))
    with pytest.raises(RuntimeError, match="CUDA GPUs only"):
        get_attention("flash_attn3_fp8", "cpu")


def test_auto_picks_flash_attention_3_on_hopper_only_when_installed(monkeypatch):
    real = importlib.util.find_spec
    installed = {"yes": False}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: (object() if installed["yes"] else None) if n == "flash_attn_interface" else real(n, *a)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cap = {"v": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cap["v"])
    assert resolve_name("auto", "cuda") == "sdpa_cudnn"
    installed["yes"] = True
    assert resolve_name("auto", "cuda") == "flash_attn3"
    cap["v"] = (8, 9)  # Ada: FlashAttention-3 is Hopper-only
    assert resolve_name("auto", "cuda") == "sdpa"
    cap["v"] = (10, 0)  # Blackwell: not FA3's target either
    assert resolve_name("auto", "cuda") == "sdpa_cudnn"
    assert resolve_name("auto", "cpu") == "sdpa"


QUANT_SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
import triton_interp  # noqa: F401  (before any kernel is defined)
import torch
from wan_core.kernels import fa3_fp8
g = torch.Generator().manual_seed(0)
res = {{}}
for (b, l, h) in ((2, 300, 2), (1, 256, 3), (1, 70, 1)):  # partial blocks, an exact block, a short one
    q = (torch.randn(b, l, h, 128, generator=g) * torch.tensor([1.0, 9.0, 0.2])[:h, None]).bfloat16()
    k = (torch.randn(b, l, h, 128, generator=g) * 2 + 5 * torch.randn(1, 1, h, 128, generator=g)).bfloat16()
    v = (torch.randn(b, l, h, 128, generator=g) + 3 * torch.randn(1, 1, h, 128, generator=g)).bfloat16()
    got, ref = fa3_fp8._launch_quantize(q, k, v, tuned=False), fa3_fp8.quantize(q, k, v)
    res[f"{{b}}-{{l}}-{{h}}"] = [[list(a.shape) == list(r.shape) and a.dtype == r.dtype,
                                 (a.float() != r.float()).float().mean().item(),
                                 ((a.float() - r.float()).abs().max() / r.float().abs().max()).item()]
                                for a, r in zip(got, ref)]
print(json.dumps(res))
"""


@needs_triton
def test_quantize_kernels_equal_torch_quantize_in_the_interpreter():
    """The Triton quantisation (stats pass with q/k ranges + per-head codes pass), run by Triton's
    interpreter, against `quantize`: the same shapes, dtypes, q codes and q scales exactly; k and v
    codes equal but where the means (summed in another order) move a value across a rounding
    midpoint; their scales and the v means within float32 rounding."""
    res = run_interpreted(QUANT_SCRIPT)
    assert len(res) == 3
    for key, tensors in res.items():
        assert len(tensors) == 7
        for i, (same_layout, mismatch, rel) in enumerate(tensors):
            assert same_layout, (key, i)
            if i in (0, 1):  # q codes, q scales: no mean involved
                assert mismatch == 0.0, (key, i, mismatch)
            elif i in (2, 4):  # k, v codes
                assert mismatch < 1e-3, (key, i, mismatch)
            else:  # k, v scales, v means
                assert rel < 1e-6, (key, i, rel)
