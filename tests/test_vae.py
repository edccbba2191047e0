"""Wan2.1 VAE: equality with diffusers' AutoencoderKLWan on the same random weights, exact tiled
decode, the full-size key/shape list, every file layout, and clear errors for wrong files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wan_core.loading.io import CheckpointError
from wan_core.loading.vae import diffusers_to_official, load_vae, load_vae_state_dict
from wan_core.models.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, Decoder3d, WanVAE, WanVAEConfig

from .triton_tools import compile_for_hopper, needs_triton, run_interpreted

LAYOUT = Path(__file__).resolve().parent / "reference" / "checkpoint_layouts" / "wan2.1_vae.json"

TINY = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights that keep activations O(1): gammas near 1, fan-in scaled kernels, small biases
    (every tensor differs from its default init, so a swapped name cannot go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def pair():
    """A tiny diffusers AutoencoderKLWan and our WanVAE holding the same random weights."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    ref = AutoencoderKLWan(**TINY).eval()
    _randomize(ref, seed=1)
    ours = WanVAE(WanVAEConfig(dim=8)).eval()
    ours.load_state_dict(diffusers_to_official(ref.state_dict()), strict=True)
    return ref, ours


def _stats():
    mean = torch.tensor(WAN21_LATENT_MEAN).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(WAN21_LATENT_STD).view(1, 16, 1, 1, 1)
    return mean, inv_std


@pytest.mark.parametrize("frames", [1, 9])  # 9: three chunks, the cache carried twice
def test_encode_decode_match_diffusers(pair, frames):
    ref, ours = pair
    g = torch.Generator().manual_seed(frames)
    video = torch.rand(1, 3, frames, 24, 40, generator=g) * 2 - 1  # non-square: latent 3 x 5
    mean, inv_std = _stats()
    with torch.no_grad():
        # diffusers returns un-normalised moments; the Wan pipelines normalise with 1/std like this
        ref_latent = (ref.encode(video).latent_dist.mean - mean) * inv_std
    latent = ours.encode(video)
    assert latent.shape == (1, 16, 1 + (frames - 1) // 4, 3, 5) and latent.dtype == torch.float32
    assert _rel(latent, ref_latent) <= 1e-5  # measured ~6e-7

    with torch.no_grad():
        ref_video = ref.decode(latent / inv_std + mean).sample
    video_out = ours.decode(latent)
    assert video_out.shape == video.shape
    assert 0.2 < ref_video.std() and (ref_video.abs() < 1).float().mean() > 0.8  # not a saturated, trivial output
    assert _rel(video_out, ref_video) <= 1e-4  # measured ~5e-6


def test_tiled_decode_equals_plain_decode(monkeypatch):
    """Tiles widened by the receptive field of the upper decoder and cropped back reproduce the
    plain decode up to float rounding (conv algorithms differ with the input size; measured
    ~4e-6 max abs, fp32); a too-small halo does not, so the test can see seams."""
    cfg = WanVAEConfig(dim=4, num_res_blocks=1)  # halo 9 latent px keeps the test small
    model = WanVAE(cfg).eval()
    _randomize(model, seed=2)
    assert model.decoder.upper_halo() == 9
    latent = torch.randn(1, 16, 2, 8, 40, generator=torch.Generator().manual_seed(3))
    plain = model.decode(latent)
    tiled = model.decode(latent, tile_size=(4, 10))  # 2 x 4 tiles; middle columns cropped on both sides
    assert tiled.shape == plain.shape
    assert _rel(tiled, plain) <= 2e-5

    monkeypatch.setattr(Decoder3d, "upper_halo", lambda self: 3)
    seams = model.decode(latent, tile_size=(4, 10))
    assert _rel(seams, plain) > 1e-2


def test_decode_hands_over_each_chunk_as_it_is_made():
    """on_frames (the pipeline encodes the mp4 with it while decoding): frame 0, then 4 frames per
    latent frame, each a finished copy of the result's frames at that moment; tiled: once."""
    model = WanVAE(WanVAEConfig(dim=4, num_res_blocks=1)).eval()
    _randomize(model, seed=2)
    latent = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(4))
    chunks = []
    out = model.decode(latent, on_frames=lambda c: chunks.append(c.clone()))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    assert torch.equal(torch.cat(chunks, dim=2), out)
    tiled = []
    model.decode(latent, tile_size=2, on_frames=tiled.append)
    assert len(tiled) == 1 and tiled[0].shape == out.shape


