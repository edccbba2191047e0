"""Wan2.2 VAE: equality with diffusers' AutoencoderKLWan (Wan2.2 config: residual levels, 2x2
patch) on the same random weights, the full-size key/shape list, the file layouts, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wan_core.loading.io import CheckpointError
from wan_core.loading.vae import load_vae
from wan_core.loading.vae22 import diffusers22_to_official, load_vae22
from wan_core.models.vae import WanVAE, WanVAEConfig
from wan_core.models.vae22 import (
    WAN22_LATENT_MEAN,
    WAN22_LATENT_STD,
    Wan22VAE,
    Wan22VAEConfig,
    patchify,
    unpatchify,
)

from .test_vae import _randomize, _rel

LAYOUT = Path(__file__).resolve().parent / "reference" / "checkpoint_layouts" / "wan2.2_vae.json"

# the Wan2.2 config of diffusers (Wan-AI/Wan2.2-TI2V-5B-Diffusers), at tiny widths; the decoder
# width differs from the encoder's as in the real one (160 / 256)
TINY = dict(
    base_dim=8, decoder_base_dim=16, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
    temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12, out_channels=12,
    scale_factor_spatial=16, latents_mean=list(WAN22_LATENT_MEAN), latents_std=list(WAN22_LATENT_STD),
)  # fmt: skip
TINY_CONFIG = Wan22VAEConfig(dim=8, dec_dim=16)


@pytest.fixture(scope="module")
def pair():
    """A tiny diffusers AutoencoderKLWan (Wan2.2 config) and our Wan22VAE with the same random weights."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    ref = AutoencoderKLWan(**TINY).eval()
    _randomize(ref, seed=2)
    ours = Wan22VAE(TINY_CONFIG).eval()
    ours.load_state_dict(diffusers22_to_official(ref.state_dict()), strict=True)
    return ref, ours


