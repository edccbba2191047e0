"""The 8-bit Triton attention on a GPU (marker gpu; run on the device machine)."""

import itertools

import pytest
import torch

from wan_core.kernels import sage_attention as sa
from wan_core.kernels.attention import APPROXIMATE, get_attention

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available() or sa.available("cuda") is not None:
    pytestmark = [pytest.mark.gpu, pytest.mark.skip(reason="needs a CUDA GPU with FP8 and triton")]


def _qkv(b, lq, lk, h, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda l: torch.randn(b, l, h, 128, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    return r(lq), r(lk) + 1.0, r(lk)


@pytest.mark.parametrize("qk_int8", [True, False])
@pytest.mark.parametrize("lq,lk", [(1000, 1000), (333, 2049)])
def test_kernel_equals_reference_and_is_close_to_sdpa(qk_int8, lq, lk):
    q, k, v = _qkv(2, lq, lk, 4)
    packed = sa.quantize(q, k, v, qk_int8=qk_int8)
    # INT8 scores are exact; FP8 ones differ from torch's by the tensor cores' summation, which
    # moves some P roundings to the neighbouring e4m3 value
    tol = 2e-3 if qk_int8 else 1e-2
    combos = itertools.product(((128, 128, 8), (64, 64, 4), (64, 128, 4)), (False, True), (False, True))
    for (bm, bn, w), tma, pipe in combos:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w}
        out = sa._launch(*packed, lq, lk, torch.float32, config=cfg, use_tma=tma, pipeline=pipe)
        ref = sa.reference(*packed, lq, lk, torch.float32, block_n=bn)
        assert ((out - ref).norm() / ref.norm()).item() < tol, (cfg, tma, pipe)

    out = get_attention("sage_triton_int8" if qk_int8 else "sage_triton", "cuda")(q, k, v)  # autotuned
    exact = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    c = torch.nn.functional.cosine_similarity(out.flatten().float(), exact.flatten().float(), 0).item()
    assert c >= 0.995


def test_warp_specialised_variant_equals_reference_where_it_compiles():
    """Triton's automatic warp specialisation (an option, off by default until measured): when
    this Triton compiles it for this GPU, the result is the same function."""
    q, k, v = _qkv(1, 1000, 1300, 4)
    packed = sa.quantize(q, k, v)
    cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8}
    try:
        out = sa._launch(*packed, 1000, 1300, torch.float32, config=cfg, warp_spec=True)
    except Exception as e:  # noqa: BLE001  (bench_attention.py reports which builds support it)
        pytest.skip(f"warp specialisation does not compile here: {e!r:.200}")
    ref = sa.reference(*packed, 1000, 1300, torch.float32, block_n=128)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2


def test_compiled_block_with_the_kernel_matches_eager():
    """Inside torch.compile (the default on CUDA) the quantisation is fused by inductor and the
    kernel is an opaque custom op: same result as eager, no graph break."""
    q, k, v = _qkv(1, 4096, 4096, 8)
    fn = get_attention("sage_triton", "cuda")

    def f(q, k, v):
        return fn(q * 1.5, k, v) * 2

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)  # fullgraph: a graph break is an error
    exact = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q * 1.5, k, v))).transpose(1, 2) * 2

    def err(o):
        return ((o.float() - exact.float()).norm() / exact.float().norm()).item()

    # inductor may round a few codes differently (x·(1/s) for x/s): the same error, not the same bits
    assert err(compiled) < 0.1 and abs(err(compiled) - err(eager)) < 0.2 * err(eager)


def test_dit_forward_in_fast_mode_is_close_to_exact():
    """A small DiT with head_dim 128 (as Wan's): 8-bit self-attention (+ FP8 linears) against the
    same weights with exact SDPA, on the same inputs: the fast-mode bar (cosine >= 0.99)."""
    from wan_core.layers.fp8 import quantize_model
    from wan_core.loading.dit import build_model

    from .test_dit import random_state_dict, tiny_cfg

    cfg = tiny_cfg(dim=256, ffn_dim=512, num_heads=2, num_layers=2)
    sd = random_state_dict(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 32, 32, generator=g).cuda()  # 3 x 16 x 16 = 768 tokens
    t, ctx = torch.tensor([500.0]).cuda(), torch.randn(1, 7, cfg.text_dim, generator=g).cuda()
    outs = {}
    for mode in ("exact", "fast"):
        m = build_model(cfg, sd, dtype=torch.bfloat16, device="cuda")
        if mode == "fast":
            quantize_model(m, kernel="scaled_mm")
        m.set_attention("sage_triton" if mode == "fast" else "sdpa")
        assert m.blocks[0].cross_attn.attn_fn.backend_name not in APPROXIMATE  # exact beside the 8-bit one
        with torch.inference_mode():
            outs[mode] = m(x, t, ctx).float()
    c = torch.nn.functional.cosine_similarity(outs["fast"].flatten(), outs["exact"].flatten(), 0).item()
    assert c >= 0.99, c


@pytest.mark.parametrize("l", [32760, 1000])
def test_quantize_kernels_equal_torch_quantize(l):
    """The Triton quantisation at Wan's self-attention shape (40 heads, the 480p token count)."""
    g = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(1, l, 40, 128, device="cuda", generator=g).bfloat16()
    k = (torch.randn(1, l, 40, 128, device="cuda", generator=g) + 2).bfloat16()
    v = (torch.randn(1, l, 40, 128, device="cuda", generator=g) + 1).bfloat16()
    got, ref = sa._launch_quantize(q, k, v), sa.quantize(q, k, v)
    for i, (a, r) in enumerate(zip(got, ref)):
        assert a.shape == r.shape and a.dtype == r.dtype, i
        # the means are summed in another order: a last-bit difference in what depends on them
        # (k's block scales, v's scales and means: i = 3, 5, 6), and a code at a rounding
        # boundary may move one step; q's codes and scales do not depend on them: identical
        rel = ((a.float() - r.float()).norm() / r.float().norm()).item()
        if i in (0, 1):
            assert torch.equal(a.float(), r.float()), i
        elif i in (2, 4):
            assert (a.float() != r.float()).float().mean().item() < 1e-3 and rel < 1e-2, i
        else:
            assert rel < 1e-5, i
