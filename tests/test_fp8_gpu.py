"""FP8 GEMM kernels on a GPU with FP8 tensor cores (marker gpu): `torch._scaled_mm` rowwise (and
sgl-kernel when installed) against the exact math they stand for and against the dequantising
path, at Wan2.1-14B's linear shapes.

  pytest -m gpu tests/test_fp8_gpu.py -s     (-s prints the measured errors)

Tolerances, with why:
- kernel vs its emulation ((codes_x · s_x) @ (codes_w · s_w)^T + b in float32, same codes): only
  the bfloat16 output rounding (2^-9 relative, ~1e-3 rms) and the summation order differ:
  relative error <= 5e-3 (1e-2 with fast accumulation, whose partial sums keep fewer bits).
- kernel vs the dequantising path: the per-token e4m3 rounding of the activations is the only
  extra error (3 mantissa bits: <= 2^-4 per element, ~2-3 % rms, averaging out in the sums):
  relative error <= 0.05, cosine >= 0.998.
"""

import importlib.util

import pytest
import torch
import torch.nn as nn

from wan_core.layers.fp8 import FP8Linear, quantize_model, quantize_rows, set_fp8_kernel
from wan_core.loading.dit import build_model

from .test_dit import random_state_dict, tiny_cfg

pytestmark = pytest.mark.gpu

_HAS_FP8 = torch.cuda.is_available() and torch.version.hip is None and torch.cuda.get_device_capability() >= (8, 9)
requires_fp8 = pytest.mark.skipif(not _HAS_FP8, reason="needs a CUDA GPU with FP8 tensor cores (capability 8.9+)")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _cos(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return (a @ b / (a.norm() * b.norm())).item()


def _layer(k, n, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    lin = nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02, generator=g)
        lin.bias.normal_(0, 0.02, generator=g)
    x = torch.randn(1, 4096, k, device="cuda", dtype=torch.bfloat16, generator=g)
    return lin, x


@requires_fp8
@pytest.mark.parametrize("kernel,tol", [("scaled_mm", 5e-3), ("scaled_mm_fast", 1e-2), ("sgl", 5e-3)])
@pytest.mark.parametrize("k,n", [(5120, 13824), (13824, 5120), (5120, 5120)])  # ffn.0, ffn.2, attention
def test_fp8_gemm_equals_its_math_and_the_dequant_path(kernel, tol, k, n):
    if kernel == "sgl" and importlib.util.find_spec("sgl_kernel") is None:
        pytest.skip("sgl-kernel is not installed")
    lin, x = _layer(k, n)
    m = FP8Linear.from_linear(lin)
    m.set_kernel(kernel)
    with torch.inference_mode():
        y = m(x)  # [1, 4096, n]
        assert y.shape == (1, 4096, n) and y.dtype == torch.bfloat16
        codes, s = quantize_rows(x.reshape(-1, k))
        emu = (codes.float() * s) @ m.dequantized_weight(torch.float32).t() + lin.bias.float()
        err_emu = _rel(y.reshape(-1, n), emu)
        m.set_kernel("dequant")
        y_dq = m(x)
        err_dq, cos_dq = _rel(y, y_dq), _cos(y, y_dq)
    print(f"\n{kernel} {k}->{n}: vs emulation {err_emu:.2e}, vs dequant {err_dq:.2e} (cos {cos_dq:.5f})")
    assert err_emu <= tol, err_emu
    assert err_dq <= 0.05 and cos_dq >= 0.998, (err_dq, cos_dq)


@requires_fp8
def test_tiny_model_scaled_mm_vs_dequant_on_gpu():
    cfg = tiny_cfg("i2v")
    sd = random_state_dict(cfg, seed=3)
    ref = build_model(cfg, sd, dtype=torch.float32, device="cuda")
    m = quantize_model(build_model(cfg, sd, dtype=torch.bfloat16, device="cuda"), kernel="auto")
    assert {mod.kernel for mod in m.modules() if isinstance(mod, FP8Linear)} == {"scaled_mm_fast"}  # auto: fast accumulation
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 16, 2, 4, 4, device="cuda", generator=g)
    ctx = torch.randn(1, 7, cfg.text_dim, device="cuda", generator=g)
    clip = torch.randn(1, 257, cfg.image_dim, device="cuda", generator=g)
    y = torch.randn(1, 20, 2, 4, 4, device="cuda", generator=g)
    t = torch.tensor([500.0], device="cuda")
    with torch.inference_mode():
        out_ref = ref(x, t, ctx, clip_fea=clip, y=y)
        out_mm = m(x.bfloat16(), t, ctx.bfloat16(), clip_fea=clip.bfloat16(), y=y.bfloat16())
        set_fp8_kernel(m, "dequant")
        out_dq = m(x.bfloat16(), t, ctx.bfloat16(), clip_fea=clip.bfloat16(), y=y.bfloat16())
    print(
        f"\ntiny i2v: scaled_mm vs dequant cos {_cos(out_mm, out_dq):.5f}, vs float32 model {_cos(out_mm, out_ref):.5f}"
    )
    assert _cos(out_mm, out_dq) >= 0.995 and _cos(out_mm, out_ref) >= 0.995