def _stats():
    mean = torch.tensor(WAN22_LATENT_MEAN).view(1, 48, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(WAN22_LATENT_STD).view(1, 48, 1, 1, 1)
    return mean, inv_std


@pytest.mark.parametrize("frames", [1, 9])  # 9: three chunks, the cache carried twice
def test_encode_decode_match_diffusers(pair, frames):
    ref, ours = pair
    g = torch.Generator().manual_seed(frames)
    video = torch.rand(1, 3, frames, 32, 48, generator=g) * 2 - 1  # non-square: latent 2 x 3
    mean, inv_std = _stats()
    with torch.no_grad():
        ref_latent = (ref.encode(video).latent_dist.mean - mean) * inv_std
    latent = ours.encode(video)
    assert latent.shape == (1, 48, 1 + (frames - 1) // 4, 2, 3) and latent.dtype == torch.float32
    assert 0.1 < ref_latent.std()  # a non-trivial latent
    assert _rel(latent, ref_latent) <= 1e-4  # measured ~5e-7

    with torch.no_grad():
        ref_video = ref.decode(latent / inv_std + mean).sample
    video_out = ours.decode(latent)
    assert video_out.shape == video.shape
    assert 0.1 < ref_video.std() and (ref_video.abs() < 1).float().mean() > 0.5  # not saturated, not trivial
    assert _rel(video_out, ref_video) <= 1e-4  # measured ~3e-6


def test_patchify_is_the_official_channel_order_and_inverts():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(1, 2, 3, 4, 6)
    y = patchify(x, 2)
    assert y.shape == (1, 8, 3, 2, 3)
    # channel c*4 + q*2 + r holds the pixel at row offset r, column offset q
    for c in range(2):
        for q in range(2):
            for r in range(2):
                assert torch.equal(y[0, c * 4 + q * 2 + r], x[0, c, :, r::2, q::2])
    assert torch.equal(unpatchify(y, 2), x)


def test_full_size_meta_build_matches_checkpoint_layout():
    expected = json.loads(LAYOUT.read_text())["tensors"]
    with torch.device("meta"):
        model = Wan22VAE()
        from diffusers import AutoencoderKLWan

        ref = AutoencoderKLWan(**{**TINY, "base_dim": 160, "decoder_base_dim": 256})
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    assert {k: list(v.shape) for k, v in diffusers22_to_official(ref.state_dict()).items()} == expected
    cfg = model.config
    assert (cfg.z_dim, cfg.spatial_ratio, cfg.temporal_ratio) == (48, 16, 4)


def test_latent_statistics_are_the_official_ones():
    # spot checks against Wan2_2_VAE.__init__ in the official wan/modules/vae2_2.py
    assert len(WAN22_LATENT_MEAN) == len(WAN22_LATENT_STD) == 48
    assert (WAN22_LATENT_MEAN[0], WAN22_LATENT_MEAN[19], WAN22_LATENT_MEAN[47]) == (-0.2289, 0.5109, -0.0667)
    assert (WAN22_LATENT_STD[0], WAN22_LATENT_STD[39], WAN22_LATENT_STD[47]) == (0.4765, 1.6887, 0.7744)


@pytest.mark.parametrize("layout", ["official", "comfyui_prefixed", "diffusers"])
def test_file_layouts_load(tmp_path, pair, layout):
    ref, ours = pair
    official = ours.state_dict()
    if layout == "official":
        sd, name = official, "Wan2.2_VAE.pth"
    elif layout == "comfyui_prefixed":
        sd, name = {"first_stage_model." + k: v for k, v in official.items()}, "wan2.2_vae.safetensors"
    else:
        sd, name = ref.state_dict(), "diffusion_pytorch_model.safetensors"
    path = tmp_path / name
    if name.endswith(".pth"):
        torch.save({k: v.clone() for k, v in sd.items()}, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    loaded = load_vae22(path, dtype=torch.float32, config=TINY_CONFIG)
    for k, v in official.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert torch.equal(loaded.encode(video), ours.encode(video))


def test_wrong_files_give_clear_errors(tmp_path, pair):
    ref, ours = pair
    wan21 = WanVAE(WanVAEConfig(dim=8))
    p21 = tmp_path / "wan_2.1_vae.safetensors"
    save_file({k: v.contiguous() for k, v in wan21.state_dict().items()}, p21)
    with pytest.raises(CheckpointError, match="Wan2.1 VAE"):
        load_vae22(p21, config=TINY_CONFIG)
    # and the reverse: the Wan2.1 loader names a Wan2.2 file
    p22 = tmp_path / "wan2.2_vae.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, p22)
    with pytest.raises(CheckpointError, match="this is a Wan2.2 VAE"):
        load_vae(p22)
    pd = tmp_path / "diffusers_wan22.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, pd)
    with pytest.raises(CheckpointError, match="this is a Wan2.2 VAE"):
        load_vae(pd)
    # the Wan2.2 file against the full-size architecture: shapes checked, with the file named
    with pytest.raises(CheckpointError, match="not the expected Wan2.2 VAE.*wrong shape"):
        load_vae22(p22, config=Wan22VAEConfig())
    # without a config, the architecture is read off the file's shapes (the tiny one here)
    assert load_vae22(p22, dtype=torch.float32).config == TINY_CONFIG
    other = tmp_path / "t5.safetensors"
    save_file({"shared.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(CheckpointError, match="not a Wan2.2 VAE"):
        load_vae22(other)


def test_input_shapes_are_checked(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="multiples of 16"):
        ours.encode(torch.zeros(1, 3, 5, 24, 32))
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        ours.encode(torch.zeros(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="48 channels"):
        ours.decode(torch.zeros(1, 16, 2, 2, 2))


COMFY_SCRIPT = r"""
import sys
import torch
sys.path.append(sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
from comfy.ldm.wan.vae2_2 import WanVAE
d = torch.load(sys.argv[2])
model = WanVAE(dim=8, dec_dim=16, z_dim=48, temperal_downsample=[False, True, True]).float().eval()
model.load_state_dict(d["sd"], strict=True)  # the official names, no renaming
with torch.no_grad():
    mu = model.encode(d["video"])
    video = model.decode(d["raw"])
torch.save({"mu": mu, "video": video}, sys.argv[3])
"""


@pytest.mark.comfyui
def test_matches_comfyui_port_of_the_official_vae(tmp_path, pair):
    """ComfyUI's comfy/ldm/wan/vae2_2.py (the official module, verified equal to it) loads our
    state dict strictly under its own names and gives the same latent and video."""
    import os
    import subprocess
    import sys

    src = os.environ.get("COMFYUI_DIR")
    if not src or not os.path.isfile(os.path.join(src, "comfy", "ldm", "wan", "vae2_2.py")):
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout")
    _, ours = pair
    video = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(4)) * 2 - 1
    latent = ours.encode(video)
    mean, inv_std = _stats()
    torch.save({"sd": ours.state_dict(), "video": video, "raw": latent / inv_std + mean}, tmp_path / "in.pt")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    run = subprocess.run([python, "-c", COMFY_SCRIPT, src, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert _rel(latent, (out["mu"] - mean) * inv_std) <= 1e-4
    assert _rel(ours.decode(latent), out["video"].clamp(-1, 1)) <= 1e-4
