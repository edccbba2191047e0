"""LoRA: every file layout parses to the same targets and merges to W + s * alpha/r * up @ down
(+ diff, diff_b, diff_m); the low-rank branch gives the merged model's output, also beside an
FP8-style linear; strengths change exactly without the base; mismatched LoRAs fail clearly."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wan_core.layers.lora import LoraMismatchError, apply_loras, lora_report, remove_loras, set_lora_strengths
from wan_core.loading import CheckpointError
from wan_core.loading.dit import build_model
from wan_core.loading.lora import (
    LORA_LAYOUTS,
    LoraTarget,
    LoraWeights,
    kohya_to_dotted,
    lora_state_dict,
    parse_lora,
    random_lora,
    save_lora,
)

from .test_dit import dit_inputs as _inputs
from .test_dit import random_state_dict, tiny_cfg


def _forward(model, cfg):
    x, t, ctx, kw = _inputs(cfg)
    with torch.no_grad():
        return model(x, t, ctx, **kw)


def _expected(sd, loras):
    """Official state dict + [(LoraWeights, strength)] -> merged weights, computed in float64 from the targets."""
    out = {k: v.double().clone() for k, v in sd.items()}
    for lw, s in loras:
        for t in lw.targets.values():
            if t.down is not None:
                scale = 1.0 if t.alpha is None else t.alpha / t.down.shape[0]  # FORMATS.md: scale 1 without alpha
                out[t.name + ".weight"] += s * scale * (t.up.double() @ t.down.double())
            if t.diff is not None:
                out[t.name + ".weight"] += s * t.diff.double()
            if t.diff_b is not None:
                out[t.name + ".bias"] += s * t.diff_b.double()
            if t.diff_m is not None:
                out[t.name + ".modulation"] += s * t.diff_m.double()
    return out


def _max_err(model, expected):
    return max((p.double() - expected[k]).abs().max().item() for k, p in model.state_dict().items())


@pytest.fixture(scope="module")
def t2v():
    cfg = tiny_cfg()
    return cfg, random_state_dict(cfg, seed=1)


@pytest.mark.parametrize(
    "stem,name",
    [
        ("blocks_0_self_attn_q", "blocks.0.self_attn.q"),
        ("blocks_12_cross_attn_k_img", "blocks.12.cross_attn.k_img"),
        ("blocks_3_cross_attn_norm_k_img", "blocks.3.cross_attn.norm_k_img"),
        ("blocks_3_cross_attn_k", "blocks.3.cross_attn.k"),
        ("blocks_0_ffn_2", "blocks.0.ffn.2"),
        ("head_head", "head.head"),
        ("time_projection_1", "time_projection.1"),
        ("img_emb_proj_3", "img_emb.proj.3"),
        ("blocks_0_attn1_to_out_0", "blocks.0.attn1.to_out.0"),
        ("condition_embedder_time_embedder_linear_1", "condition_embedder.time_embedder.linear_1"),
    ],
)
def test_kohya_names(stem, name):
    assert kohya_to_dotted(stem) == name


def test_key_spellings_parse_to_official_targets():
    z = torch.zeros(2, 3)
    sd = {
        "lora_unet_blocks_0_self_attn_q.lora_down.weight": z,
        "lora_unet_blocks_0_self_attn_q.lora_up.weight": z.T,
        "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(8.0),
        "lora_unet__blocks_1_cross_attn_k.lora_down.weight": z,  # Wan-Fun's double underscore
        "lora_unet__blocks_1_cross_attn_k.lora_up.weight": z.T,
        "lora_unet_blocks_0.diff_m": z,
        "lora_unet_blocks_22.self_attn.k.lora_down.weight": z,  # half-kohya names some trainers write
        "lora_unet_blocks_22.self_attn.k.lora_up.weight": z.T,
    }
    lw = parse_lora(sd)
    assert lw.layout == "kohya" and not lw.unknown_keys
    assert set(lw.targets) == {"blocks.0.self_attn.q", "blocks.1.cross_attn.k", "blocks.0", "blocks.22.self_attn.k"}
    assert lw.targets["blocks.0.self_attn.q"].scale == 8.0 / 2
    assert lw.targets["blocks.1.cross_attn.k"].scale == 1.0  # no alpha -> scale 1
    assert lw.targets["blocks.0"].diff_m is not None
    # ComfyUI-style modulation diff, diffusers' scale_shift_table, PEFT default adapter names
    lw = parse_lora({"diffusion_model.blocks.2.modulation.diff": z, "head.modulation.diff": z})
    assert lw.targets["blocks.2"].diff_m is not None and lw.targets["head"].diff_m is not None
    lw = parse_lora(
        {
            "transformer.blocks.0.scale_shift_table.diff": z,
            "transformer.blocks.0.attn2.add_k_proj.lora_A.default.weight": z,
            "transformer.blocks.0.attn2.add_k_proj.lora_B.default.weight": z.T,
            "transformer.blocks.0.norm2.diff_b": z,
        }
    )
    assert lw.layout == "diffusers"
    assert set(lw.targets) == {"blocks.0", "blocks.0.cross_attn.k_img", "blocks.0.norm3"}


def test_parse_errors():
    z = torch.zeros(2, 3)
    with pytest.raises(CheckpointError, match="has lora_up but no lora_down"):
        parse_lora({"blocks.0.ffn.0.lora_up.weight": z})
    with pytest.raises(CheckpointError, match="unsupported LoRA variant"):
        parse_lora(
            {"blocks.0.ffn.0.lora_up.weight": z, "blocks.0.ffn.0.lora_down.weight": z, "blocks.0.ffn.0.dora_scale": z}
        )


@pytest.mark.parametrize("layout", sorted(LORA_LAYOUTS))
def test_each_layout_merges_exactly(t2v, tmp_path, layout):
    cfg, sd = t2v
    lw = random_lora(cfg, rank=4, alpha=3.0, seed=2)
    path = save_lora(lw, tmp_path / f"{layout}.safetensors", layout=layout)
    model = build_model(cfg, sd, dtype=torch.float32)
    report = apply_loras(model, [(path, 0.7)], mode="merge")
    err = _max_err(model, _expected(sd, [(lw, 0.7)]))
    assert err <= 1e-6, err
    s = report[0]
    n_lin = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert s.kinds == {
        "lora": n_lin,
        "diff_b": n_lin + cfg.num_layers,
        "diff": 1 + 5 * cfg.num_layers,
        "diff_m": cfg.num_layers + 1,
    }
    assert s.modules == len(lw.targets) and s.rank == 4 and not s.unknown_keys and s.branched == 0
    # the file's alpha counts: a merge at scale 1 would be far off
    assert (
        _max_err(model, _expected(sd, [(LoraWeights({k: _alpha_as_rank(t) for k, t in lw.targets.items()}), 0.7)]))
        > 1e-3
    )


def _alpha_as_rank(t: LoraTarget) -> LoraTarget:
    return LoraTarget(t.name, t.down, t.up, None if t.down is None else t.down.shape[0], t.diff, t.diff_b, t.diff_m)


def test_bf16_file_and_state_dict_input(t2v):
    cfg, sd = t2v
    lw = random_lora(cfg, rank=3, alpha=None, seed=4)
    sd_lora = lora_state_dict(lw, "kohya", dtype=torch.bfloat16)
    lw16 = parse_lora(sd_lora)
    model = build_model(cfg, sd, dtype=torch.float32)
    apply_loras(model, [(sd_lora, 1.3)], mode="merge")
    assert _max_err(model, _expected(sd, [(lw16, 1.3)])) <= 1e-6  # alpha absent -> scale 1


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_branch_equals_merge(model_type):
    cfg = tiny_cfg(model_type)
    sd = random_state_dict(cfg, seed=5)
    lw = random_lora(cfg, rank=4, seed=6)
    merged = build_model(cfg, sd, dtype=torch.float32)
    apply_loras(merged, [(lw, 0.8)], mode="merge")
    branched = build_model(cfg, sd, dtype=torch.float32)
    rep = apply_loras(branched, [(lw, 0.8)], mode="branch")
    n_block_lin = sum(isinstance(m, nn.Linear) for n, m in branched.named_modules() if n.startswith("blocks."))
    assert rep[0].branched == n_block_lin + 2 + (2 if cfg.is_i2v else 0)  # + text_embedding (+ img_emb)
    # branches stay out of the state dict; the weights of branched linears are untouched
    assert set(branched.state_dict()) == set(sd)
    assert torch.equal(branched.blocks[0].self_attn.q.weight, sd["blocks.0.self_attn.q.weight"])
    ref, out, base = (
        _forward(merged, cfg),
        _forward(branched, cfg),
        _forward(build_model(cfg, sd, dtype=torch.float32), cfg),
    )
    err = ((out - ref).norm() / ref.norm()).item()
    assert err <= 1e-5, err
    assert ((base - ref).norm() / ref.norm()).item() > 1e-2  # the LoRA does change the output
    # strength 0 on the branch: bitwise the base model's output
    set_lora_strengths(branched, [0.0])
    assert torch.equal(_forward(branched, cfg), base)
    set_lora_strengths(branched, [0.8])
    assert ((_forward(branched, cfg) - ref).norm() / ref.norm()).item() <= 1e-5
    remove_loras(branched)
    assert not any(hasattr(m, "lora_branch") for m in branched.modules())
    assert torch.equal(_forward(branched, cfg), base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_strength_change_without_reload_is_exact(t2v, dtype):
    cfg, sd = t2v
    lw = random_lora(cfg, seed=7)
    base = build_model(cfg, sd, dtype=dtype).state_dict()
    base = {k: v.clone() for k, v in base.items()}
    model = build_model(cfg, sd, dtype=dtype)
    apply_loras(model, [(lw, 1.0)], mode="merge")
    fresh = build_model(cfg, sd, dtype=dtype)
    apply_loras(fresh, [(lw, 0.5)], mode="merge")
    set_lora_strengths(model, [0.5])
    for k, v in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert lora_report(model)[0].strength == 0.5
    set_lora_strengths(model, {"random_lora(seed=7)": 0.0})
    for k, v in base.items():
        assert torch.equal(model.state_dict()[k], v), k
    set_lora_strengths(model, [0.5])
    remove_loras(model)
    for k, v in base.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert len(lora_report(model)) == 0


def test_two_loras_stack(t2v, tmp_path):
    cfg, sd = t2v
    a = random_lora(cfg, rank=4, seed=8)
    b = random_lora(cfg, rank=2, alpha=1.0, targets="blocks", diffs=False, seed=9)
    pa = save_lora(a, tmp_path / "a.safetensors", "lightx2v")
    pb = save_lora(b, tmp_path / "b.safetensors", "diffusers")
    model = build_model(cfg, sd, dtype=torch.float32)
    rep = apply_loras(model, [(pa, 0.6), (pb, -0.3)], mode="merge")
    assert [s.name for s in rep.loras] == ["a.safetensors", "b.safetensors"]
    assert _max_err(model, _expected(sd, [(a, 0.6), (b, -0.3)])) <= 1e-6
    # the same pair as branches gives the same output
    br = build_model(cfg, sd, dtype=torch.float32)
    apply_loras(br, [(pa, 0.6)], mode="branch")
    apply_loras(br, [(pb, -0.3)], mode="branch")  # a second call stacks on the first
    ref = _forward(model, cfg)
    assert ((_forward(br, cfg) - ref).norm() / ref.norm()).item() <= 1e-5
    # switching one off equals a fresh merge of the other alone (bitwise)
    set_lora_strengths(model, {"b.safetensors": 0.0})
    only_a = build_model(cfg, sd, dtype=torch.float32)
    apply_loras(only_a, [(pa, 0.6)], mode="merge")
    for k, v in only_a.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_i2v_lora_on_t2v_model_is_a_clear_error(t2v, tmp_path):
    cfg, sd = t2v
    lw = random_lora(tiny_cfg("i2v"), seed=10)
    path = save_lora(lw, tmp_path / "i2v.safetensors", "kohya")
    model = build_model(cfg, sd, dtype=torch.float32)
    with pytest.raises(LoraMismatchError) as e:
        apply_loras(model, [(path, 1.0)])
    msg = str(e.value)
    # k_img and v_img in each of the 2 blocks + img_emb.proj.1 and .3
    assert "6 LoRA target modules are not in this model" in msg
    assert "blocks.0.cross_attn.k_img" in msg and "blocks.0.cross_attn.v_img" in msg
    assert "I2V" in msg and "i2v.safetensors" in msg
    for k, v in model.state_dict().items():  # nothing was changed
        assert torch.equal(v, sd[k]), k
    rep = apply_loras(model, [(path, 1.0)], strict=False)
    assert len(rep[0].skipped) == 6 and "skipped" in str(rep)


def test_other_lora_mismatches(t2v):
    cfg, sd = t2v
    model = build_model(cfg, sd, dtype=torch.float32)
    z = torch.zeros(4, 8)
    flux = {"double_blocks.0.img_attn.qkv.lora_A.weight": z, "double_blocks.0.img_attn.qkv.lora_B.weight": z.T}
    with pytest.raises(LoraMismatchError, match="no key of this file targets a Wan2.1 DiT module"):
        apply_loras(model, [(flux, 1.0)])
    smaller = random_lora(tiny_cfg(dim=32, ffn_dim=48), seed=11)
    with pytest.raises(LoraMismatchError, match=r"do not fit this model .*LoRA maps 32 -> 32, the module 64 -> 64"):
        apply_loras(model, [(smaller, 1.0)])
    deeper = random_lora(tiny_cfg(num_layers=3), seed=12)
    with pytest.raises(LoraMismatchError, match="reaches block 2, the model has 2 blocks"):
        apply_loras(model, [(deeper, 1.0)])
    assert len(lora_report(model)) == 0


def test_zero_norm_diffs_are_harmless_and_unknown_keys_reported(t2v):
    cfg, sd = t2v
    lw = random_lora(cfg, targets=["blocks.0.ffn.0"], diffs=False, seed=13)
    d = lora_state_dict(lw, "lightx2v")
    d["diffusion_model.blocks.0.norm1.diff"] = torch.zeros(cfg.dim)  # norm1 has no affine weight
    d["diffusion_model.head.norm.diff_b"] = torch.zeros(cfg.dim)
    d["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 3)
    d["something_else"] = torch.zeros(1)
    model = build_model(cfg, sd, dtype=torch.float32)
    s = apply_loras(model, [(d, 1.0)])[0]
    assert sorted(s.ignored_zero) == ["blocks.0.norm1.diff", "head.norm.diff_b"]
    assert set(s.unknown_keys) == {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "something_else"}
    assert "harmless" in str(s) and s.modules == 1
    remove_loras(model)
    d["diffusion_model.blocks.0.norm1.diff"] = torch.ones(cfg.dim)  # a real delta with nowhere to go
    with pytest.raises(LoraMismatchError, match="blocks.0.norm1"):
        apply_loras(model, [(d, 1.0)])


class _FP8Like(nn.Module):
    """Stand-in for an FP8 linear: e4m3 weight with per-channel scales, dequantized matmul."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.float()
        scale = w.abs().amax(dim=1, keepdim=True) / 448  # [out, 1]
        self.weight = nn.Parameter((w / scale).to(torch.float8_e4m3fn), requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.bias = lin.bias
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def dequantized_weight(self, dtype=None) -> torch.Tensor:
        return self.weight.float() * self.weight_scale

    def forward(self, x):
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


def _swap_attention_linears(model, make):
    # Only the attention linears: dit.py reads the compute dtype off `ffn.0.weight` (see the report).
    for name, mod in list(model.named_modules()):
        if "_attn." in name and isinstance(mod, nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, make(mod))
    return model


def _fp8linear(lin):
    from wan_core.layers.fp8 import FP8Linear

    return FP8Linear.from_linear(lin)  # kernel 'dequant', compute dtype = the linear's


@pytest.mark.parametrize("make", [_FP8Like, _fp8linear], ids=["stand-in", "FP8Linear"])
def test_branch_beside_fp8_linears(t2v, make):
    cfg, sd = t2v
    lw = random_lora(cfg, seed=14)  # with a full `diff` on the first target only (text_embedding.0)
    lw.targets["blocks.1.self_attn.o"].diff = torch.randn(cfg.dim, cfg.dim) * 0.01  # a full delta beside FP8
    fp8 = _swap_attention_linears(build_model(cfg, sd, dtype=torch.float32), make)
    with pytest.raises(LoraMismatchError, match="float8_e4m3fn: merging would lose precision"):
        apply_loras(fp8, [(lw, 0.9)], mode="merge")
    rep = apply_loras(fp8, [(lw, 0.9)], mode="auto")
    kind = type(fp8.blocks[0].self_attn.q)
    assert kind is not nn.Linear
    n_fp8 = sum(isinstance(m, kind) for m in fp8.modules())
    assert rep[0].branched == n_fp8 and rep[0].merged > 0
    # reference: the dequantized weights as a plain model, LoRA merged
    deq = {n: m.dequantized_weight(torch.float32) for n, m in fp8.named_modules() if isinstance(m, kind)}
    sd_deq = {k: deq[k[: -len(".weight")]] if k[: -len(".weight")] in deq else v for k, v in sd.items()}
    ref_model = build_model(cfg, sd_deq, dtype=torch.float32)
    apply_loras(ref_model, [(lw, 0.9)], mode="merge")
    ref = _forward(ref_model, cfg)
    err = ((_forward(fp8, cfg) - ref).norm() / ref.norm()).item()
    assert err <= 1e-5, err


def test_originals_given_by_the_caller_are_kept_not_copied(tmp_path):
    """`originals=` (a GPU-resident DiT's memory-mapped checkpoint) is kept as is: no copy, and
    strength changes / removal give exactly what the copying path gives."""
    from wan_core.loading.dit import save_dit
    from wan_core.loading.io import read_state_dict
    from wan_core.model_cache import _DitEntry, _file_originals
    from wan_core.spec import ModelSpec

    cfg = tiny_cfg()
    sd = random_state_dict(cfg, seed=4)
    path = save_dit(sd, str(tmp_path / "dit.safetensors"), layout="single", cfg=cfg)
    views = read_state_dict(path)
    lw = random_lora(cfg, rank=3, seed=5)
    ref = build_model(cfg, sd, dtype=torch.float32)
    ours = build_model(cfg, sd, dtype=torch.float32)
    apply_loras(ref, [(lw, 0.8)])
    asked = []

    def provider(name, current):
        asked.append(name)
        return views.get(name)

    apply_loras(ours, [(lw, 0.8)], originals=provider)
    from wan_core.layers.lora import _state

    kept = _state(ours).originals
    assert asked and all(kept[n] is views[n] for n in asked)  # the caller's tensors, not copies
    for a, b in zip(ref.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b)
    for strength in (0.3, 0.0):
        set_lora_strengths(ref, [strength])
        set_lora_strengths(ours, [strength])
        assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), ours.state_dict().values()))
    remove_loras(ours)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in sd.items())

    # the spec side: for a DiT off the CPU, the lookup opens the checkpoint and hands out its views
    entry = _DitEntry(build_model(cfg, None, dtype=torch.float32, device="meta"), None)
    lookup = _file_originals(entry, ModelSpec(dit=path))
    name = "blocks.0.ffn.0.weight"
    got = lookup(name, torch.empty(sd[name].shape, dtype=torch.float32))
    assert torch.equal(got, sd[name])
    assert lookup(name, torch.empty(sd[name].shape, dtype=torch.bfloat16)) is None  # another dtype: copy instead
    assert _file_originals(_DitEntry(ref, None), ModelSpec(dit=path)) is None  # on the CPU: nothing to save
