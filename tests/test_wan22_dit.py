"""The Wan2.2 DiTs (A14B experts, TI2V-5B): full-size builds against the real checkpoints'
key/shape lists, config detection from shapes, and the forward (including TI2V-5B's per-token
timesteps) against diffusers' WanTransformer3DModel on the same random weights."""

import json
import os

import pytest
import torch

from wan_core.loading.dit import build_model, official_to_diffusers
from wan_core.models.config import PRESETS, WanConfig, config_from_json
from wan_core.models.dit import WanModel

from .test_dit import random_state_dict, rel_err

LAYOUTS = os.path.join(os.path.dirname(__file__), "reference", "checkpoint_layouts")


def _layout(name):
    with open(os.path.join(LAYOUTS, name)) as f:
        return json.load(f)["tensors"]


@pytest.mark.parametrize(
    "preset,layout",
    [("t2v-a14b", "wan2.2_t2v_a14b_dit.json"), ("i2v-a14b", "wan2.2_i2v_a14b_dit.json"), ("ti2v-5b", "wan2.2_ti2v_5b_dit.json")],
)
def test_full_size_keys_and_shapes_match_real_checkpoints(preset, layout):
    expected = _layout(layout)
    with torch.device("meta"):
        m = WanModel(PRESETS[preset])
    got = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert got == expected
    assert WanConfig.from_state_dict(expected) == PRESETS[preset]


def test_detection_tells_wan21_i2v_from_wan22_i2v_expert():
    wan21 = WanConfig.from_state_dict(_layout("wan2.1_i2v_14b_dit.json"))
    wan22 = WanConfig.from_state_dict(_layout("wan2.2_i2v_a14b_dit.json"))
    assert (wan21.model_type, wan21.clip_branch, wan21.in_dim) == ("i2v", True, 36)
    assert (wan22.model_type, wan22.clip_branch, wan22.in_dim) == ("i2v", False, 36)
    ti2v = WanConfig.from_state_dict(_layout("wan2.2_ti2v_5b_dit.json"))
    assert (ti2v.model_type, ti2v.clip_branch, ti2v.in_dim, ti2v.out_dim, ti2v.num_heads) == ("ti2v", False, 48, 48, 24)
    # the released config.json files say "ti2v" / "i2v": they agree with the shapes, so no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config_from_json({"model_type": "ti2v", "num_heads": 24}, _layout("wan2.2_ti2v_5b_dit.json")) == PRESETS["ti2v-5b"]
        assert config_from_json({"model_type": "i2v", "in_dim": 36}, _layout("wan2.2_i2v_a14b_dit.json")) == PRESETS["i2v-a14b"]
        # diffusers' transformer config (Wan2.2-I2V-A14B-Diffusers): image_dim null = no CLIP branch
        diffusers_cfg = {"in_channels": 36, "out_channels": 16, "num_attention_heads": 40, "image_dim": None}
        assert config_from_json(diffusers_cfg, _layout("wan2.2_i2v_a14b_dit.json")) == PRESETS["i2v-a14b"]
    with pytest.raises(ValueError, match="CLIP image branch"):
        WanConfig(model_type="ti2v", clip_branch=True)


def tiny22(kind: str) -> WanConfig:
    """Tiny configs shaped like the 5B (48 channels in and out) and like an I2V-A14B expert."""
    base = dict(dim=64, ffn_dim=96, num_heads=4, num_layers=2, text_dim=48, freq_dim=32)
    if kind == "ti2v":
        return WanConfig(model_type="ti2v", in_dim=48, out_dim=48, **base)
    if kind == "i2v":
        return WanConfig(model_type="i2v", clip_branch=False, in_dim=36, **base)
    return WanConfig(model_type="t2v", **base)


def diffusers22(cfg: WanConfig, sd):
    from diffusers import WanTransformer3DModel

    dm = WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
        image_dim=None,
        added_kv_proj_dim=None,
    ).float()
    dm.load_state_dict(official_to_diffusers(sd), strict=True)
    return dm.eval()


def _inputs(cfg, b=2, f=3, h=4, w=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.out_dim, f, h, w, generator=g)
    ctx = torch.randn(b, 512, cfg.text_dim, generator=g)
    ctx[:, 20:] = 0  # padded text, as the pipeline feeds it
    y = torch.randn(b, 20, f, h, w, generator=g) if cfg.is_i2v else None
    return x, ctx, y


