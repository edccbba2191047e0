"""Every DiT layout users bring round-trips a tiny random model to identical outputs, and bad
inputs fail with clear errors."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from wan_core.loading import CheckpointError
from wan_core.loading.dit import build_model, load_dit, save_dit

from .test_dit import dit_inputs as _inputs
from .test_dit import random_state_dict, tiny_cfg


@pytest.fixture(scope="module")
def model_and_ref():
    cfg = tiny_cfg("i2v", num_heads=4)
    sd = random_state_dict(cfg, seed=5)
    ref = build_model(cfg, sd, dtype=torch.float32)
    x, t, ctx, kw = _inputs(cfg)
    with torch.no_grad():
        out = ref(x, t, ctx, **kw)
    return cfg, sd, out


@pytest.mark.parametrize(
    "layout,shards,ext",
    [("wan", 1, None), ("wan", 3, None), ("comfyui", 1, None), ("diffusers", 1, None), ("single", 1, None), ("pth", 1, None)],
)
def test_layout_round_trip(tmp_path, model_and_ref, layout, shards, ext):
    cfg, sd, expected = model_and_ref
    if layout == "pth":
        path = str(tmp_path / "dit.pth")
        torch.save(sd, path)
        extra = {"config": {"num_heads": cfg.num_heads}}  # a bare .pth carries no config: heads cannot be read off shapes
    else:
        path = save_dit(sd, str(tmp_path / "m"), layout=layout, cfg=cfg, shards=shards)
        extra = {}
    m = load_dit(path, dtype=torch.float32, task="i2v", **extra)
    x, t, ctx, kw = _inputs(cfg)
    with torch.no_grad():
        out = m(x, t, ctx, **kw)
    # Same weights, same math. Equal up to float32 rounding: BLAS may sum in another order when
    # a memory-mapped tensor sits at another alignment (seen: 4e-6 absolute on outputs of size ~3).
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert m.cfg == cfg


def test_shard_index_used(tmp_path, model_and_ref):
    cfg, sd, _ = model_and_ref
    folder = save_dit(sd, str(tmp_path / "m"), layout="wan", cfg=cfg, shards=2)
    files = sorted(os.listdir(folder))
    assert "diffusion_pytorch_model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) == 2


def test_config_json_missing_fields_still_loads(tmp_path, model_and_ref):
    cfg, sd, expected = model_and_ref
    folder = save_dit(sd, str(tmp_path / "m"), layout="wan", cfg=cfg)
    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    for k in ("in_dim", "model_type", "dim", "ffn_dim"):
        c.pop(k)  # distill repositories ship such configs
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(c, f)
    m = load_dit(folder, dtype=torch.float32)
    assert m.cfg == cfg


def test_bf16_storage_keeps_sensitive_params_fp32(model_and_ref):
    cfg, sd, _ = model_and_ref
    m = build_model(cfg, sd, dtype=torch.bfloat16)
    assert m.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert m.blocks[0].modulation.dtype == torch.float32
    assert m.time_projection[1].weight.dtype == torch.float32


def test_not_a_wan_dit(tmp_path):
    p = str(tmp_path / "other.safetensors")
    save_file({"encoder.layers.0.weight": torch.zeros(2, 2)}, p)
    with pytest.raises(CheckpointError, match="does not look like a Wan2.1 DiT"):
        load_dit(p)


def test_truncated_safetensors(tmp_path, model_and_ref):
    cfg, sd, _ = model_and_ref
    p = save_dit(sd, str(tmp_path / "m.safetensors"), layout="single")
    data = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_dit(p)


def test_missing_file():
    with pytest.raises(CheckpointError, match="not found"):
        load_dit("/nonexistent/dit.safetensors")


def test_i2v_checkpoint_for_t2v_task(tmp_path, model_and_ref):
    cfg, sd, _ = model_and_ref
    p = save_dit(sd, str(tmp_path / "m.safetensors"), layout="single")
    with pytest.raises(CheckpointError, match="I2V DiT .* but the task is t2v"):
        load_dit(p, task="t2v")


def test_missing_keys_reported(tmp_path, model_and_ref):
    cfg, sd, _ = model_and_ref
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.1.ffn")}
    p = save_dit(sd, str(tmp_path / "m.safetensors"), layout="single")
    with pytest.raises(CheckpointError, match="4 missing"):
        load_dit(p)


def test_i2v_model_requires_image_inputs(model_and_ref):
    cfg, sd, _ = model_and_ref
    m = build_model(cfg, sd, dtype=torch.float32)
    x, t, ctx, _ = _inputs(cfg)
    with pytest.raises(ValueError, match="clip_fea|y \\(mask"):
        m(x, t, ctx)
