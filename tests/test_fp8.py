"""FP8 on the CPU: the quantisation math, the dequantising path against the float32 model, every
FP8 file layout against the in-memory quantised model, the converter round trip, which layers are
swapped, and clear errors for bad files and unknown schemes."""

import importlib.util
import json
import sys
import types

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from wan_core.convert import convert_to_fp8, main
from wan_core.layers.fp8 import (
    FP8_DTYPE,
    FP8Linear,
    _cpu_has_scaled_mm,
    fp8_linear_names,
    is_block_linear,
    quantize_model,
    quantize_rows,
    quantize_weight,
    resolve_kernel,
    set_fp8_kernel,
)
from wan_core.layers.fp8_build import build_fp8_model, load_fp8_dit
from wan_core.loading import CheckpointError, read_keys
from wan_core.loading.dit import build_model, save_dit
from wan_core.loading.fp8 import detect_fp8_layout
from wan_core.models.config import PRESETS

from .test_dit import _layout, random_state_dict, tiny_cfg
from .test_dit import dit_inputs as _inputs

BLOCK_LINEARS_T2V = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                     "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]  # fmt: skip
OTHER_LINEARS_T2V = ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                     "time_projection.1", "head.head"]  # fmt: skip




def _run(model, cfg, dtype=torch.float32):
    x, t, ctx, kw = _inputs(cfg)
    with torch.no_grad():
        return model(x.to(dtype), t, ctx.to(dtype), **{k: v.to(dtype) for k, v in kw.items()}).float()


def _cos(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return (a @ b / (a.norm() * b.norm())).item()


def _block_names(cfg):
    per = (
        BLOCK_LINEARS_T2V[:8] + (["cross_attn.k_img", "cross_attn.v_img"] if cfg.is_i2v else []) + BLOCK_LINEARS_T2V[8:]
    )
    return [f"blocks.{i}.{p}" for i in range(cfg.num_layers) for p in per]


@pytest.fixture(scope="module")
def i2v():
    """A tiny I2V model (it has every kind of block linear), its float32 output and its quantised twin."""
    cfg = tiny_cfg("i2v")
    sd = random_state_dict(cfg, seed=7)
    ref = build_model(cfg, sd, dtype=torch.float32)
    q = quantize_model(build_model(cfg, sd, dtype=torch.float32), kernel="dequant")
    return cfg, sd, _run(ref, cfg), q, _run(q, cfg)


# ---- the math -----------------------------------------------------------------------------------
def test_quantize_weight_is_exact_on_representable_rows_and_bounded_otherwise():
    g = torch.Generator().manual_seed(0)
    codes0 = (torch.randn(24, 32, generator=g) * 60).to(FP8_DTYPE)
    codes0[:, 5] = 448.0  # every row's amax maps to the largest code
    s0 = torch.rand(24, 1, generator=g) * 0.01 + 1e-4
    codes, scale = quantize_weight((codes0.float() * s0).to(torch.float32))
    assert codes.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == (24, 1)
    assert torch.equal(codes.view(torch.uint8), codes0.view(torch.uint8))
    torch.testing.assert_close(scale, s0, rtol=1e-6, atol=0)

    w = torch.randn(40, 64, generator=g) * 0.3
    w[3] = 0  # an all-zero row: finite scale, zero codes
    codes, scale = quantize_weight(w)
    assert torch.isfinite(scale).all() and not codes[3].float().any()
    torch.testing.assert_close(scale[:3], w[:3].abs().amax(1, keepdim=True) / 448, rtol=1e-6, atol=0)
    deq = codes.float() * scale
    # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4; subnormals: absolute <= 2^-10 code units
    assert ((w - deq).abs() <= torch.maximum(w.abs() * 2**-4, scale * 2**-10) + 1e-12).all()


def test_quantize_rows_per_token():
    g = torch.Generator().manual_seed(1)
    x = (
        torch.randn(6, 48, generator=g, dtype=torch.bfloat16)
        * torch.tensor([1, 10, 0.01, 100, 1, 0]).to(torch.bfloat16)[:, None]
    )
    codes, scale = quantize_rows(x)
    assert codes.dtype == FP8_DTYPE and scale.shape == (6, 1) and scale.dtype == torch.float32
    amax_codes = codes.float().abs().amax(1)
    assert torch.equal(amax_codes[:5], torch.full((5,), 448.0))  # each token uses the full e4m3 range
    assert not codes[5].float().any() and torch.isfinite(scale).all()
    deq = codes.float() * scale
    assert ((x.float() - deq).abs() <= x.float().abs() * 2**-4 + scale * 2**-9).all()


def test_fp8_linear_dequant_equals_linear_on_dequantised_weight():
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(64, 96)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 64, generator=g))
    m = FP8Linear.from_linear(lin)
    x = torch.randn(2, 5, 64, generator=g)
    y = m(x)
    assert y.shape == (2, 5, 96) and y.dtype == torch.float32
    torch.testing.assert_close(y, nn.functional.linear(x, m.dequantized_weight(), lin.bias), rtol=0, atol=0)


