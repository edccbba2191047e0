"""Cross-attention with the text padding collapsed (`wan_core.kernels.text_attention`): equal to
plain attention over all the padded rows (plus, for I2V, plain attention over the image keys,
summed), for the torch reference (CPU), the Triton kernel (Triton's interpreter on the CPU; sm_90
compile) and on a GPU."""

import pytest
import torch
import torch.nn.functional as F

from wan_core.kernels.text_attention import key_log_counts, reference_text_attention, text_attention
from wan_core.kernels.text_projected import cross_text_attention

from .triton_tools import compile_for_hopper, needs_triton, run_interpreted


def padded_text(b=2, lk=40, heads=3, d=32, lengths=(7, 40), seed=0, dtype=torch.float32):
    """k, v [B, Lk, H, D] whose rows from lengths[i] on are one repeated padding row (as the text
    projection makes them), and q [B, Lq, H, D]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 37, heads, d, generator=g)
    k = torch.randn(b, lk, heads, d, generator=g)
    v = torch.randn(b, lk, heads, d, generator=g)
    for i, n in enumerate(lengths):
        if n < lk:
            k[i, n:] = k[i, n]
            v[i, n:] = v[i, n]
    return q.to(dtype), k.to(dtype), v.to(dtype), torch.tensor(lengths, dtype=torch.int32)


def full_attention(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def image_kv(q, li=11, seed=3):
    """I2V's image keys and values [B, Li, H, D] for q's batch and heads (as the CLIP branch makes them)."""
    g = torch.Generator().manual_seed(seed)
    b, _, h, d = q.shape
    return (torch.randn(b, li, h, d, generator=g).to(q.dtype) for _ in range(2))


def two_branches(q, k, v, k_img, v_img):
    """The model's I2V cross-attention before the collapse: text over every row + image, two softmaxes."""
    return full_attention(q, k, v) + full_attention(q, k_img, v_img)


def test_log_counts():
    bias = key_log_counts(torch.tensor([3, 5, 0]), 5)
    inf = float("-inf")
    assert bias[0].tolist() == [0.0, 0.0, 0.0, pytest.approx(torch.log(torch.tensor(2.0)).item()), inf]
    assert bias[1].tolist() == [0.0] * 5  # no padding: every key is real
    assert bias[2].tolist() == [pytest.approx(torch.log(torch.tensor(5.0)).item()), inf, inf, inf, inf]


@pytest.mark.parametrize("lengths", [(7, 40), (0, 39), (40, 1)])
def test_reference_equals_attention_over_all_padded_rows(lengths):
    q, k, v, n = padded_text(lengths=lengths)
    torch.testing.assert_close(reference_text_attention(q, k, v, n), full_attention(q, k, v), atol=2e-6, rtol=2e-5)


def test_reference_with_the_image_branch_is_the_sum_of_two_attentions():
    q, k, v, n = padded_text()
    k_img, v_img = image_kv(q)
    want = two_branches(q, k, v, k_img, v_img)
    torch.testing.assert_close(reference_text_attention(q, k, v, n, k_img, v_img), want, atol=4e-6, rtol=2e-5)
    torch.testing.assert_close(text_attention(q, k, v, n, k_img, v_img), want, atol=4e-6, rtol=2e-5)
    # one softmax over text and image keys together is not what the model computes
    joint = full_attention(q, torch.cat([k, k_img], 1), torch.cat([v, v_img], 1))
    assert (joint - want).abs().max() > 1e-1


def test_image_branch_needs_both_keys_and_values():
    q, k, v, n = padded_text()
    k_img, _ = image_kv(q)
    with pytest.raises(ValueError, match="both k_img and v_img"):
        text_attention(q, k, v, n, k_img, None)


def test_collapsing_is_wrong_when_the_padding_rows_differ():
    """The op relies on equal padding rows: with distinct rows after n it is not full attention."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 9, 2, 16, generator=g) for _ in range(3))
    n = torch.tensor([4], dtype=torch.int32)
    assert (reference_text_attention(q, k, v, n) - full_attention(q, k, v)).abs().max() > 1e-2


INTERP_SCRIPT = r"""
import json, sys
sys.path[:0] = [{tests!r}, {root!r}]
import triton_interp  # noqa: F401  (before any kernel is defined)
import torch
from wan_core.kernels import text_attention as ta
from tests.test_text_attention import padded_text, full_attention, image_kv, two_branches
errs = []
for lengths in [(7, 40), (0, 39), (40, 1), (33, 32)]:
    q, k, v, n = padded_text(lengths=lengths, dtype=torch.bfloat16)
    out = ta._launch(q, k, v, n).float()
    ref = full_attention(q.float(), k.float(), v.float())
    errs.append((out - ref).abs().max().item())
    for li in (11, 33):  # the image branch in the same program: one key tile and a partial second
        ki, vi = image_kv(q, li)
        out = ta._launch(q, k, v, n, ki, vi).float()
        errs.append((out - two_branches(q.float(), k.float(), v.float(), ki.float(), vi.float())).abs().max().item())
