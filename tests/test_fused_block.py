"""The block's one forward with the "fused" block ops (single-pass norm/modulate/quantise ops)
against the same forward with the "torch" ops; the Triton kernels of those ops against their torch
reference in Triton's interpreter (a CPU subprocess), alone and inside a whole block. The GPU run
is test_fused_gpu.py."""

import os

import pytest
import torch

from wan_core.kernels import text_projected
from wan_core.kernels.block_ops import BLOCK_OPS, get_block_ops, resolve_block_ops
from wan_core.kernels.fp8_rows import HAS_TRITON
from wan_core.kernels.fused_ops import QuantRows
from wan_core.kernels.rope import rope_tables
from wan_core.layers.compile import compile_blocks
from wan_core.layers.fp8 import FP8Linear, _cpu_has_scaled_mm, quantize_model
from wan_core.loading.dit import build_model
from wan_core.models.dit import Block, SelfAttention, TextContext

from .test_dit import random_state_dict, tiny_cfg
from .triton_tools import ROOT, compile_for_hopper, needs_triton, run_interpreted


@pytest.fixture(autouse=True)
def _cross_attention_not_projected(monkeypatch):
    """These tests hold the fused passes to torch's numbers bit for bit; a short prompt's
    cross-attention through its output projection (`text_projected`) sums in another order and is
    tested on its own (tests/test_text_projected.py)."""
    monkeypatch.setattr(text_projected, "PROJECTED_MAX_KEYS", 0)


needs_cpu_fp8 = pytest.mark.skipif(not _cpu_has_scaled_mm(), reason="this torch build has no CPU torch._scaled_mm")


def _inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 3, 8, 8, generator=g).bfloat16()  # B = 2: per-item modulation rows
    kw = {}
    if cfg.is_i2v:
        kw = dict(clip_fea=torch.randn(2, 257, cfg.image_dim, generator=g).bfloat16(),
                  y=torch.randn(2, 20, 3, 8, 8, generator=g).bfloat16())
    return x, torch.tensor([500.0, 20.0]), torch.randn(2, 7, cfg.text_dim, generator=g).bfloat16(), kw


def _inputs_seen(model):
    """Record the type of every FP8 linear's input (QuantRows or tensor), by module name."""
    seen = {}

    def hook(mod, args, name):
        seen.setdefault(name, type(args[0]).__name__)  # returns None: the input is kept

    for name, m in model.named_modules():
        if isinstance(m, FP8Linear):
            m.register_forward_pre_hook(lambda mod, args, name=name: hook(mod, args, name))
    return seen


def _tiny_fp8_model():
    """A tiny bf16 T2V DiT with FP8 block linears on the CPU's rowwise _scaled_mm, and its config."""
    cfg = tiny_cfg(dim=128, ffn_dim=256, num_heads=2)
    model = build_model(cfg, random_state_dict(cfg), dtype=torch.bfloat16, device="cpu")
    return quantize_model(model, kernel="scaled_mm"), cfg


def _ops_names(model) -> set[str]:
    return {m.ops.name for m in model.modules() if isinstance(m, (Block, SelfAttention))}


def _run_both(model, inputs):
    """The model's output with the default ("torch") block ops, then with the "fused" ones."""
    x, t, ctx, kw = inputs
    with torch.no_grad():
        assert _ops_names(model) == {"torch"}
        ref = model(x, t, ctx, **kw)
        model.set_block_ops("fused")
        assert _ops_names(model) == {"fused"}
        out = model(x, t, ctx, **kw)
    return ref, out


@pytest.mark.parametrize("variant", ["t2v", "i2v", "no_cross_norm"])
def test_fused_block_equals_block_bf16(variant):
    """bf16 linears: the fused ops (add+LayerNorm+modulate, linear with GELU epilogue) compute the
    plain ops' float32 math, so the whole DiT output is identical."""
    cfg = tiny_cfg("i2v" if variant == "i2v" else "t2v", dim=128, ffn_dim=256, num_heads=2,
                   cross_attn_norm=variant != "no_cross_norm")
    model = build_model(cfg, random_state_dict(cfg), dtype=torch.bfloat16, device="cpu")
    ref, out = _run_both(model, _inputs(cfg))
    assert torch.equal(out, ref)