def test_channels_last_layout_same_result_and_kept_throughout(pair, monkeypatch):
    """The channels-last activation layout (the CUDA default) gives the plain layout's numbers,
    and none of our ops silently falls back to the plain layout on the way (every conv input
    stays channels-last), encode, plain decode and tiled decode alike. The CPU conv returns
    plain layout whatever it gets, so it is made to answer in the input's layout as cuDNN does."""
    from wan_core.kernels.vae_layout import is_channels_last as _is_channels_last
    from wan_core.models.vae import CausalConv3d

    conv3d = torch.nn.functional.conv3d

    def conv3d_keeping_layout(x, *args, **kwargs):
        y = conv3d(x, *args, **kwargs)
        return y.contiguous(memory_format=torch.channels_last_3d) if _is_channels_last(x) else y

    monkeypatch.setattr(torch.nn.functional, "conv3d", conv3d_keeping_layout)
    _, ours = pair
    video = torch.rand(1, 3, 5, 16, 24, generator=torch.Generator().manual_seed(6)) * 2 - 1
    plain_latent = ours.encode(video)
    plain_video = ours.decode(plain_latent)
    seen = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: seen.append(_is_channels_last(args[0])))
        for m in ours.modules()
        if isinstance(m, CausalConv3d) and m.history
    ]
    try:
        ours.channels_last = True
        latent = ours.encode(video)
        out = ours.decode(latent)
        tiled = ours.decode(latent, tile_size=2)
        weights = [m.weight for m in ours.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
        weights_cl = [w.is_contiguous(memory_format=torch.channels_last_3d if w.dim() == 5 else torch.channels_last)
                      for w in weights]
    finally:
        ours.channels_last = None
        for h in hooks:
            h.remove()
    assert seen and all(seen)
    assert all(weights_cl) and not all(w.is_contiguous() for w in weights)  # stored as cuDNN is handed them
    assert all(m.phases is None for m in ours.modules() if hasattr(m, "phases"))  # sub-pixel kernels: per call
    torch.testing.assert_close(ours.decode(plain_latent), plain_video, rtol=0, atol=0)  # back to plain, same numbers
    assert all(w.is_contiguous() for w in weights)
    assert _rel(latent, plain_latent) <= 1e-5
    assert _rel(out, plain_video) <= 1e-5
    assert _rel(tiled, plain_video) <= 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_time_folded_causal_conv_equals_the_3d_conv(channels_last):
    """`CausalConv3d.fold_time` (one conv2d over frames with their two predecessors stacked on the
    channels) gives the 3-D conv's output and passes on the same history: chunks of 1 to 4 frames
    in a row (a 1-frame chunk's history mixes the old history and the new frame), with and without
    the norm (+ bias) written into the buffer, without a cache (zeros in the past). A conv without
    a 3-frame kernel refuses to fold."""
    from wan_core.models.vae import CausalConv3d, RMSNorm

    g = torch.Generator().manual_seed(0)
    conv = CausalConv3d(8, 6, 3, padding=1).eval()
    norm = RMSNorm(8)
    _randomize(conv, seed=3)
    _randomize(norm, seed=4)
    bias = 0.3 * torch.randn(8, generator=g)
    folded = CausalConv3d(8, 6, 3, padding=1).eval()
    folded.load_state_dict(conv.state_dict())
    folded.fold_time(True)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    with torch.no_grad():
        for kw in ({}, dict(norm=norm, norm_bias=bias)):
            cache, ref_cache = {}, {}
            for t in (1, 4, 1, 2, 4, 3):
                x = torch.randn(2, 8, t, 5, 7, generator=g).contiguous(memory_format=fmt)
                ref, got = conv(x, ref_cache, **kw), folded(x, cache, **kw)
                assert got.shape == ref.shape and _rel(got, ref) < 1e-5, (kw.keys(), t, _rel(got, ref))
                # the next chunk's history (the CPU's SiLU rounds strided views 1 ulp apart)
                assert _rel(cache[folded], ref_cache[conv]) < 1e-6
            x = torch.randn(1, 8, 3, 5, 7, generator=g)
            assert _rel(folded(x, **kw), conv(x, **kw)) < 1e-5
        folded.fold_time(False)
        assert folded.folded is None and torch.equal(folded(x, norm=norm), conv(x, norm=norm))
    with pytest.raises(ValueError, match="3-frame kernel"):
        CausalConv3d(8, 8, 1).fold_time(True)


@pytest.mark.parametrize("mode", ["upsample2d", "upsample3d"])
def test_subpixel_upsampler_equals_upsample_then_conv(mode, monkeypatch):
    """`Resample.use_subpixel`: the 2x2 phase kernels at the source resolution and the strided
    copy give nearest-upsample + 3x3 conv, for the plain upsampler and for upsample3d's two frame
    groups (after its time conv, from the second chunk on); the output stays channels-last. On
    plain-layout activations the upsample + conv path runs whatever the switch. (The CPU's conv3d
    answers single-threaded in plain layout, so the time conv is made to keep its input's layout
    as cuDNN does: the second chunk reaches the sub-pixel form whatever the thread count.)"""
    from wan_core.kernels.vae_layout import is_channels_last as _is_channels_last
    from wan_core.models.vae import Resample

    conv3d = torch.nn.functional.conv3d

    def conv3d_keeping_layout(x, *args, **kwargs):
        y = conv3d(x, *args, **kwargs)
        return y.contiguous(memory_format=torch.channels_last_3d) if _is_channels_last(x) else y

    monkeypatch.setattr(torch.nn.functional, "conv3d", conv3d_keeping_layout)
    up = Resample(12, mode).eval()
    _randomize(up, seed=8)
    outs = {}
    with torch.no_grad():
        for on in (False, True):
            up.use_subpixel(on)
            assert (up.phases is not None) == on
            cache, g = {}, torch.Generator().manual_seed(9)
            xs = [torch.randn(2, 12, t, 5, 7, generator=g).contiguous(memory_format=torch.channels_last_3d) for t in (2, 3)]
            outs[on] = [up(x, cache) for x in xs]
        for a, b in zip(outs[True], outs[False]):
            assert a.shape == b.shape and _rel(a, b) < 1e-5, _rel(a, b)
            assert _is_channels_last(a)
        assert [o.shape[2] for o in outs[True]] == ([2, 3] if mode == "upsample2d" else [2, 6])
        x = torch.randn(1, 12, 2, 4, 4, generator=torch.Generator().manual_seed(10))
        up.use_subpixel(True)
        on = up(x, {})
        up.use_subpixel(False)
        assert torch.equal(on, up(x, {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mid_block_attention_as_gemms_equals_sdpa(dtype, monkeypatch):
    """`vae_forms.attention_gemm` (scores and softmax in float32, a few query blocks at a time) is
    the attention SDPA computes: to float32 rounding, and in bf16 as close to the float32 result
    as SDPA's bf16 path; the CUDA table routes only head dims above 256 to it."""
    from wan_core.kernels import vae_forms

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, 300, 384, generator=g) for _ in range(3))
    truth = vae_forms.attention(q, k, v)
    monkeypatch.setattr(vae_forms, "GEMM_SCORES", 300 * 64)  # 64 query rows a block: 5 blocks per image
    q16, k16, v16 = (t.to(dtype) for t in (q, k, v))
    got, sdpa = vae_forms.attention_gemm(q16, k16, v16), vae_forms.attention(q16, k16, v16)
    assert got.dtype == dtype and got.shape == q.shape
    if dtype == torch.float32:
        assert _rel(got, truth) < 1e-5, _rel(got, truth)
    else:
        assert _rel(got.float(), truth) <= max(1.2 * _rel(sdpa.float(), truth), 1e-3), (_rel(got.float(), truth), _rel(sdpa.float(), truth))
    assert vae_forms.TRITON_OPS.attention is vae_forms.attention_cuda and vae_forms.TORCH_OPS.attention is vae_forms.attention
    calls = []
    monkeypatch.setattr(vae_forms, "attention_gemm", lambda *a: calls.append(a[0].shape[-1]) or a[0])
    vae_forms.attention_cuda(q, k, v), vae_forms.attention_cuda(q[..., :256], k[..., :256], v[..., :256])
    assert calls == [384]


def test_full_size_vae_folds_the_measured_convs():
    """At full size the time-folding rule picks what was measured to pay on the H100: the convs
    with 96 input channels (the full-resolution ones and the encoder's 96 -> 192) and the
    encoder's first conv; not the decoder's 96 -> 3 head, nor any 192- or 384-channel input."""
    from wan_core.kernels.vae_forms import folds_time_on_cuda
    from wan_core.models.vae import CausalConv3d

    with torch.device("meta"):
        model = WanVAE()
    folded = {}
    for name, m in model.named_modules():
        if isinstance(m, CausalConv3d) and m.can_fold_time() and folds_time_on_cuda(m.in_channels, m.out_channels):
            folded[name] = (m.in_channels, m.out_channels)
    assert set(folded.values()) == {(3, 96), (96, 96), (96, 192)}
    assert "encoder.conv1" in folded and "decoder.head.2" not in folded
    assert sum(v == (96, 96) for v in folded.values()) == 10  # decoder: 3 blocks x 2, encoder: 2 x 2


def test_vae_with_time_folded_convs_equals_plain(monkeypatch):
    """Encode and decode (plain and tiled) with every foldable conv time-folded give the unfolded
    numbers (on CUDA the 96-channel convs fold by themselves; here all are made to); a conv's
    folded weight is made afresh per call, so new weights are picked up, and dropped after it (an
    offloaded VAE keeps nothing on the GPU)."""
    from wan_core.models.vae import CausalConv3d

    model = WanVAE(WanVAEConfig(dim=4, num_res_blocks=1)).eval()
    _randomize(model, seed=5)
    g = torch.Generator().manual_seed(6)
    latent = torch.randn(1, 16, 3, 4, 6, generator=g)
    video = torch.rand(1, 3, 5, 16, 24, generator=g) * 2 - 1
    plain = model.decode(latent), model.decode(latent, tile_size=2), model.encode(video)
    layout = WanVAE._weights_layout

    def fold_all(self, channels_last):
        layout(self, channels_last)
        for m in self.modules():
            if isinstance(m, CausalConv3d) and m.can_fold_time():
                m.fold_time(True)

    convs = [m for m in model.modules() if isinstance(m, CausalConv3d)]
    seen = []  # per conv call: did it run folded
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(mod.folded is not None)) for m in convs]
    monkeypatch.setattr(WanVAE, "_weights_layout", fold_all)
    folded = model.decode(latent), model.decode(latent, tile_size=2), model.encode(video)
    assert sum(seen) >= 10 * 3
    for a, b in zip(folded, plain):
        # float32 sums in another order through the whole decoder (1e-5 on some CPUs' conv paths);
        # a wrong fold is off by the signal itself
        assert _rel(a, b) < 5e-5, _rel(a, b)
    assert all(m.folded is None for m in convs)  # dropped after each call
    with torch.no_grad():
        model.decoder.head[2].weight.mul_(2)
    assert _rel(model.decode(latent), plain[0]) > 1e-2  # the new weight is used
    monkeypatch.setattr(WanVAE, "_weights_layout", layout)
    seen.clear()
    model.decode(latent)
    assert seen and not any(seen)  # on the CPU: unfolded
    for h in hooks:
        h.remove()