# strided q (a view of [B, L, H*D] with heads split), as the model hands it
q, k, v, n = padded_text(dtype=torch.bfloat16)
qs = torch.cat([q, q], dim=2)[:, :, ::2]
errs.append((ta._launch(qs, k, v, n).float() - full_attention(qs.float(), k.float(), v.float())).abs().max().item())
# each row's scores times its factor (q's RMSNorm factor, block_ops): q read as q * r, both branches
r = torch.rand(q.shape[:2], generator=torch.Generator().manual_seed(3)) * 2 + 0.1
ki, vi = image_kv(q, 11)
qr = q.float() * r[:, :, None, None]
for out, ref in ((ta._launch(q, k, v, n, q_scale=r), full_attention(qr, k.float(), v.float())),
                 (ta._launch(q, k, v, n, ki, vi, q_scale=r), two_branches(qr, k.float(), v.float(), ki.float(), vi.float()))):
    errs.append((out.float() - ref).abs().max().item())
# q times its rows' factors by the Triton kernel: torch's float32 product rounded once, bit for bit
# (rows not a multiple of the tile's 8, H·D = 96 not of its 128 columns)
errs.append(0.0 if torch.equal(ta.scaled_rows(q, r, interpret=True), torch.mul(q, r[:, :, None, None], out=torch.empty_like(q))) else 1.0)
print(json.dumps(errs))
"""


@needs_triton
def test_kernel_equals_attention_over_all_padded_rows_in_the_interpreter():
    """bf16 inputs; the reference is float32 attention over all Lk rows (bf16 P·V rounding allowed);
    the row-scaling kernel equals torch's multiply bit for bit (an error of 1 if not)."""
    errs = run_interpreted(INTERP_SCRIPT)
    assert max(errs) < 2e-2, errs


def text_kernel_signature() -> dict:
    """The text kernel's argument types for an sm_90 compile (bf16 in and out)."""
    sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "N": "*i32", "R": "*fp32", "K2": "*bf16", "V2": "*bf16", "O": "*bf16",
           "OS": "*fp32", "lq": "i32", "lk": "i32", "lk2": "i32", "heads": "i32", "scale_log2": "fp32"}
    sig.update({f"s{t}_{a}": "i32" for t in ("q", "k", "v", "k2", "v2", "o") for a in "blh"})
    return sig


@needs_triton
def test_kernel_compiles_for_hopper():
    from wan_core.kernels.text_attention_kernel import CONFIGS, scale_rows, text_attn_fwd

    sig = text_kernel_signature()
    for c in CONFIGS:
        for img, has_r in ((False, False), (True, False), (False, True), (True, True)):
            consts = dict(HEAD_DIM=128, HAS_IMG=img, HAS_R=has_r, **c.kwargs)
            compile_for_hopper(text_attn_fwd, sig, consts, c.num_warps, c.num_stages)
    sig = {"X": "*bf16", "R": "*fp32", "O": "*bf16", "rows": "i32", "cols": "i32"}
    compile_for_hopper(scale_rows, sig, dict(BLOCK_R=8, BLOCK_C=1024), num_warps=4)


def test_op_equals_attention_over_all_padded_rows_at_any_head_dim():
    """The op as the model calls it (on the CPU its reference; a head dim the kernel cannot take)."""
    q, k, v, n = padded_text(d=24)
    torch.testing.assert_close(text_attention(q, k, v, n), full_attention(q, k, v), atol=2e-6, rtol=2e-5)