@needs_cpu_fp8
def test_fused_block_fp8_feeds_quantised_rows_and_equals_block():
    """FP8 linears with an FP8 GEMM get QuantRows from the op before them (one quantisation for
    q, k and v); the output is identical to the plain ops', where each linear quantises its input."""
    model, cfg = _tiny_fp8_model()
    x, t, ctx, kw = _inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, ctx)
    model.set_block_ops("fused")
    seen = _inputs_seen(model)  # a pre-hook makes takes_codes False: look at the types without it
    for m in model.modules():
        if isinstance(m, FP8Linear):
            m._forward_pre_hooks.clear()
    calls = []
    orig = FP8Linear.forward

    def spy(self, inp):
        calls.append((self.out_features, type(inp).__name__))
        return orig(self, inp)

    FP8Linear.forward = spy
    try:
        with torch.no_grad():
            out = model(x, t, ctx)
    finally:
        FP8Linear.forward = orig
    assert not seen  # the hooks were removed before the run
    assert torch.equal(out, ref)
    kinds = [k for _, k in calls]
    # per block: q, k, v, cross q, ffn.0, ffn.2 quantised by the fused ops; o (SDPA here: no codes)
    # and cross k/v take tensors; cross o's GEMM runs inside the text attention op, which the layer
    # hands its operands (`projection_operands`), on the attention's codes (off CUDA: quantised per
    # token, what the linear itself would do)
    assert kinds.count("QuantRows") == 6 * cfg.num_layers, calls
    assert kinds.count("Tensor") == 3 * cfg.num_layers, calls
    assert [k for n, k in calls[:9]] == ["QuantRows"] * 3 + ["Tensor"] + ["QuantRows", "Tensor", "Tensor"] + ["QuantRows"] * 2


@needs_cpu_fp8
def test_linear_with_hooks_gets_bf16_input():
    """A hooked linear (a LoRA branch, offload's weight streaming) must see the bf16 activations:
    the fused ops feed it a tensor, and the result is still identical to the plain ops'."""
    model, cfg = _tiny_fp8_model()
    seen = _inputs_seen(model)  # every FP8 linear now has a pre-hook
    ref, out = _run_both(model, _inputs(cfg))
    assert torch.equal(out, ref)
    assert set(seen.values()) == {"Tensor"}


def test_quantised_rows_into_a_bf16_only_kernel_is_a_clear_error():
    lin = FP8Linear.from_linear(torch.nn.Linear(32, 16).bfloat16())
    lin.set_kernel("dequant")
    assert not lin.takes_codes
    rows = QuantRows(torch.zeros(1, 2, 32, dtype=torch.float8_e4m3fn), torch.ones(2, 1))
    with pytest.raises(TypeError, match="kernel 'dequant' takes no pre-quantised input"):
        lin(rows)


@needs_cpu_fp8
@pytest.mark.parametrize("residual", [torch.float32, torch.bfloat16])
def test_fused_block_traces_whole_under_dynamo(residual):
    """QuantRows passes through the attention modules inside one compiled graph (fullgraph), with
    either residual stream (the fake ops' outputs have the real ones' dtypes: row scales float32)."""
    model, cfg = _tiny_fp8_model()
    model.set_residual_dtype(residual)
    x, t, ctx, _ = _inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, ctx)
        model.set_block_ops("fused")
        for blk in model.blocks:
            blk.compile(backend="aot_eager", fullgraph=True)
        out = model(x, t, ctx)
    torch._dynamo.reset()
    assert torch.equal(out, ref)


def test_fused_ops_trace_as_one_graph_for_every_block():
    """bf16 linears (nn.Linear: no `takes_codes`): the fused ops inside one fullgraph capture, one
    graph shared by every block (the ops chosen are the same object), no recompile, same output."""
    from torch._dynamo.utils import counters

    cfg = tiny_cfg(dim=128, ffn_dim=256, num_heads=2, num_layers=3)
    model = build_model(cfg, random_state_dict(cfg), dtype=torch.bfloat16, device="cpu")
    x, t, ctx, _ = _inputs(cfg)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        ref = model(x, t, ctx)
        model.set_block_ops("fused")
        for blk in model.blocks:
            blk.compile(backend="aot_eager", fullgraph=True, dynamic=False)
        out = model(x, t, ctx)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert torch.equal(out, ref)
    assert graphs == 1