# ---- the model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_only_block_linears_are_fp8(model_type):
    cfg = tiny_cfg(model_type)
    sd = random_state_dict(cfg)
    m = quantize_model(build_model(cfg, sd, dtype=torch.bfloat16), kernel="dequant")
    assert fp8_linear_names(m) == _block_names(cfg)
    others = OTHER_LINEARS_T2V + (["img_emb.proj.1", "img_emb.proj.3"] if cfg.is_i2v else [])
    plain = sorted(n for n, mod in m.named_modules() if type(mod) is nn.Linear)
    assert plain == sorted(others)
    ref = build_model(cfg, sd, dtype=torch.bfloat16).state_dict()
    got = m.state_dict()
    assert set(got) == set(ref) | {f"{n}.weight_scale" for n in _block_names(cfg)}
    for k, v in got.items():  # the high-precision layers are untouched, dtypes included
        if k.rsplit(".", 1)[0] not in _block_names(cfg):
            assert v.dtype == ref[k].dtype and torch.equal(v, ref[k]), k
        elif k.endswith(".weight"):
            assert v.dtype == FP8_DTYPE
        elif k.endswith(".bias"):
            assert v.dtype == torch.bfloat16 and torch.equal(v, ref[k])


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_dequant_path_close_to_float32_model(model_type):
    cfg = tiny_cfg(model_type)
    sd = random_state_dict(cfg, seed=11)
    ref = _run(build_model(cfg, sd, dtype=torch.float32), cfg)
    out = _run(quantize_model(build_model(cfg, sd, dtype=torch.float32), kernel="dequant"), cfg)
    cos = _cos(out, ref)
    assert cos >= 0.995, cos  # measured 0.9994 (t2v) / 0.9987 (i2v); scaled_mm on the CPU: 0.9985 / 0.9977
    # bf16 model with FP8 linears vs the float32 model: the deployment case
    out_bf16 = _run(quantize_model(build_model(cfg, sd, dtype=torch.bfloat16), kernel="dequant"), cfg, torch.bfloat16)
    assert _cos(out_bf16, ref) >= 0.995


@pytest.mark.skipif(not _cpu_has_scaled_mm(), reason="this torch build has no CPU torch._scaled_mm")
def test_scaled_mm_kernel_math_on_cpu():
    """The per-token scaled_mm path computes (codes_x · s_x) @ (codes_w · s_w)^T + b (CPU build of _scaled_mm)."""
    g = torch.Generator().manual_seed(4)
    lin = nn.Linear(64, 96).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 64, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(96, generator=g))
    m = FP8Linear.from_linear(lin)
    m.set_kernel("scaled_mm", "cpu")
    x = torch.randn(3, 7, 64, generator=g).to(torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 7, 96)
    codes, s = quantize_rows(x.reshape(-1, 64))
    emu = (codes.float() * s) @ m.dequantized_weight(torch.float32).t() + lin.bias.float()
    err = ((y.reshape(-1, 96).float() - emu).norm() / emu.norm()).item()
    assert err <= 4e-3, err  # bf16 output rounding
    m.set_kernel("dequant")
    assert _cos(y, m(x)) >= 0.998


@pytest.mark.skipif(not _cpu_has_scaled_mm(), reason="this torch build has no CPU torch._scaled_mm")
def test_scaled_mm_model_close_to_dequant_model_on_cpu(i2v):
    cfg, sd, ref, _, _ = i2v
    m = quantize_model(build_model(cfg, sd, dtype=torch.bfloat16), kernel="dequant")
    deq = _run(m, cfg, torch.bfloat16)
    assert set_fp8_kernel(m, "fp8-vllm", "cpu") == "scaled_mm"
    mm = _run(m, cfg, torch.bfloat16)
    assert _cos(mm, deq) >= 0.995 and _cos(mm, ref) >= 0.995