def test_host_picks_the_kernel_by_prompt_length(monkeypatch):
    """On CUDA the collapsed kernel runs while its keys are at most COLLAPSE_MAX_KEYS; longer
    prompts (or none padded) go to the exact backend over all rows. Decided from the CPU lengths."""
    from wan_core.kernels import text_attention as ta

    calls = []
    monkeypatch.setattr(ta, "_use_triton", lambda q: True)
    monkeypatch.setattr(ta, "_launch", lambda q, k, v, n, ki, vi, **kw: calls.append("kernel") or full_attention(q, k, v))
    monkeypatch.setattr(ta, "_all_rows", lambda q, k, v, ki, vi: calls.append("all rows") or full_attention(q, k, v))
    q = torch.randn(1, 5, 2, 16)
    k = v = torch.randn(2, 512, 2, 16)
    limit = ta.COLLAPSE_MAX_KEYS
    for lengths, want in (((3, limit - 1), "kernel"), ((3, limit), "all rows"), ((512, 0), "all rows")):
        calls.clear()
        text_attention(q.expand(2, -1, -1, -1), k, v, torch.tensor(lengths, dtype=torch.int32))
        assert calls == [want], (lengths, calls)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_kernel_on_gpu_at_wan_sizes():
    """The op on a GPU at Wan's head count and text length, short prompts (the kernel) and long
    ones (the exact backend over all rows), without and with I2V's 257 image keys, against
    float32 attention over all rows."""
    from wan_core.kernels import text_attention as ta

    torch.manual_seed(0)
    for n in (12, ta.COLLAPSE_MAX_KEYS - 1, 300, 511, 512, 0):
        q = torch.randn(1, 3000, 40, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 512, 40, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 512, 40, 128, device="cuda", dtype=torch.bfloat16)
        if n < 512:  # the padding rows: one row repeated (a copy: CUDA refuses overlapping writes)
            k[:, n:] = k[:, n].clone()
            v[:, n:] = v[:, n].clone()
        out = text_attention(q, k, v, torch.tensor([n], dtype=torch.int32))
        ref = full_attention(q.float(), k.float(), v.float())
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
        k_img, v_img = (torch.randn(1, 257, 40, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out = text_attention(q, k, v, torch.tensor([n], dtype=torch.int32), k_img, v_img)
        ref = two_branches(q.float(), k.float(), v.float(), k_img.float(), v_img.float())
        torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=2e-2)


def test_model_collapses_the_padding_only_behind_an_exact_cross_backend(monkeypatch):
    """A whole DiT forward with a batch of two prompts of different lengths: the collapsed text
    attention gives the forward that attends to all text_len padded rows (the official model's)."""
    from wan_core.kernels import attention
    from wan_core.loading.dit import build_model
    from wan_core.models.dit import attend_all_text_rows

    from .test_dit import random_state_dict, tiny_cfg

    cfg = tiny_cfg("i2v")  # the image branch beside the text one
    model = build_model(cfg, random_state_dict(cfg), dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 2, 4, 4, generator=g)
    ctx = [torch.randn(7, cfg.text_dim, generator=g), torch.randn(20, cfg.text_dim, generator=g)]
    kw = dict(clip_fea=torch.randn(2, 257, cfg.image_dim, generator=g), y=torch.randn(2, 20, 2, 4, 4, generator=g))
    model.set_attention("sdpa")
    assert all(blk.cross_attn.text_attn_fn is cross_text_attention for blk in model.blocks)
    with torch.no_grad():
        collapsed = model(x, torch.tensor([500.0, 500.0]), ctx, **kw)
        for blk in model.blocks:
            blk.cross_attn.text_attn_fn = attend_all_text_rows(blk.cross_attn.attn_fn)
        every_row = model(x, torch.tensor([500.0, 500.0]), ctx, **kw)
    torch.testing.assert_close(collapsed, every_row, atol=1e-5, rtol=1e-5)
    assert (collapsed - model(x, torch.tensor([500.0, 500.0]), [ctx[0][:6], ctx[1]], **kw)).abs().max() > 1e-3

    # a named approximate cross-attention backend gets every padded row (what it was asked to run)
    from wan_core.kernels import sage_attention

    seen = []

    def stand_in(q, k, v):
        seen.append(k.shape[1])
        return attention._sdpa(q, k, v)

    monkeypatch.setitem(attention.BACKENDS, "sage_triton", (None, lambda: stand_in))
    monkeypatch.setattr(sage_attention, "available", lambda device: None)
    model.set_attention("sdpa", "sage_triton")
    q, k, v, n = padded_text(lengths=(3, 40))
    model.blocks[0].cross_attn.text_attn_fn(q, k, v, n)
    assert seen == [40]  # all 40 rows went to the named backend