def test_block_ops_are_chosen_once_and_compile_swaps_nothing():
    """compile_blocks compiles the blocks as they are (no class swap, the ops chosen stay); the ops
    are chosen by set_block_ops for every block and its self-attention, and chosen back."""
    cfg = tiny_cfg()
    model = build_model(cfg, random_state_dict(cfg), dtype=torch.float32, device="cpu")
    keys = list(model.state_dict())
    compile_blocks(model)
    assert all(type(b) is Block for b in model.blocks)
    assert _ops_names(model) == {"torch"}
    model.set_block_ops("fused")
    assert all(type(b) is Block and type(b.self_attn) is SelfAttention for b in model.blocks)
    assert all(b.ops is BLOCK_OPS["fused"] and b.self_attn.ops is BLOCK_OPS["fused"] for b in model.blocks)
    assert list(model.state_dict()) == keys
    model.set_block_ops("auto", device="cpu")  # the CPU's choice: the plain torch expressions
    assert _ops_names(model) == {"torch"}
    torch._dynamo.reset()
    assert resolve_block_ops("auto", "cuda") == ("fused" if HAS_TRITON else "torch")
    assert resolve_block_ops("auto", "cpu") == "torch" and get_block_ops("fused").name == "fused"
    with pytest.raises(ValueError, match="unknown block ops 'triton'"):
        model.set_block_ops("triton")


@pytest.mark.parametrize("fp8", [False, True])
def test_loaders_choose_the_block_ops_of_the_device(tmp_path, fp8):
    """load_dit / load_fp8_dit choose the block ops next to the attention backend: on the CPU the
    plain torch expressions (CI runs the forward the tests above compare the fused ops with)."""
    from wan_core.layers.fp8_build import load_fp8_dit
    from wan_core.loading.dit import load_dit, save_dit

    cfg = tiny_cfg()
    path = save_dit(random_state_dict(cfg), str(tmp_path / "dit"), cfg=cfg)
    if fp8:
        model = load_fp8_dit(path, dtype=torch.bfloat16, kernel="dequant", quantize=True)
    else:
        model = load_dit(path, dtype=torch.float32)
    assert _ops_names(model) == {"torch"}