@pytest.mark.parametrize(
    "preset,layout,n_fp8", [("t2v-14b", "wan2.1_t2v_14b_dit.json", 400), ("i2v-14b", "wan2.1_i2v_14b_dit.json", 480)]
)
def test_full_size_fp8_build_on_meta(preset, layout, n_fp8):
    """A lightx2v-layout file of the real 14B key list builds (on meta) with FP8 exactly in the block linears."""
    shapes = _layout(layout)
    cfg = PRESETS[preset]
    sd, scales = {}, {}
    for k, shape in shapes.items():
        name = k[: -len(".weight")]
        fp8 = k.endswith(".weight") and is_block_linear(name)
        sd[k] = torch.empty(shape, dtype=FP8_DTYPE if fp8 else torch.bfloat16, device="meta")
        if fp8:
            scales[name] = torch.empty(shape[0], 1, device="meta")
    m = build_fp8_model(cfg, sd, scales, device="meta")
    assert len(fp8_linear_names(m)) == n_fp8 == len(scales)
    fp8_bytes = sum(p.numel() for n, p in m.named_parameters() if p.dtype == FP8_DTYPE)
    other = sum(p.numel() * p.element_size() for n, p in m.named_parameters() if p.dtype != FP8_DTYPE)
    # T2V: 14.05 B parameters in e4m3, 0.24 B left in bf16/fp32: 13.1 + 0.8 GiB of weights
    assert fp8_bytes / sum(p.numel() for p in m.parameters()) > 0.98 and other < 1.6 * 2**30


# ---- file layouts -------------------------------------------------------------------------------
def _per_tensor(w, dtype=FP8_DTYPE):
    s = w.abs().amax() / torch.finfo(dtype).max
    return (w / s).to(dtype), s.float()


