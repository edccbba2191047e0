"""The FA3 path of radial attention (`radial_fa3`): the block mask as a varlen batch with a page table.

On CPU: the layout (each query block's keys, read through its page table up to its used length,
are exactly the tokens its mask row keeps) and the whole function run against a float64
emulation of FA3's paged kernel. On a Hopper GPU with FA3 installed: equal to the dense FA3 e4m3
backend's math restricted to the same blocks, within the 8-bit bar.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from wan_core.kernels import fa3_fp8
from wan_core.kernels.radial_fa3 import paged_layout, radial_attention_fa3
from wan_core.kernels.radial_mask import expand_block_mask, radial_plan


def keys_read(cu, table, used, page, row) -> list[int]:
    """The key tokens (indices into the paged cache) that query block `row` reads."""
    n_used = int(used[row])
    pages = table[row, : -(-n_used // page)].tolist()
    tokens = [p * page + i for p in pages for i in range(page)]
    return tokens[:n_used]


@pytest.mark.parametrize("frames,per_frame,page", [(5, 72, 128), (5, 72, 8), (4, 96, 128), (4, 96, 32), (3, 128, 64)])
@pytest.mark.parametrize("batch", [1, 2])
def test_each_query_block_reads_exactly_its_kept_tokens(frames, per_frame, page, batch):
    plan = radial_plan(frames, per_frame, 0.2)
    length, bs, n = plan.length, plan.block_size, plan.counts.shape[0]
    if length % page and page != bs:
        pytest.skip("a page size that does not divide the length needs padding to whole blocks")
    cu, table, used, pages = paged_layout(plan, page, batch)
    padded = n * bs if length % page else length
    assert pages * page == padded
    assert cu.tolist() == [b * length + min(i * bs, length) for b in range(batch) for i in range(n)] + [batch * length]
    keep = expand_block_mask(plan.mask, length)  # [L, L]
    for b in range(batch):
        for i in range(n):
            row = b * n + i
            want = [b * padded + t for t in keep[i * bs].nonzero()[:, 0].tolist()]
            assert keys_read(cu, table, used, page, row) == want, (b, i)
            assert int(table.max()) < batch * pages


def emulated_fa3(q, k_cache, v_cache, cache_seqlens, page_table, cu_seqlens_q, max_seqlen_q, q_descale, k_descale,
                 v_descale, softmax_scale):
    """FA3's paged varlen e4m3 forward in float64: each sequence's queries over its pages' keys."""
    page = k_cache.shape[1]
    kf = k_cache.double().reshape(-1, *k_cache.shape[2:])  # [tokens, H, D]
    vf = v_cache.double().reshape(-1, *v_cache.shape[2:])
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    for r in range(len(cu_seqlens_q) - 1):
        lo, hi = int(cu_seqlens_q[r]), int(cu_seqlens_q[r + 1])
        assert hi - lo <= max_seqlen_q
        idx = torch.tensor(keys_read(cu_seqlens_q, page_table, cache_seqlens, page, r))
        qs = q[lo:hi].double() * q_descale[r][None, :, None]
        ks = kf[idx] * k_descale[r][None, :, None]
        vs = vf[idx] * v_descale[r][None, :, None]
        p = torch.einsum("qhd,khd->hqk", qs, ks).mul(softmax_scale).softmax(-1)
        out[lo:hi] = torch.einsum("hqk,khd->qhd", p, vs).bfloat16()
    return out


def test_radial_fa3_equals_masked_attention_of_the_quantised_inputs(monkeypatch):
    """Through the emulated kernel, the whole function (quantise, layout, pages, v mean back) is
    the masked attention of `fa3_fp8.quantize`'s dequantised inputs."""
    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(flash_attn_with_kvcache=emulated_fa3))
    torch.manual_seed(0)
    plan = radial_plan(4, 96, 0.2)
    b, h, d = 2, 2, 16
    q, k, v = (torch.randn(b, plan.length, h, d, dtype=torch.bfloat16) for _ in range(3))
    qc, qd, kc, kd, vc, vd, vm = fa3_fp8.quantize(q, k, v)

    def deq(c, s):  # [B, L, H, D] -> [B, H, L, D] float64
        return (c.double() * s.double()[:, None, :, None]).transpose(1, 2)

    keep = expand_block_mask(plan.mask, plan.length)
    want = torch.nn.functional.scaled_dot_product_attention(deq(qc, qd), deq(kc, kd), deq(vc, vd), attn_mask=keep)
    want = (want.transpose(1, 2) + vm.double()).float()
    for page in (128, 32):
        got = radial_attention_fa3(q, k, v, plan, page=page).float()
        assert (got - want).abs().max() < 0.02 * want.abs().max(), page  # bf16 rounding of the kernel's output only


@pytest.mark.gpu
def test_radial_fa3_on_hopper_equals_the_dense_fa3_math_under_the_mask():
    if fa3_fp8.available("cuda") is not None:
        pytest.skip(fa3_fp8.available("cuda"))
    torch.manual_seed(0)
    plan = radial_plan(21, 1560, 0.2, "cuda")  # Wan 480p
    q, k, v = (torch.randn(1, plan.length, 40, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    keep = expand_block_mask(plan.mask, plan.length)
    qc, qd, kc, kd, vc, vd, vm = fa3_fp8.quantize(q, k, v)
    rows = slice(0, 2048)  # a band of query rows

    def deq(c, s):
        return (c.float() * s[:, None, :, None]).transpose(1, 2)

    want = torch.nn.functional.scaled_dot_product_attention(deq(qc, qd)[:, :, rows], deq(kc, kd), deq(vc, vd),
                                                            attn_mask=keep[rows])
    want = want.transpose(1, 2) + vm
    for page in (128, 8):
        got = radial_attention_fa3(q, k, v, plan, page=page)[:, rows].float()
        cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), 0).item()
        assert cos > 0.999, (page, cos)