def test_full_size_meta_build_matches_checkpoint_layout():
    expected = json.loads(LAYOUT.read_text())["tensors"]
    with torch.device("meta"):
        model = WanVAE()
        from diffusers import AutoencoderKLWan

        ref = AutoencoderKLWan()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected
    assert {k: list(v.shape) for k, v in diffusers_to_official(ref.state_dict()).items()} == expected
    assert model.decoder.upper_halo() == 13
    assert WanVAEConfig.from_state_dict(model.state_dict()) == WanVAEConfig()


def test_file_layouts_round_trip(tmp_path, pair):
    ref, ours = pair
    sd = ours.state_dict()
    paths = {
        "official": tmp_path / "Wan2.1_VAE.pth",
        "comfy": tmp_path / "wan_2.1_vae.safetensors",
        "comfy_vae_prefix": tmp_path / "vae_prefixed.safetensors",
        "comfy_checkpoint": tmp_path / "checkpoint.safetensors",
        "diffusers": tmp_path / "diffusion_pytorch_model.safetensors",
    }
    torch.save(sd, paths["official"])
    save_file({k: v.contiguous() for k, v in sd.items()}, paths["comfy"])
    save_file({"vae." + k: v.contiguous() for k, v in sd.items()}, paths["comfy_vae_prefix"])
    others = {"model.diffusion_model.head.head.weight": torch.zeros(4, 4)}  # another model in the same file
    save_file(
        {**{"first_stage_model." + k: v.contiguous() for k, v in sd.items()}, **others}, paths["comfy_checkpoint"]
    )
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, paths["diffusers"])

    video = torch.rand(1, 3, 5, 16, 24, generator=torch.Generator().manual_seed(4)) * 2 - 1
    want_latent = ours.encode(video)
    want_video = ours.decode(want_latent)
    for name, path in paths.items():
        assert set(load_vae_state_dict(path)) == set(sd), name
        model = load_vae(path, dtype=torch.float32)
        assert model.config == ours.config, name
        assert torch.equal(model.encode(video), want_latent), name
        assert torch.equal(model.decode(want_latent), want_video), name