def test_no_module_swaps_its_class():
    """One forward per module: nothing in the engine assigns a module's `__class__`."""
    hits = []
    for folder, _, files in os.walk(os.path.join(ROOT, "wan_core")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    hits += [f"{name}:{i}" for i, line in enumerate(f, 1) if "__class__ =" in line]
    assert not hits


def _one_block(cfg, fp8_kernel=None, seed=0):
    """Block 0 of a tiny bf16 DiT (FP8 linears with `fp8_kernel` if given), and its inputs: the
    float32 residual stream x [B, L, C], e0 [B, 6, C], bf16 text context, I2V image tokens, rope."""
    model = build_model(cfg, random_state_dict(cfg, seed), dtype=torch.bfloat16, device="cpu")
    if fp8_kernel is not None:
        quantize_model(model, kernel=fp8_kernel)
    g = torch.Generator().manual_seed(seed + 1)
    grid = (2, 3, 4)
    b, l, c = 2, 24, cfg.dim
    x = torch.randn(b, l, c, generator=g) * 2  # float32, as between blocks
    e0 = torch.randn(b, 6, c, generator=g) * 0.3
    ctx = TextContext(torch.randn(b, 9, c, generator=g).bfloat16(), torch.tensor([9, 9], dtype=torch.int32))
    img = torch.randn(b, 5, c, generator=g).bfloat16() if cfg.is_i2v else None
    return model.blocks[0], (x, e0, ctx, img, rope_tables(grid, c // cfg.num_heads))


def _block_with(block, ops, args):
    block.ops = block.self_attn.ops = block.cross_attn.ops = get_block_ops(ops)
    with torch.no_grad():
        return block(*args)


BLOCK_CASES = ["t2v", "i2v", "no_cross_norm", "no_qk_norm", "fp8_scaled_mm", "fp8_dequant", "fp8_dequant_res16"]


def _block_case(case):
    """A case's block and inputs; "_res16": the residual stream in bf16 (`set_residual_dtype`)."""
    base, res16 = case.removesuffix("_res16"), case.endswith("_res16")
    cfg = tiny_cfg("i2v" if base == "i2v" else "t2v", dim=128, ffn_dim=256, num_heads=2,
                   cross_attn_norm=base != "no_cross_norm", qk_norm=base != "no_qk_norm")
    block, args = _one_block(cfg, base[4:] if base.startswith("fp8") else None)
    return block, ((args[0].bfloat16(), *args[1:]) if res16 else args)


# fused ops each case's block runs once per forward: (add_norm_mod, rms_norm_rope, linear_gelu, gelu_quant)
FUSED_CALLS = {"t2v": (3, 2, 1, 0), "i2v": (3, 2, 1, 0), "no_cross_norm": (2, 2, 1, 0), "no_qk_norm": (3, 0, 1, 0),
               "fp8_scaled_mm": (3, 2, 0, 1), "fp8_dequant": (3, 2, 0, 0), "fp8_dequant_res16": (3, 2, 0, 0)}


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_one_block_same_numbers_through_fused_ops_and_torch_ops(case, monkeypatch):
    """The same block, the same forward, once with the "torch" block ops and once with the "fused"
    ones (on the CPU: the custom ops' torch references): bitwise equal. Tolerance zero because the
    references round where the plain expressions round (float32 norm and modulation, one rounding
    to bf16, the e4m3 quantisation of that bf16 row, the GELU of the bf16 linear output): only the
    number of passes differs, not the arithmetic. The fused ops must really run (counted)."""
    from wan_core.kernels import block_ops

    if case == "fp8_scaled_mm" and not _cpu_has_scaled_mm():
        pytest.skip("this torch build has no CPU torch._scaled_mm")
    block, args = _block_case(case)
    ref = _block_with(block, "torch", args)
    calls = dict.fromkeys(("add_norm_mod", "rms_norm_rope", "linear_gelu", "gelu_quant"), 0)
    for name in calls:
        def counted(*a, _name=name, _fn=getattr(block_ops, name), **kw):
            calls[_name] += 1
            return _fn(*a, **kw)

        monkeypatch.setattr(block_ops, name, counted)
    out = _block_with(block, "fused", args)
    assert tuple(calls.values()) == FUSED_CALLS[case], calls
    assert ref.dtype == args[0].dtype and ref.shape == args[0].shape  # the residual keeps its dtype
    assert not torch.equal(ref, args[0])  # the block changed the residual stream
    assert torch.equal(out, ref)


BLOCK_INTERP_SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
import triton_interp  # noqa: F401  (before any kernel is defined)
import torch
from wan_core.kernels import fused_ops, text_projected
from wan_core.layers.fp8 import _cpu_has_scaled_mm
from tests.test_fused_block import BLOCK_CASES, _block_case, _block_with
fused_ops._use_triton = lambda t: True  # the Triton kernels (interpreted) instead of the references
text_projected.PROJECTED_MAX_KEYS = 0  # the plain cross-attention, as in the tests above
res = {{}}
for case in BLOCK_CASES:
    if case == "fp8_scaled_mm" and not _cpu_has_scaled_mm():
        continue
    block, args = _block_case(case)
    ref, out = _block_with(block, "torch", args), _block_with(block, "fused", args)
    out, ref, x = out.float(), ref.float(), args[0].float()
    res[case] = dict(rel=((out - ref).norm() / (ref - x).norm()).item(), equal=torch.equal(out, ref))
print(json.dumps(res))
"""


@needs_triton
def test_one_block_through_the_triton_kernels_in_the_interpreter():
    """The same comparison with the Triton kernels themselves (Triton's interpreter on the CPU)
    inside the block. Their reductions run in another order than torch's, so a few bf16 or e4m3
    ties round the other way (one step: 2^-8 relative for bf16) and move what follows a little:
    the block's update (out - x) must agree to 1e-3 relative (seen: 0 to 4.5e-4), where a wrong
    kernel (a missing gate, shift or rotation) is off by order one."""
    res = run_interpreted(BLOCK_INTERP_SCRIPT)
    assert {"t2v", "i2v", "no_cross_norm", "no_qk_norm", "fp8_dequant", "fp8_dequant_res16"} <= set(res)
    for case, r in res.items():
        assert r["rel"] < 1e-3, (case, r)
INTERP_SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
import triton_interp  # noqa: F401  (before any kernel is defined)
import torch
from wan_core.kernels import fused_ops as fo
res = {{}}
g = torch.Generator().manual_seed(0)
b, l, c = 2, 5, 96  # C not a power of two: the masked tail of the row
x = torch.randn(b, l, c, generator=g) * 3 + 1
d = torch.randn(b, l, c, generator=g).bfloat16()
gate = torch.randn(b, c, generator=g)
w, bias = 1 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)
sc, sh = 0.2 * torch.randn(b, c, generator=g), 0.2 * torch.randn(b, c, generator=g)
for flags in ("00010", "00011", "11100", "11101", "10010", "10011"):
    has_res, has_gate, aff, mod, quant = (f == "1" for f in flags)
    args = (x, d if has_res else None, gate if has_gate else None, w if aff else None, bias if aff else None,
            sc if mod else None, sh if mod else None, 1e-6, quant, torch.bfloat16)
    got, ref = fo._launch_add_norm_mod(*args), fo.reference_add_norm_mod(*args)
    res[flags] = dict(x=(got[0] - ref[0]).abs().max().item() if has_res else 0.0,
                      h=(got[1].float() != ref[1].float()).float().mean().item(), dtype=str(got[1].dtype),
                      rs=((got[2] - ref[2]).abs() / ref[2]).max().item() if quant else 0.0)
u = (torch.randn(3, 4, 300, generator=g) * 2).bfloat16()
got, ref = fo._launch_gelu_quant(u), fo.reference_gelu_quant(u)
res["gelu"] = dict(x=0.0, h=(got[0].float() != ref[0].float()).float().mean().item(), dtype=str(got[0].dtype),
                   rs=((got[1] - ref[1]).abs() / ref[1]).max().item())
from wan_core.models.dit import rope_tables
q = (torch.randn(2, 12, 48, generator=g) * 2).bfloat16()  # 3 heads of 16, a (2, 2, 3) grid
cos, sin = rope_tables((2, 2, 3), 16)
w = 1 + 0.1 * torch.randn(48, generator=g)
got, ref = fo._launch_rms_norm_rope(q, w, cos, sin, 1e-6, 3), fo.reference_rms_norm_rope(q, w, cos, sin, 1e-6, 3)
res["rope"] = dict(x=0.0, h=(got.float() != ref.float()).float().mean().item(), dtype=str(got.dtype), rs=0.0)
from wan_core.kernels import fp8_rows as linear
a = (torch.randn(10, 300, generator=g) * 3).bfloat16()
got, ref = linear.launch_quant_rows(a), linear.quantize_rows(a)
res["quant"] = dict(x=0.0, h=(got[0].float() != ref[0].float()).float().mean().item(), dtype=str(got[0].dtype),
                    rs=((got[1] - ref[1]).abs() / ref[1]).max().item())
print(json.dumps(res))
"""


@needs_triton
def test_triton_kernels_equal_reference_in_the_interpreter():
    """The Triton kernels themselves, run by Triton's interpreter on the CPU, for every flag
    combination the block uses, q/k's RMSNorm + RoPE, and an FP8 linear's row quantisation: the residual exactly, the bf16 or e4m3
    rows element for element (the GELU's tanh is written with exp, so a rare bf16 tie may round
    the other way)."""
    res = run_interpreted(INTERP_SCRIPT)
    assert len(res) == 9
    for key, r in res.items():
        assert r["x"] == 0.0 and r["rs"] < 1e-6, (key, r)
        assert r["h"] <= (1e-3 if key == "gelu" else 0.0), (key, r)
        quant = key in ("gelu", "quant") or key[-1] == "1"
        assert r["dtype"] == ("torch.float8_e4m3fn" if quant else "torch.bfloat16"), key


@needs_triton
def test_triton_kernels_compile_for_hopper():
    """The interpreter runs Python, not Triton's compiler: compile every kernel variant the block
    launches down to an sm_90 cubin on this CPU machine, so that what only the compiler rejects
    (non-constexpr globals, unsupported ops, layouts) fails here and not on the GPU."""
    from wan_core.kernels import fused_kernels as fk

    build = compile_for_hopper

    ptrs = "x_ptr d_ptr g_ptr w_ptr b_ptr sc_ptr sh_ptr xo_ptr h_ptr rs_ptr".split()
    for flags in ("00010", "00011", "11100", "11101", "10010", "10011"):
        names = ("HAS_RES", "HAS_GATE", "AFFINE", "MODULATE", "QUANT")
        consts = dict(zip(names, (f == "1" for f in flags)), BLOCK_C=8192)
        sig = {p: "*fp32" for p in ptrs}
        sig.update(d_ptr="*bf16", h_ptr="*fp8e4nv" if consts["QUANT"] else "*bf16", L="i32", C="i32", eps="fp32",
                   mod_stride="i32")
        assert "cubin" in build(fk.add_norm_mod, sig, consts, 8).asm
    sig = {"x_ptr": "*bf16", "w_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "o_ptr": "*bf16", "L": "i32",
           "C": "i32", "eps": "fp32"}
    assert "cubin" in build(fk.rms_norm_rope, sig, {"HALF_D": 64, "BLOCK_P": 4096}, 8).asm
    sig = {"x_ptr": "*bf16", "codes_ptr": "*fp8e4nv", "rs_ptr": "*fp32", "K": "i32"}
    assert "cubin" in build(fk.quant_rows, sig, {"GELU": False, "BLOCK_K": 8192}, 8).asm
    assert "cubin" in build(fk.quant_rows, sig, {"GELU": True, "BLOCK_K": 16384}, 16).asm  # the FFN's 13,824


def test_fake_ops_match_real_ops():
    """torch.library.opcheck: schema, and the fake (meta) implementations that torch.compile
    plans with give the real outputs' shapes, dtypes and strides, for non-contiguous inputs too
    (the residual stream enters the first block transposed)."""
    from torch.library import opcheck

    from wan_core.models.dit import rope_tables

    g = torch.Generator().manual_seed(0)
    b, l, c = 2, 6, 64
    x = torch.randn(b, c, l, generator=g).transpose(1, 2)  # [B, L, C], not contiguous
    d = torch.randn(b, l, c, generator=g).bfloat16()
    v = torch.randn(b, c, generator=g)
    w = torch.randn(c, generator=g)
    for args in [(x, None, None, None, None, v, v, 1e-6, False, torch.bfloat16),
                 (x, d, v, w, w, None, None, 1e-6, True, torch.bfloat16),
                 (x, d, None, None, None, v, v, 1e-6, True, torch.bfloat16)]:
        opcheck(torch.ops.wan_core.add_norm_mod.default, args)
    u = torch.randn(b, 40, l, generator=g).bfloat16().transpose(1, 2)
    opcheck(torch.ops.wan_core.gelu_quant.default, (u,))
    cos, sin = rope_tables((1, 2, 3), 16)
    q = torch.randn(b, c, l, generator=g).bfloat16().transpose(1, 2)
    opcheck(torch.ops.wan_core.rms_norm_rope.default, (q, w, cos, sin, 1e-6, 4))
    lin = torch.nn.Linear(c, 32).bfloat16()
    opcheck(torch.ops.wan_core.linear_gelu.default, (q, lin.weight.detach(), lin.bias.detach()))
    opcheck(torch.ops.wan_core.quantize_rows.default, (d.reshape(-1, c)[::2],))  # every other row: strided