def _first_frame_zero_t(t_rows, f, h, w, patch=(1, 2, 2)):
    """TI2V-5B i2v timesteps: [B, L], the first latent frame's tokens at 0 (token order f, h, w)."""
    hw = (h // patch[1]) * (w // patch[2])
    tt = torch.tensor(t_rows)[:, None].repeat(1, (f // patch[0]) * hw)  # [B, L]
    tt[:, :hw] = 0
    return tt


@pytest.mark.parametrize("kind,per_token", [("ti2v", False), ("ti2v", True), ("i2v", False), ("i2v", True)])
def test_forward_equals_diffusers(kind, per_token):
    cfg = tiny22(kind)
    sd = random_state_dict(cfg)
    assert not any("img_emb" in k or "k_img" in k for k in sd)
    ours = build_model(cfg, sd, dtype=torch.float32)
    ref = diffusers22(cfg, sd)
    b, f, h, w = 2, 3, 4, 6
    x, ctx, y = _inputs(cfg, b, f, h, w)
    t = _first_frame_zero_t([937.0, 250.0], f, h, w) if per_token else torch.tensor([937.0, 250.0])
    ref_x = x if y is None else torch.cat([x, y], dim=1)
    with torch.no_grad():
        out = ours(x, t, [c[:20] for c in ctx], y=y)
        exp = ref(ref_x, t, ctx, return_dict=False)[0]
    assert out.shape == x.shape
    err = rel_err(out, exp)
    assert err <= 1e-5, err
    if per_token:  # the per-token t really changes the result (frame 0 at t=0)
        with torch.no_grad():
            scalar = ours(x, torch.tensor([937.0, 250.0]), [c[:20] for c in ctx], y=y)
        assert rel_err(out, scalar) > 1e-3


def test_uniform_per_token_t_equals_one_t_per_row_and_padding_is_ignored():
    cfg = tiny22("ti2v")
    m = build_model(cfg, random_state_dict(cfg), dtype=torch.float32)
    x, ctx, _ = _inputs(cfg, b=2, f=2, h=4, w=4)
    n = 2 * 2 * 2  # tokens
    t = torch.tensor([700.0, 300.0])
    t_tok = t[:, None].repeat(1, n + 5)  # padded past the token count, as the official seq_len does
    t_tok[:, n:] = 123.0
    with torch.no_grad():
        rows = m(x, t, ctx[:, :20])
        toks = m(x, t_tok, ctx[:, :20])
        one = m(x, t_tok[:1], ctx[:, :20])  # a [1, L] t is broadcast over the batch
    assert rel_err(toks, rows) <= 1e-6
    torch.testing.assert_close(one[0], toks[0])
    with pytest.raises(ValueError, match="per-token"):
        m(x, t_tok[:, : n - 1], ctx[:, :20])


def test_i2v_expert_takes_y_and_no_clip():
    cfg = tiny22("i2v")
    m = build_model(cfg, random_state_dict(cfg), dtype=torch.float32)
    assert not hasattr(m, "img_emb") and not hasattr(m.blocks[0].cross_attn, "k_img")
    x, ctx, y = _inputs(cfg, b=1)
    with torch.no_grad():
        assert m(x, torch.tensor([900.0]), ctx[:, :20], y=y).shape == x.shape
    with pytest.raises(ValueError, match="y"):
        m(x, torch.tensor([900.0]), ctx[:, :20])


def test_fused_block_ops_with_per_token_t_equal_plain_ops(monkeypatch):
    """The fused block ops take per-batch modulation rows; per-token modulation runs the plain
    ops' math there, so the output is identical to the "torch" ops' (the cross-attention not
    through its projection, which sums in another order: tests/test_text_projected.py)."""
    from wan_core.kernels import text_projected

    monkeypatch.setattr(text_projected, "PROJECTED_MAX_KEYS", 0)
    cfg = tiny22("ti2v").replace(dim=128, ffn_dim=256, num_heads=2)
    model = build_model(cfg, random_state_dict(cfg), dtype=torch.bfloat16, device="cpu")
    x, ctx, _ = _inputs(cfg, b=2, f=3, h=8, w=8)
    t = _first_frame_zero_t([500.0, 20.0], 3, 8, 8)
    with torch.no_grad():
        ref = model(x.bfloat16(), t, ctx[:, :7].bfloat16())
        model.set_block_ops("fused")
        out = model(x.bfloat16(), t, ctx[:, :7].bfloat16())
        rows = model(x.bfloat16(), torch.tensor([500.0, 20.0]), ctx[:, :7].bfloat16())  # fused path still runs
    assert torch.equal(out, ref)
    assert rows.shape == out.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_per_token_t_with_fused_ops_and_compile_equals_cpu_fp32(compiled):
    """The TI2V-5B image path on a GPU (per-token t through the CUDA block ops, the Triton
    kernels and a compiled block) equals the fp32 CPU forward within bf16 tolerance."""
    from wan_core.layers.compile import compile_blocks

    cfg = tiny22("ti2v").replace(dim=256, ffn_dim=512, num_heads=2)
    sd = random_state_dict(cfg)
    ref_model = build_model(cfg, sd, dtype=torch.float32)
    model = build_model(cfg, sd, dtype=torch.bfloat16, device="cuda")
    model.set_block_ops("auto")
    if compiled:
        compile_blocks(model)
    x, ctx, _ = _inputs(cfg, b=1, f=3, h=8, w=8)
    t = _first_frame_zero_t([500.0], 3, 8, 8)
    with torch.no_grad():
        ref = ref_model(x, t, ctx[:, :7])
        out = model(x.cuda().bfloat16(), t.cuda(), ctx[:, :7].cuda().bfloat16()).float().cpu()
        scalar = model(x.cuda().bfloat16(), torch.tensor([500.0], device="cuda"), ctx[:, :7].cuda().bfloat16())
    assert rel_err(out, ref) < 2e-2
    assert rel_err(scalar.float().cpu(), ref) > 2e-2  # the per-token t mattered