def test_bf16_close_to_fp32(tmp_path, pair):
    _, ours = pair
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, path)
    model = load_vae(path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    video = torch.rand(1, 3, 5, 16, 24, generator=torch.Generator().manual_seed(5)) * 2 - 1
    latent = model.encode(video)
    assert latent.dtype == torch.float32
    assert ((latent - ours.encode(video)).norm() / ours.encode(video).norm()).item() < 5e-2
    out = model.decode(latent)
    assert ((out - ours.decode(latent)).norm() / ours.decode(latent).norm()).item() < 5e-2


def test_wrong_files_give_clear_errors(tmp_path, pair):
    _, ours = pair
    sd = {k: v.contiguous() for k, v in ours.state_dict().items()}

    not_vae = tmp_path / "dit.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4), "head.head.weight": torch.zeros(4, 4)}, not_vae)
    with pytest.raises(CheckpointError, match=r"not a Wan2\.1 VAE.*encoder\.conv1\.weight.*found 2 tensors.*blocks\.0"):
        load_vae(not_vae)

    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in sd.items() if k != "decoder.head.2.bias"}, missing)
    with pytest.raises(
        CheckpointError, match=r"missing\.safetensors.*1 missing tensors \(e\.g\. decoder\.head\.2\.bias\)"
    ):
        load_vae(missing)

    wrong_shape = tmp_path / "wrong_shape.safetensors"
    save_file({**sd, "decoder.middle.1.proj.bias": torch.zeros(5)}, wrong_shape)
    with pytest.raises(
        CheckpointError, match=r"1 tensors of the wrong shape \(e\.g\. decoder\.middle\.1\.proj\.bias \[5\]"
    ):
        load_vae(wrong_shape)

    wan22 = tmp_path / "wan2.2_vae.safetensors"
    save_file({**sd, "decoder.upsamples.0.upsamples.0.residual.2.weight": torch.zeros(1)}, wan22)
    with pytest.raises(CheckpointError, match=r"Wan2\.2 VAE"):
        load_vae(wan22)


