"""FlashAttention-3 (bf16 and FP8) on a Hopper GPU (marker gpu; needs the flash_attn_3 package)."""

import pytest
import torch
import torch.nn.functional as F

from wan_core.kernels import fa3_fp8
from wan_core.kernels.attention import get_attention

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available() or fa3_fp8.available("cuda") is not None:
    pytestmark = [pytest.mark.gpu, pytest.mark.skip(reason="needs a Hopper GPU and flash_attn_3")]


def _qkv(l, h=40, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda: torch.randn(1, l, h, 128, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    bias = lambda s: s * torch.randn(1, 1, h, 128, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    return r() * 2, r() * 2 + bias(3), r() + bias(2)


def _exact(q, k, v):
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def _cos(a, b):
    return F.cosine_similarity(a.flatten().float(), b.flatten().float(), 0).item()


@pytest.mark.parametrize("l", [4096, 3333])
def test_fp8_kernel_is_close_to_its_reference_and_to_exact(l):
    q, k, v = _qkv(l)
    out = get_attention("fa3_fp8", "cuda")(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    ref = fa3_fp8.reference(q, k, v)
    exact = _exact(q, k, v)
    # the kernel also rounds P to e4m3; the reference does not
    assert _cos(out, ref) > 0.999
    assert _cos(out, exact) > 0.998


def test_bf16_kernel_equals_sdpa():
    q, k, v = _qkv(3333)
    out = get_attention("flash_attn3", "cuda")(q, k, v)
    torch.testing.assert_close(out, _exact(q, k, v), atol=2e-2, rtol=2e-2)


def test_fp8_backend_compiles_inside_a_function():
    q, k, v = _qkv(2048)
    fn = torch.compile(get_attention("fa3_fp8", "cuda"), fullgraph=True)
    with torch.inference_mode():
        out = fn(q, k, v)
    assert _cos(out, fa3_fp8.reference(q, k, v)) > 0.999


@pytest.mark.parametrize("l", [32760, 3333])
def test_triton_quantisation_equals_torch_quantize(l):
    """The autotuned Triton kernels on the GPU against `quantize`'s torch code: q's codes and
    scales identical, k's and v's codes but for the rare value a differently summed mean moves
    across a rounding midpoint."""
    q, k, v = _qkv(l)
    got, ref = fa3_fp8._launch_quantize(q, k, v), fa3_fp8.quantize(q, k, v)
    for i, (a, r) in enumerate(zip(got, ref)):
        assert a.shape == r.shape and a.dtype == r.dtype, i
        if i in (0, 1):
            assert torch.equal(a.float(), r.float()), i
        elif i in (2, 4):
            assert (a.float() != r.float()).float().mean().item() < 1e-3, i
        else:
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
