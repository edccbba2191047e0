"""The DiT against diffusers' WanTransformer3DModel on the same random weights, and the
full-size builds against the real checkpoints' key/shape lists."""

import json
import os

import pytest
import torch

from wan_core.loading.dit import build_model, official_to_diffusers
from wan_core.models.config import PRESETS, WanConfig
from wan_core.models.dit import WanModel

LAYOUTS = os.path.join(os.path.dirname(__file__), "reference", "checkpoint_layouts")


def tiny_cfg(model_type="t2v", **kw) -> WanConfig:
    base = dict(
        model_type=model_type,
        in_dim=36 if model_type == "i2v" else 16,
        dim=64,
        ffn_dim=96,
        num_heads=4,
        num_layers=2,
        text_dim=48,
        freq_dim=32,
        image_dim=40,
    )
    base.update(kw)
    return WanConfig(**base)


def random_state_dict(cfg: WanConfig, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        m = WanModel(cfg)
    sd = {}
    for k, v in m.state_dict().items():
        t = torch.randn(v.shape, generator=g) * (0.2 if v.dim() > 1 else 0.5)
        if k.endswith("norm_q.weight") or k.endswith("norm_k.weight") or "norm3.weight" in k or k.endswith(".0.weight") and "img_emb" in k:
            t = 1 + 0.1 * t
        sd[k] = t
    return sd


def dit_inputs(cfg: WanConfig, seed=3):
    """Small seeded DiT inputs (latent, t, context, I2V extras) shared by the loader/LoRA/FP8 tests."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    kw = {}
    if cfg.is_i2v:
        kw = dict(clip_fea=torch.randn(1, 257, cfg.image_dim, generator=g), y=torch.randn(1, 20, 2, 4, 4, generator=g))
    return x, torch.tensor([500.0]), torch.randn(1, 7, cfg.text_dim, generator=g), kw


def diffusers_model(cfg: WanConfig, sd):
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
        image_dim=cfg.image_dim if cfg.is_i2v else None,
        added_kv_proj_dim=cfg.dim if cfg.is_i2v else None,
    ).float()
    missing, unexpected = dm.load_state_dict(official_to_diffusers(sd), strict=True), None
    del missing, unexpected
    return dm.eval()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_forward_equals_diffusers(model_type):
    cfg = tiny_cfg(model_type)
    sd = random_state_dict(cfg)
    ours = build_model(cfg, sd, dtype=torch.float32)
    ref = diffusers_model(cfg, sd)
    g = torch.Generator().manual_seed(1)
    b, f, h, w = 2, 3, 4, 6  # latent grid; odd frame count, non-square
    x = torch.randn(b, 16, f, h, w, generator=g)
    t = torch.tensor([937.0, 250.0])
    ctx = torch.randn(b, 512, cfg.text_dim, generator=g)
    ctx[:, 20:] = 0  # padded text, as the pipeline feeds it
    kw, ref_kw = {}, {}
    if cfg.is_i2v:
        clip = torch.randn(b, 257, cfg.image_dim, generator=g)
        y = torch.randn(b, 20, f, h, w, generator=g)
        kw = dict(clip_fea=clip, y=y)
        ref_kw = dict(encoder_hidden_states_image=clip)
        ref_x = torch.cat([x, y], dim=1)
    else:
        ref_x = x
    with torch.no_grad():
        out = ours(x, t, [c[:20] for c in ctx], **kw)  # list of trimmed contexts: zero-padded inside
        exp = ref(ref_x, t, ctx, return_dict=False, **ref_kw)[0]
    assert out.shape == (b, 16, f, h, w)
    err = rel_err(out, exp)
    assert err <= 1e-5, err


def test_batch_rows_are_independent():
    cfg = tiny_cfg()
    m = build_model(cfg, random_state_dict(cfg), dtype=torch.float32)
    x = torch.randn(2, 16, 2, 4, 4)
    ctx = torch.randn(2, 10, cfg.text_dim)
    t = torch.tensor([100.0, 700.0])
    with torch.no_grad():
        both = m(x, t, ctx)
        one = m(x[1:], t[1:], ctx[1:])
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-5)


def test_bf16_residual_stream_is_kept_and_close_to_float32():
    """set_residual_dtype(bfloat16): every block hands on a bf16 residual (ComfyUI's and LightX2V's
    stream), the output stays near the float32 stream's (one bf16 rounding per residual add) but
    is not the same numbers; any other dtype is refused."""
    cfg = tiny_cfg()
    m = build_model(cfg, random_state_dict(cfg), dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    x, ctx, t = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 10, cfg.text_dim, generator=g), torch.tensor([600.0])
    seen = []
    m.blocks[0].register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))
    with torch.no_grad():
        ref = m(x.bfloat16(), t, ctx.bfloat16())
        m.set_residual_dtype(torch.bfloat16)
        out = m(x.bfloat16(), t, ctx.bfloat16())
    assert seen == [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]
    assert out.dtype == ref.dtype == torch.float32 and not torch.equal(out, ref)
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), 0).item()
    assert cos > 0.999, cos
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        m.set_residual_dtype(torch.float16)


def _layout(name):
    with open(os.path.join(LAYOUTS, name)) as f:
        return json.load(f)["tensors"]


@pytest.mark.parametrize(
    "preset,layout",
    [("t2v-14b", "wan2.1_t2v_14b_dit.json"), ("i2v-14b", "wan2.1_i2v_14b_dit.json"), ("t2v-1.3b", "wan2.1_t2v_1.3b_dit.json")],
)
def test_full_size_keys_and_shapes_match_real_checkpoints(preset, layout):
    expected = _layout(layout)
    with torch.device("meta"):
        m = WanModel(PRESETS[preset])
    got = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert got == expected
    # and the config inferred from those shapes is the preset
    assert WanConfig.from_state_dict(expected) == PRESETS[preset]