def test_input_shapes_are_checked(pair):
    _, ours = pair
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        ours.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="16 channels"):
        ours.decode(torch.zeros(1, 4, 1, 2, 2))


def test_streaming_decode_keeps_nothing_and_hands_over_the_same_chunks():
    """keep=False: the same chunks on the VAE's device (float32), no result assembled; it needs
    on_frames and refuses tiling (whose chunks only exist at the end)."""
    model = WanVAE(WanVAEConfig(dim=4, num_res_blocks=1)).eval()
    _randomize(model, seed=2)
    latent = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(4))
    out = model.decode(latent)
    chunks = []
    assert model.decode(latent, on_frames=chunks.append, keep=False) is None
    assert [c.dtype for c in chunks] == [torch.float32] * 3
    assert torch.equal(torch.cat(chunks, dim=2), out)
    with pytest.raises(ValueError, match="on_frames"):
        model.decode(latent, keep=False)
    with pytest.raises(ValueError, match="tile_size"):
        model.decode(latent, tile_size=2, on_frames=chunks.append, keep=False)


# ---- the fused RMSNorm + SiLU kernel (vae_kernels) ------------------------------------------------
NORM_INTERP_SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
import triton_interp  # noqa: F401  (before any kernel is defined)
import torch
from wan_core.models.vae import RMSNorm
from wan_core.kernels.vae_layout import dense_rows
from wan_core.kernels.vae_kernels import launch_add_bias_residual, launch_fold_rows, launch_rms_norm_silu, launch_subpixel_rows
g = torch.Generator().manual_seed(0)
res = {{}}
for dtype in (torch.float32, torch.bfloat16):
    for c in (96, 40):  # not powers of two: masked channel tails
        norm = RMSNorm(c)
        with torch.no_grad():
            norm.gamma.copy_(1 + 0.3 * torch.randn(norm.gamma.shape, generator=g))
        norm = norm.to(dtype)
        x = (torch.randn(2, c, 3, 5, 7, generator=g) * 4).to(dtype).contiguous(memory_format=torch.channels_last_3d)
        x[0, :, 0, 0, 0] = 0  # an all-zero pixel: the norm's floor, not a division by zero
        bias = (torch.randn(c, generator=g) * 2).to(dtype)
        for silu, b in ((False, None), (True, None), (True, bias)):
            cl = dict(dtype=dtype, memory_format=torch.channels_last_3d)
            ref_tail, tail = torch.empty(2, c, 2, 5, 7, **cl), torch.empty(2, c, 2, 5, 7, **cl)
            ref = norm(x, silu=silu, bias=b, tail=ref_tail)  # the torch ops (CPU)
            got = launch_rms_norm_silu(x, norm.gamma, norm.scale, silu, bias=b, tail=tail)
            # into the chunk part of a [B, C, 2 + T, H, W] channels-last buffer, as CausalConv3d does
            buf = torch.full((2, c, 5, 5, 7), 7.0, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
            launch_rms_norm_silu(x, norm.gamma, norm.scale, silu, out=buf[:, :, 2:], bias=b)
            # time-folded [B*T, 3C, H, W] (CausalConv3d.fold_time): each frame in its three places
            fold = torch.full((2 * 3, 3 * c, 5, 7), 7.0, dtype=dtype).contiguous(memory_format=torch.channels_last)
            fold_tail = torch.empty(2, c, 2, 5, 7, **cl)
            launch_rms_norm_silu(x, norm.gamma, norm.scale, silu, bias=b, tail=fold_tail, folded=fold)
            slots = fold.unflatten(0, (2, 3)).transpose(1, 2).unflatten(1, (3, c))  # [B, 3, C, T, H, W]
            folded = (all(torch.equal(slots[:, i, :, 2 - i :], got[:, :, : 1 + i]) for i in range(3))
                      and bool((slots[:, 0, :, :2] == 7).all() and (slots[:, 1, :, :1] == 7).all())
                      and torch.equal(fold_tail, got[:, :, -2:]))
            key = f"norm {{str(dtype)[6:]}} C={{c}} silu={{silu}} bias={{b is not None}}"
            diff = (got.float() - ref.float()).abs()
            res[key] = dict(
                dense=dense_rows(x) and dense_rows(buf[:, :, 2:]) and dense_rows(got),
                exact=(diff == 0).float().mean().item(),
                rel=(diff / ref.float().abs().clamp_min(1e-30)).max().item(),
                into_buffer=torch.equal(buf[:, :, 2:], got),
                history_kept=bool((buf[:, :, :2] == 7).all()),
                tail=torch.equal(tail, got[:, :, -2:]) and torch.equal(ref_tail, ref[:, :, -2:]),
                folded=folded,
            )
        # plain copies into a time-folded buffer: two history frames (before frame 0), then a chunk
        for t in (3, 1):
            hist = torch.randn(2, c, 2, 5, 7, generator=g).to(dtype).contiguous(memory_format=torch.channels_last_3d)
            fold = torch.full((2 * t, 3 * c, 5, 7), 7.0, dtype=dtype).contiguous(memory_format=torch.channels_last)
            slots = fold.unflatten(0, (2, t)).transpose(1, 2).unflatten(1, (3, c))
            launch_fold_rows(hist, fold, shift=2)
            ok = torch.equal(slots[:, 0, :, : min(2, t)], hist[:, :, : min(2, t)]) and torch.equal(slots[:, 1, :, :1], hist[:, :, 1:])
            ok = ok and bool((slots[:, 2] == 7).all() and (slots[:, 1, :, 1:] == 7).all() and (slots[:, 0, :, 2:] == 7).all())
            xt = x[:, :, :t]
            launch_fold_rows(xt, fold, shift=0)
            ok = ok and all(torch.equal(slots[:, i, :, 2 - i :], xt[:, :, : t - 2 + i]) for i in range(3))
            ok = ok and torch.equal(slots[:, 1, :, :1], hist[:, :, 1:])  # the history kept
            res[f"fold_rows {{str(dtype)[6:]}} C={{c}} T={{t}}"] = dict(
                dense=True, exact=1.0, rel=0.0, into_buffer=ok, history_kept=True, tail=True, folded=ok)
        # the sub-pixel upsampler's phase gather: kernel vs the strided copy of the torch path
        yph = torch.randn(3, 4 * c, 5, 7, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        want = yph.as_strided((3, 4, 2, 6, 2, c), (yph.stride(0), yph.stride(2), yph.stride(2) + 2 * c, yph.stride(3),
                                                  yph.stride(3) + c, 1)).reshape(3, 8, 12, c)
        ok = torch.equal(launch_subpixel_rows(yph, torch.empty(3, 8, 12, c, dtype=dtype)), want)
        ok = ok and torch.equal(launch_subpixel_rows(yph, torch.empty(3, 8, 12, c, dtype=dtype), bias), want + bias)
        res[f"subpixel {{str(dtype)[6:]}} C={{c}}"] = dict(
            dense=True, exact=1.0, rel=0.0, into_buffer=ok, history_kept=True, tail=True, folded=ok)
        s = (torch.randn(x.shape, generator=g) * 3).to(dtype).contiguous(memory_format=torch.channels_last_3d)
        ref = (x + bias.view(-1, 1, 1, 1)) + s  # a residual block's end in torch: conv + bias, + shortcut
        got = launch_add_bias_residual(x.clone(), bias, s)
        diff = (got.float() - ref.float()).abs()
        res[f"residual {{str(dtype)[6:]}} C={{c}}"] = dict(
            dense=dense_rows(got), exact=(diff == 0).float().mean().item(),
            rel=(diff / ref.float().abs().clamp_min(1e-30)).max().item(), into_buffer=True, history_kept=True,
            tail=True, folded=True,
        )
print(json.dumps(res))
"""


@needs_triton
def test_fused_rms_norm_matches_the_torch_ops_in_the_interpreter():
    """The Triton RMSNorm (+ the previous conv's bias, + SiLU) equals the torch ops it replaces: in
    float32 but for last-bit differences of the sum; in bf16 (rounded where torch rounds) to within
    one bf16 step, nearly always exactly; written into a slice of the causal conv's buffer its
    history is kept; the last frames written to a separate tail too (the next chunk's history) are
    the output's; written time-folded, each frame lands in its three slots and nothing else is
    touched (so do the history frames and an un-normed chunk copied by `fold_rows`, 1- and
    3-frame chunks). The residual kernel (bias + shortcut) is exact, and so is the sub-pixel
    upsampler's phase gather (against the torch path's strided copy)."""
    res = run_interpreted(NORM_INTERP_SCRIPT)
    assert len(res) == 28
    for key, r in res.items():
        assert r["dense"] and r["into_buffer"] and r["history_kept"] and r["tail"] and r["folded"], (key, r)
        if key.startswith(("residual", "fold_rows", "subpixel")):
            assert r["exact"] == 1.0, (key, r)  # two rounded adds, or copies: nothing to differ in
        elif "float32" in key:
            assert r["rel"] < 1e-5, (key, r)
        else:
            assert r["rel"] <= 2**-7 and r["exact"] > 0.97, (key, r)


SOFTMAX_INTERP_SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
import triton_interp  # noqa: F401  (before any kernel is defined)
import torch
from wan_core.kernels.vae_kernels import launch_softmax_rows
g = torch.Generator().manual_seed(0)
res = []
for rows, cols in ((3, 100), (2, 1000)):  # masked tails of 128- and 1024-wide tiles
    s = torch.randn(rows, cols, generator=g) * 30
    for dtype in (torch.float32, torch.bfloat16):
        got = launch_softmax_rows(s, 0.05, dtype)
        want = torch.softmax(s.double() * 0.05, dim=-1)
        res.append([str(dtype), got.dtype == dtype, ((got.double() - want).abs() / want.clamp(min=1e-30)).max().item()])
print(json.dumps(res))
"""


@needs_triton
def test_attention_softmax_kernel_in_the_interpreter():
    """The mid-block attention's one-pass softmax (scaled float32 scores in, weights out): float32
    to float32 rounding of the exact softmax, bf16 to one bf16 rounding."""
    for dtype, kept, rel in run_interpreted(SOFTMAX_INTERP_SCRIPT):
        assert kept and rel < (1e-5 if dtype == "torch.float32" else 2**-8), (dtype, rel)


@needs_triton
def test_fused_rms_norm_compiles_for_hopper():
    """Every variant the VAE launches (bf16 and float32, with and without SiLU, bias and tail,
    time-folded or not, 96-384 channels; the residual kernel) compiles to an sm_90 cubin on this CPU machine."""
    from wan_core.kernels.vae_kernels import add_bias_residual, fold_rows, rms_norm_silu, softmax_rows, subpixel_rows

    for out, block, warps in (("*bf16", 16384, 16), ("*bf16", 8192, 8), ("*fp32", 1024, 4)):
        sig = {"s_ptr": "*fp32", "p_ptr": out, "L": "i32", "scale_log2": "fp32"}
        assert "cubin" in compile_for_hopper(softmax_rows, sig, {"BLOCK": block}, warps).asm

    for t in ("bf16", "fp32"):
        sig = {"x_ptr": f"*{t}", "bias_ptr": f"*{t}", "g_ptr": f"*{t}", "o_ptr": f"*{t}", "t_ptr": f"*{t}", "R": "i32",
               "C": "i32", "x_bstride": "i64", "o_bstride": "i64", "scale": "fp32", "t_start": "i32", "t_off": "i64", "t_bstride": "i64",
               "frame_rows": "i32"}
        fold_sig = {"x_ptr": f"*{t}", "o_ptr": f"*{t}", "R": "i32", "C": "i32", "x_bstride": "i64", "o_bstride": "i64",
                    "frame_rows": "i32", "out_rows": "i32", "shift_rows": "i32"}
        sub_sig = {"y_ptr": f"*{t}", "bias_ptr": f"*{t}", "o_ptr": f"*{t}", "H": "i32", "W": "i32", "O": "i32",
                   "y_bstride": "i64", "o_bstride": "i64"}
        res_sig = {"h_ptr": f"*{t}", "bias_ptr": f"*{t}", "s_ptr": f"*{t}", "R": "i32", "C": "i32", "h_bstride": "i64",
                   "s_bstride": "i64"}
        for block_c in (4, 128, 256, 512):
            for silu, bias, tail, fold in ((False, False, False, False), (True, False, True, False),
                                           (True, True, False, False), (True, True, True, False), (True, True, True, True),
                                           (True, False, False, True)):
                consts = {"HAS_BIAS": bias, "SILU": silu, "TAIL": tail, "FOLD": fold, "BLOCK_R": 4096 // block_c,
                          "BLOCK_C": block_c}
                assert "cubin" in compile_for_hopper(rms_norm_silu, sig, consts, 4).asm
            consts = {"BLOCK_R": 4096 // block_c, "BLOCK_C": block_c}
            assert "cubin" in compile_for_hopper(add_bias_residual, res_sig, consts, 4).asm
            assert "cubin" in compile_for_hopper(fold_rows, fold_sig, consts, 4).asm
            for bias in (False, True):
                assert "cubin" in compile_for_hopper(subpixel_rows, sub_sig, {**consts, "HAS_BIAS": bias}, 4).asm


def test_dense_rows_accepts_only_the_layouts_the_kernel_indexes():
    from wan_core.kernels.vae_layout import dense_rows

    cl = torch.empty(2, 8, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d)
    buf = torch.empty(2, 8, 5, 4, 5).contiguous(memory_format=torch.channels_last_3d)
    assert dense_rows(cl) and dense_rows(buf[:, :, 2:]) and dense_rows(buf[:1])
    assert not dense_rows(torch.empty(2, 8, 3, 4, 5))  # channels-first
    assert not dense_rows(buf[:, :4])  # a channel slice: rows no longer dense
    assert not dense_rows(buf[..., 1:])  # a width slice
    assert not dense_rows(torch.empty(2, 8, 4, 5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_mid_block_attention_as_gemms():
    """On CUDA (float32 scores from the bf16 GEMM, Wan's head dim 384, a 720p frame's worth of
    rows in query blocks): as close to the float32 attention as the memory-efficient SDPA kernel."""
    from wan_core.kernels import vae_forms

    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(2, 1, 4000, 3 * 384, generator=g, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.chunk(3, dim=-1)  # strided views, as the block hands them
    truth = vae_forms.attention(q.float(), k.float(), v.float())
    got, sdpa = vae_forms.attention_cuda(q, k, v), vae_forms.attention(q, k, v)
    assert got.dtype == torch.bfloat16
    assert _rel(got.float(), truth) <= 1.2 * _rel(sdpa.float(), truth), (_rel(got.float(), truth), _rel(sdpa.float(), truth))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_decode_and_encode_with_the_fused_norm_equal_the_torch_ops(dtype, monkeypatch):
    """On a GPU (channels-last) the VAE's norms and residual adds run as the Triton kernels, the
    convs' biases folded into them, the 3- and 16-channel convs time-folded: decode and encode give what
    the torch ops and 3-D convs give (float32: to rounding; 16-bit: as close to the float32 result
    as the torch path), tiled decoding too, and the kernels really ran
    (counted)."""
    from wan_core.kernels import vae_forms, vae_kernels

    model = WanVAE(WanVAEConfig(dim=8), channels_last=True).eval()
    _randomize(model, seed=1)
    model = model.to("cuda", dtype)
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(1, 16, 3, 6, 10, generator=g).cuda()
    video = (torch.rand(1, 3, 9, 48, 80, generator=g) * 2 - 1).cuda()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # or 1-ulp differences grow to 1e-3
    launches = []
    for name in ("launch_rms_norm_silu", "launch_add_bias_residual"):
        real = getattr(vae_kernels, name)

        def counted(*a, real=real, name=name, **k):
            launches.append(name + (" folded" if k.get("folded") is not None else ""))
            return real(*a, **k)

        monkeypatch.setattr(vae_kernels, name, counted)
    monkeypatch.setattr(vae_forms, "FOLD_TIME_CHANNELS", {3, 16})  # some convs time-folded, as 3 and 96 are at full size
    monkeypatch.setattr(vae_forms, "FOLD_MIN_OUT", 1)
    fused = model.decode(latent), model.encode(video), model.decode(latent, tile_size=4)
    assert launches.count("launch_rms_norm_silu") > 50 and launches.count("launch_add_bias_residual") > 20
    assert launches.count("launch_rms_norm_silu folded") > 10
    monkeypatch.setattr(vae_forms, "FOLD_TIME_CHANNELS", set())
    monkeypatch.setattr(vae_forms, "HAS_TRITON", False)  # the torch per-pixel passes (`vae_forms.TORCH_OPS`)
    plain = model.decode(latent), model.encode(video), model.decode(latent, tile_size=4)
    if dtype == torch.float32:
        for a, b in zip(fused, plain):
            assert _rel(a, b) < 1e-5, _rel(a, b)
        return
    # 16-bit: the paths round differently (through ~30 layers), so each is compared with the
    # float32 result: the kernels' path may not stray further from it than the torch path (with a
    # margin for the noise of noise; bf16's torch path is ~0.08 away, fp16's ~0.01)
    exact = model.float()
    truth = exact.decode(latent), exact.encode(video), exact.decode(latent, tile_size=4)
    floor = {torch.bfloat16: 1e-2, torch.float16: 1.5e-3}[dtype]
    for a, b, ref in zip(fused, plain, truth):
        assert _rel(a.float(), ref) < max(1.5 * _rel(b.float(), ref), floor), (_rel(a.float(), ref), _rel(b.float(), ref))