def _write_layout(tmp_path, layout, cfg, sd, q):
    """Write the tiny model in one FP8 layout; return (path, the float32 weights it stands for)."""
    deq = dict(sd)
    blocks = _block_names(cfg)
    meta = {"wan_config": json.dumps({k: getattr(cfg, k) for k in ("model_type", "num_heads", "text_len", "eps")})}
    out = {}
    if layout == "lightx2v":
        path = save_dit(
            {k: v.contiguous() for k, v in q.state_dict().items()}, str(tmp_path / "lx.safetensors"), "single", cfg
        )
        return path, None
    pre = "model.diffusion_model."
    for k, v in sd.items():
        name = k[: -len(".weight")]
        fp8 = k.endswith(".weight") and (name in blocks or (layout != "comfyui_quant" and name == "text_embedding.0"))
        if not fp8:
            out[pre + k] = v
            continue
        if layout == "comfyui_scaled":
            codes, s = _per_tensor(v)
            out[pre + k], out[f"{pre}{name}.scale_weight"] = codes, s
            if name.endswith("self_attn.q"):
                out[f"{pre}{name}.scale_input"] = torch.tensor(1.0)  # a static input scale: not used
        elif layout == "comfyui_quant":
            codes, s = _per_tensor(v)
            out[pre + k] = codes.view(torch.uint8) if name == "blocks.0.ffn.0" else codes  # older files: uint8 bytes
            out[f"{pre}{name}.weight_scale"] = s
            out[f"{pre}{name}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        elif layout in ("plain_fp8", "plain_e5m2"):
            codes, s = v.to(FP8_DTYPE if layout == "plain_fp8" else torch.float8_e5m2), torch.tensor(1.0)
            out[pre + k] = codes
        if layout == "plain_e5m2" and name in blocks:
            c4, s4 = quantize_weight(codes.float())  # requantised per channel to e4m3 on load
            deq[k] = c4.float() * s4
        else:
            deq[k] = codes.float() * s
    if layout == "comfyui_scaled":
        out[pre + "scaled_fp8"] = torch.empty(0, dtype=FP8_DTYPE)
    path = str(tmp_path / f"{layout}.safetensors")
    save_file(out, path, metadata=meta)
    return path, deq


@pytest.mark.parametrize("layout", ["lightx2v", "comfyui_scaled", "comfyui_quant", "plain_fp8", "plain_e5m2"])
def test_each_layout_loads_and_matches(tmp_path, i2v, layout):
    cfg, sd, _, q, q_out = i2v
    path, deq = _write_layout(tmp_path, layout, cfg, sd, q)
    assert detect_fp8_layout(path) == ("plain_fp8" if layout == "plain_e5m2" else layout)
    m = load_fp8_dit(path, kernel="dequant", dtype=torch.float32, task="i2v")
    assert fp8_linear_names(m) == _block_names(cfg) and m.cfg == cfg
    out = _run(m, cfg)
    if deq is None:  # lightx2v: exactly the in-memory quantised model
        got, exp = m.state_dict(), q.state_dict()
        assert set(got) == set(exp) and all(torch.equal(got[k].float(), exp[k].float()) for k in exp)
        torch.testing.assert_close(out, q_out, rtol=1e-5, atol=1e-5)
        return
    # per-tensor / unscaled files: the same outputs as a float32 model holding the dequantised weights
    torch.testing.assert_close(out, _run(build_model(cfg, deq, dtype=torch.float32), cfg), rtol=1e-5, atol=1e-5)
    for n in _block_names(cfg):  # per-tensor scales are broadcast to [out, 1]
        assert m.get_submodule(n).weight_scale.shape == (m.get_submodule(n).out_features, 1)
    te = m.get_submodule("text_embedding.0")  # a sensitive layer stored in fp8 comes back dequantised
    assert type(te) is nn.Linear and te.weight.dtype == torch.float32
    assert torch.equal(te.weight, deq["text_embedding.0.weight"])


def test_comfyui_quant_header_metadata(tmp_path, i2v):
    """The per-layer config may sit in the safetensors header (`_quantization_metadata`) instead."""
    cfg, sd, _, _, _ = i2v
    out, deq, layers = {}, dict(sd), {}
    for k, v in sd.items():
        name = k[: -len(".weight")]
        if k.endswith(".weight") and name in _block_names(cfg):
            out[k], out[f"{name}.weight_scale"] = _per_tensor(v)
            deq[k] = out[k].float() * out[f"{name}.weight_scale"]
            layers[name] = {"format": "float8_e4m3fn"}
        else:
            out[k] = v
    path = str(tmp_path / "cq.safetensors")
    save_file(out, path, metadata={"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers}),
                                   "wan_config": json.dumps({"num_heads": cfg.num_heads})})  # fmt: skip
    assert detect_fp8_layout(path) == "comfyui_quant"
    m = load_fp8_dit(path, kernel="dequant", dtype=torch.float32)
    torch.testing.assert_close(
        _run(m, cfg), _run(build_model(cfg, deq, dtype=torch.float32), cfg), rtol=1e-5, atol=1e-5
    )


def test_detect_plain_checkpoint_and_quantize_on_load(tmp_path, i2v):
    cfg, sd, _, q, q_out = i2v
    path = save_dit(sd, str(tmp_path / "bf"), layout="comfyui", cfg=cfg)
    assert detect_fp8_layout(path) == "none"
    with pytest.raises(CheckpointError, match="no fp8 weights"):
        load_fp8_dit(path, kernel="dequant", dtype=torch.float32)
    m = load_fp8_dit(path, kernel="dequant", dtype=torch.float32, quantize=True)
    got, exp = m.state_dict(), q.state_dict()
    assert set(got) == set(exp) and all(torch.equal(got[k].float(), exp[k].float()) for k in exp)
    torch.testing.assert_close(_run(m, cfg), q_out, rtol=1e-5, atol=1e-5)


# ---- converter ----------------------------------------------------------------------------------
def test_converter_round_trip(tmp_path, i2v):
    cfg, sd, _, q, q_out = i2v
    src = save_dit(sd, str(tmp_path / "wan"), layout="wan", cfg=cfg, shards=2)
    dst = convert_to_fp8(src, str(tmp_path / "fp8.safetensors"), dtype=torch.float32)
    keys = read_keys(dst)
    assert set(keys) == set(sd) | {f"{n}.weight_scale" for n in _block_names(cfg)}
    for n in _block_names(cfg):
        assert keys[f"{n}.weight"][1] == "F8_E4M3" and keys[f"{n}.weight_scale"] == (
            [keys[f"{n}.weight"][0][0], 1],
            "F32",
        )
    assert all(keys[k][1] == "F32" for k in sd if k.rsplit(".", 1)[0] not in _block_names(cfg) or k.endswith(".bias"))
    assert detect_fp8_layout(dst) == "lightx2v"
    m = load_fp8_dit(dst, kernel="dequant", dtype=torch.float32)
    got, exp = m.state_dict(), q.state_dict()
    assert set(got) == set(exp) and all(torch.equal(got[k].float(), exp[k].float()) for k in exp)
    torch.testing.assert_close(_run(m, cfg), q_out, rtol=1e-5, atol=1e-5)

    # the CLI entry, ComfyUI-prefixed output: same tensors
    assert main([src, str(tmp_path / "c.safetensors"), "--dtype", "fp32", "--layout", "comfyui"]) == 0
    assert all(k.startswith("model.diffusion_model.") for k in read_keys(str(tmp_path / "c.safetensors")))
    m2 = load_fp8_dit(str(tmp_path / "c.safetensors"), kernel="dequant", dtype=torch.float32)
    assert all(torch.equal(v.float(), exp[k].float()) for k, v in m2.state_dict().items())


def test_converter_merges_loras_before_quantising(tmp_path, monkeypatch, i2v):
    cfg, sd, _, _, _ = i2v
    src = save_dit(sd, str(tmp_path / "one"), layout="single", cfg=cfg)
    calls = []

    def apply_loras(model, loras, mode, keep_originals=True):
        calls.append((loras, mode, keep_originals, type(model.get_submodule("blocks.0.ffn.0")).__name__))
        with torch.no_grad():
            model.get_submodule("blocks.0.ffn.0").weight.mul_(2.0)

    monkeypatch.setitem(sys.modules, "wan_core.layers.lora", types.SimpleNamespace(apply_loras=apply_loras))
    seen = []
    dst = convert_to_fp8(src, str(tmp_path / "l.safetensors"), loras=[("a.safetensors", 0.7)], dtype=torch.float32,
                         before_quantize=lambda m: seen.append(type(m.get_submodule("blocks.0.ffn.0")).__name__))  # fmt: skip
    assert calls == [([("a.safetensors", 0.7)], "merge", False, "Linear")] and seen == ["Linear"]
    m = load_fp8_dit(dst, kernel="dequant", dtype=torch.float32)
    codes, s = quantize_weight(sd["blocks.0.ffn.0.weight"] * 2.0)
    assert torch.equal(m.get_submodule("blocks.0.ffn.0").weight.view(torch.uint8), codes.view(torch.uint8))

    monkeypatch.setitem(sys.modules, "wan_core.layers.lora", None)  # not installed -> clear error
    with pytest.raises(RuntimeError, match="needs wan_core.layers.lora"):
        convert_to_fp8(src, str(tmp_path / "x.safetensors"), loras=[("a.safetensors", 1.0)])


def test_converter_with_a_real_lora_file(tmp_path, i2v):
    """End to end with wan_core.layers.lora: the FP8 file holds quantize(W + strength * alpha / r * up @ down)."""
    if not hasattr(pytest.importorskip("wan_core.layers.lora"), "apply_loras"):
        pytest.skip("wan_core.layers.lora has no apply_loras")
    cfg, sd, _, _, _ = i2v
    src = save_dit(sd, str(tmp_path / "one"), layout="single", cfg=cfg)
    g = torch.Generator().manual_seed(9)
    r = 4
    down, up = torch.randn(r, cfg.dim, generator=g) * 0.1, torch.randn(cfg.ffn_dim, r, generator=g) * 0.1
    lora = str(tmp_path / "lora.safetensors")
    save_file({"diffusion_model.blocks.1.ffn.0.lora_down.weight": down, "diffusion_model.blocks.1.ffn.0.lora_up.weight": up,
               "diffusion_model.blocks.1.ffn.0.alpha": torch.tensor(2.0)}, lora)  # fmt: skip
    dst = convert_to_fp8(src, str(tmp_path / "m.safetensors"), loras=[(lora, 0.5)], dtype=torch.float32)
    m = load_fp8_dit(dst, kernel="dequant", dtype=torch.float32)
    codes, s = quantize_weight(sd["blocks.1.ffn.0.weight"] + 0.5 * (2.0 / r) * (up @ down))
    got = m.get_submodule("blocks.1.ffn.0")
    assert torch.equal(got.weight.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(got.weight_scale, s)
    codes0, _ = quantize_weight(sd["blocks.0.ffn.0.weight"])  # untouched layers: as without the LoRA
    assert torch.equal(m.get_submodule("blocks.0.ffn.0").weight.view(torch.uint8), codes0.view(torch.uint8))


# ---- bad inputs ---------------------------------------------------------------------------------
def _lx_state(q):
    return {k: v.contiguous() for k, v in q.state_dict().items()}


def test_missing_or_bad_scales_are_clear_errors(tmp_path, i2v):
    cfg, sd, _, q, _ = i2v
    st = _lx_state(q)
    del st["blocks.1.ffn.2.weight_scale"]
    p = save_dit(st, str(tmp_path / "a.safetensors"), "single", cfg)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.2\.weight_scale is missing"):
        load_fp8_dit(p, kernel="dequant")

    st = _lx_state(q)
    st["blocks.0.self_attn.q.weight_scale"] = torch.ones(4, 4)  # block-wise scales
    p = save_dit(st, str(tmp_path / "b.safetensors"), "single", cfg)
    with pytest.raises(CheckpointError, match="block-wise"):
        load_fp8_dit(p, kernel="dequant")

    st = _lx_state(q)
    st["blocks.0.self_attn.q.weight_scale"] = torch.ones(7, 1)  # wrong length
    p = save_dit(st, str(tmp_path / "b2.safetensors"), "single", cfg)
    with pytest.raises(CheckpointError, match="neither per-tensor nor per-output-channel"):
        load_fp8_dit(p, kernel="dequant")

    st = _lx_state(q)
    st["text_embedding.0.weight_scale"] = torch.ones(cfg.dim, 1)  # a scale for a bf16 weight
    p = save_dit(st, str(tmp_path / "c.safetensors"), "single", cfg)
    with pytest.raises(CheckpointError, match="not fp8"):
        load_fp8_dit(p, kernel="dequant")

    st = _lx_state(q)
    st["blocks.0.ffn.0.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    p = save_dit(st, str(tmp_path / "d.safetensors"), "single", cfg)
    with pytest.raises(CheckpointError, match="'nvfp4'"):
        load_fp8_dit(p, kernel="dequant")

    st = _lx_state(q)
    del st["blocks.0.ffn.0.weight_scale"]
    st["blocks.0.ffn.0.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    p = save_dit(st, str(tmp_path / "e.safetensors"), "single", cfg)
    with pytest.raises(CheckpointError, match="comfy_quant.*no blocks.0.ffn.0.weight_scale"):
        load_fp8_dit(p, kernel="dequant")


def test_unknown_and_unsupported_schemes():
    assert resolve_kernel("fp8-torchao", "meta") == "scaled_mm_fast"
    assert [resolve_kernel(s, "meta") for s in ("fp8-vllm", "fp8-q8f", "fp8-triton", "fp8-pertensor")] == [
        "scaled_mm"
    ] * 4
    assert resolve_kernel("auto", "cpu") == "dequant" and resolve_kernel("fp8", "cpu") == "dequant"
    assert resolve_kernel("DEQUANT") == "dequant"
    for bad in ("int8-q8f", "nvfp4", "fp16", "gguf-Q8_0"):
        with pytest.raises(ValueError, match="unknown FP8 kernel/scheme.*supported: scaled_mm"):
            resolve_kernel(bad)
    with pytest.raises(ValueError, match="block-wise"):
        resolve_kernel("fp8-b128-deepgemm")
    if importlib.util.find_spec("sgl_kernel") is None:
        with pytest.raises(ImportError, match="sgl-kernel"):
            resolve_kernel("fp8-sgl", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="FP8 tensor cores"):
            resolve_kernel("scaled_mm", "cuda")


def test_scaled_mm_shape_and_dtype_checks():
    odd = FP8Linear(20, 32, compute_dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match="multiples of 16.*20 -> 32"):
        odd.set_kernel("scaled_mm", "meta")
    f32 = FP8Linear(32, 32, compute_dtype=torch.float32, device="meta")
    with pytest.raises(ValueError, match="bfloat16"):
        f32.set_kernel("scaled_mm", "meta")
    f32.set_kernel("dequant")  # any shape and dtype
    with pytest.raises(ValueError, match="no FP8 linears"):
        set_fp8_kernel(nn.Sequential(nn.Linear(4, 4)), "dequant")
