"""Wan2.2 through the ComfyUI nodes, headless, on tiny Wan2.2 models under ComfyUI's file names.

The node graph a user builds (two loaders, a 4-step LoRA on each, the two-expert sampler; TI2V-5B
through WanSampler) must give the latent `WanPipeline` gives with the same settings (LightX2V's
`wan2.2_moe_distill` / `wan2.2_moe` / `wan2.2` model classes, per-expert `lora_configs`): the
same engine behind two doors. The loaders tell the models apart from their files; wrong pairings
are one-line errors before any weights are read.
"""

from __future__ import annotations

import os

import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS, compat
from tests.comfyui_helpers import WAN22_LORAS, populate_models
from wan_core.api import ModelFamilyError, latent_from_raw, latent_to_raw
from wan_core.video import frames_to_wan

N = NODE_CLASS_MAPPINGS
T5, VAE21, VAE22 = "umt5_xxl_fp16.safetensors", "wan_2.1_vae.safetensors", "wan2.2_vae.safetensors"
EXPERT = {(t, e): f"wan2.2_{t}_{e}_noise_14B_fp16.safetensors" for t in ("t2v", "i2v") for e in ("high", "low")}
TI2V, T2V21, I2V21 = "wan2.2_ti2v_5B_fp16.safetensors", "wan2.1_t2v_14B_bf16.safetensors", "wan2.1_i2v_480p_14B_bf16.safetensors"
W, H, F = 64, 48, 5  # tiny video (TI2V-5B: 64 x 32, multiples of 32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy22")
    made, _ = populate_models(str(root / "models"), str(root / "scratch"))
    compat.set_models_root(str(root / "models"))
    yield {"root": root, "made": made}
    compat.set_models_root()
    compat.set_progress_hook(None)


def _load(dit, vae=VAE21, clip="(none)", task="auto"):
    return N["WanModelLoader"]().load(dit, T5, vae, clip, task=task)[0]


def _experts(task, loras=True, strength=1.0):
    """(high, low) specs as the template wires them: a loader per expert, each with its own LoRA."""
    out = []
    for e in ("high", "low"):
        spec = _load(EXPERT[(task, e)])
        if loras:
            spec = N["WanLoraApply"]().apply(spec, WAN22_LORAS[(task, e)], strength)[0]
        out.append(spec)
    return tuple(out)


def _text(model, negative="blurry"):
    return N["WanTextEncode"]().encode(model, "a fox", negative)["result"][0]


def _moe(high, low, text, steps=4, cfg=(1.0, 1.0), shift=5.0, scheduler="distill", switch="step", boundary=0.0,
         switch_step=2, seed=7, step_list="1000,750,500,250", image_embeds=None):  # fmt: skip
    out = N["WanSamplerMoE"]().sample(high, low, text, W, H, F, steps, cfg[0], cfg[1], shift, scheduler, switch,
                                      boundary, switch_step, seed, step_list, image_embeds=image_embeds)  # fmt: skip
    return out["result"][0]["samples"], out["ui"]["wan_timing"]


def _image(h=40, w=72, seed=0):
    """A ComfyUI IMAGE [1, H, W, 3] of exact 8-bit values (what Load Image gives)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, h, w, 3), generator=g).float() / 255


def _pipeline(models, model_cls, task, **params):
    """WanPipeline over the same ComfyUI models folder and files."""
    from wan_core.pipeline import WanPipeline

    m = os.path.join(str(models["root"]), "models")
    files = {"t5_path": os.path.join(m, "text_encoders", T5)}
    if model_cls == "wan2.2":
        files |= {"dit_path": os.path.join(m, "diffusion_models", TI2V), "vae_path": os.path.join(m, "vae", VAE22)}
    else:
        files |= {
            "high_noise_path": os.path.join(m, "diffusion_models", EXPERT[(task, "high")]),
            "low_noise_path": os.path.join(m, "diffusion_models", EXPERT[(task, "low")]),
            "vae_path": os.path.join(m, "vae", VAE21),
        }
    pipe = WanPipeline(m, model_cls, task, **files)
    return pipe.create_generator(**params)


def _lora_configs(models, task):
    m = os.path.join(str(models["root"]), "models", "loras")
    return [{"name": f"{e}_noise_model", "path": os.path.join(m, WAN22_LORAS[(task, e)]), "strength": 1.0}
            for e in ("high", "low")]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# loaders


def test_loader_tells_the_wan22_models_apart(models, monkeypatch):
    import wan_core.loading.dit as dit_loading

    monkeypatch.setattr(dit_loading, "load_dit", lambda *a, **k: pytest.fail("the loader node must not load weights"))
    listed = N["WanModelLoader"].INPUT_TYPES()["required"]
    assert {*EXPERT.values(), TI2V} <= set(listed["dit"][0]) and VAE22 in listed["vae"][0]
    assert set(WAN22_LORAS.values()) <= set(N["WanLoraApply"].INPUT_TYPES()["required"]["lora"][0])
    for (task, _), name in EXPERT.items():  # the I2V expert needs no CLIP file: Wan2.2 has none
        spec = _load(name)
        assert (spec.task, spec.clip, spec.expert, os.path.basename(spec.vae)) == (task, None, None, VAE21)
    ti2v = _load(TI2V, VAE22)
    assert (ti2v.task, ti2v.clip, os.path.basename(ti2v.vae)) == ("ti2v", None, VAE22)
    assert _load(TI2V, VAE22, task="ti2v") == ti2v
    # a wrong VAE, a CLIP file, a wrong task: one line each
    with pytest.raises(ModelFamilyError, match=r"is the Wan2\.1 VAE \(16 latent channels\).*TI2V-5B.*wan2\.2_vae"):
        _load(TI2V, VAE21)
    with pytest.raises(ModelFamilyError, match=r"is the Wan2\.2 VAE \(48 latent channels\).*I2V-A14B expert"):
        _load(EXPERT[("i2v", "high")], VAE22)
    with pytest.raises(ValueError, match=r"I2V-A14B expert, which uses no CLIP image encoder: set clip_vision to \(none\)"):
        _load(EXPERT[("i2v", "low")], clip="clip_vision_h.safetensors")
    with pytest.raises(ValueError, match="is a TI2V model but task is set to t2v"):
        _load(TI2V, VAE22, task="t2v")


def test_wan_ai_expert_folders_are_listed_and_loaded(models, tmp_path):
    """A Wan-AI A14B folder in diffusion_models/: its two experts are listed as 'name/high_noise_model/'
    and 'name/low_noise_model/'; '(from model folder)' takes the T5 and VAE beside them."""
    from wan_core.loading.tiny import write_tiny_model

    extra = tmp_path / "models"
    write_tiny_model(extra / "diffusion_models" / "Wan2.2-T2V-A14B", "t2v", "wan", family="wan2.2")
    compat.set_models_root(str(models["root"] / "models"), str(extra))
    try:
        choices = N["WanModelLoader"].INPUT_TYPES()["required"]["dit"][0]
        assert {"Wan2.2-T2V-A14B/high_noise_model/", "Wan2.2-T2V-A14B/low_noise_model/"} <= set(choices)
        assert "Wan2.2-T2V-A14B/" not in choices
        spec = N["WanModelLoader"]().load("Wan2.2-T2V-A14B/low_noise_model/", "(from model folder)",
                                          "(from model folder)", "(none)")[0]  # fmt: skip
        root = extra / "diffusion_models" / "Wan2.2-T2V-A14B"
        assert spec.task == "t2v" and spec.vae == str(root / "Wan2.1_VAE.pth")
        assert spec.t5 == str(root / "models_t5_umt5-xxl-enc-bf16.pth")
    finally:
        compat.set_models_root(str(models["root"] / "models"))


# ----------------------------------------------------------------------------------------------
# the node graphs equal the pipeline


@pytest.mark.parametrize("mode", ["distill_step", "base_boundary"])
def test_t2v_two_experts_with_their_loras_equal_the_pipeline(models, mode):
    """T2V-A14B: loaders + a LoRA per expert + WanSamplerMoE give WanPipeline's latent, for ComfyUI's
    4-step path (distill schedule, step split at 2, no CFG; LightX2V wan2.2_moe_distill with
    per-expert lora_configs) and for the official base rule (UniPC, boundary 0 = 0.875, each expert
    its own CFG scale; wan2.2_moe with sample_guide_scale [high, low])."""
    from wan_core.model_cache import memory_report

    high, low = _experts("t2v")
    text = _text(high)
    size = dict(target_height=H, target_width=W, target_video_length=F)
    if mode == "distill_step":
        raw, ui = _moe(high, low, text)
        pipe = _pipeline(models, "wan2.2_moe_distill", "t2v", lora_configs=_lora_configs(models, "t2v"), **size)
        assert ui[-1]["experts"] == "2 of 4 steps on the high-noise expert (step < 2)"
    else:
        raw, ui = _moe(high, low, text, steps=3, cfg=(4.0, 3.0), shift=12.0, scheduler="unipc", switch="boundary")
        pipe = _pipeline(models, "wan2.2_moe", "t2v", lora_configs=_lora_configs(models, "t2v"), infer_steps=3,
                         sample_guide_scale=[4.0, 3.0], **size)  # fmt: skip
        assert ui[-1]["experts"].endswith("(t >= 875)")
    result = pipe.generate(seed=7, prompt="a fox", negative_prompt="blurry", return_latent=True)
    assert raw.shape == (1, 16, 2, H // 8, W // 8)
    torch.testing.assert_close(latent_from_raw(raw), result.latent, rtol=1e-5, atol=1e-5)
    assert {"dit_high", "dit_low"} <= set(memory_report())  # each expert in its own cache slot
    if mode == "distill_step":  # each expert really runs with its own LoRA
        plain, _ = _moe(*_experts("t2v", loras=False), text)
        swapped_loras = [N["WanLoraApply"]().apply(_load(EXPERT[("t2v", e)]), WAN22_LORAS[("t2v", o)], 1.0)[0]
                         for e, o in (("high", "low"), ("low", "high"))]  # fmt: skip
        swapped, _ = _moe(*swapped_loras, text)
        assert not torch.allclose(plain, raw) and not torch.allclose(swapped, raw)
        again, _ = _moe(high, low, text)
        assert torch.equal(again, raw)


def test_i2v_two_experts_equal_the_pipeline(models):
    """I2V-A14B: WanImageEncode on an expert (y only, no CLIP) + WanSamplerMoE == WanPipeline i2v."""
    high, low = _experts("i2v")
    image = _image()
    emb = N["WanImageEncode"]().encode(high, image, W, H, F)["result"][0]
    assert emb.cond.clip_fea is None and emb.cond.y.shape[1] == 20
    raw, ui = _moe(high, low, _text(high), image_embeds=emb)
    pipe = _pipeline(models, "wan2.2_moe_distill", "i2v", lora_configs=_lora_configs(models, "i2v"),
                     target_height=H, target_width=W, target_video_length=F)  # fmt: skip
    start = frames_to_wan(image)[:, 0]  # the same pixels the node encoded, [3, H, W] in [-1, 1]
    result = pipe.generate(seed=7, prompt="a fox", image=start, return_latent=True)
    assert raw.shape[-2:] == (emb.height // 8, emb.width // 8)
    torch.testing.assert_close(latent_from_raw(raw), result.latent, rtol=1e-5, atol=1e-5)
    frames = N["WanVAEDecode"]().decode(high, {"samples": raw})["result"][0]
    torch.testing.assert_close(frames, result.frames, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_image", [False, True])
def test_ti2v_5b_through_wan_sampler_equals_the_pipeline(models, with_image):
    """TI2V-5B, text only or text + image (the image's latent held as frame 0): WanSampler's
    48-channel latent (raw, Wan2.2 statistics) and WanVAEDecode's frames equal WanPipeline 'wan2.2'."""
    model = _load(TI2V, VAE22)
    text = _text(model)
    image = _image(seed=1)
    emb = N["WanImageEncode"]().encode(model, image, W, 32, F)["result"][0] if with_image else None
    out = N["WanSampler"]().sample(model, text, W, 32, F, 2, 5.0, 5.0, "unipc", 9, image_embeds=emb)
    raw = out["result"][0]["samples"]
    assert raw.shape == (1, 48, 2, 2, 4)
    pipe = _pipeline(models, "wan2.2", "i2v" if with_image else "t2v", infer_steps=2, target_height=32,
                     target_width=W, target_video_length=F)  # fmt: skip
    kw = {"image": frames_to_wan(image)[:, 0]} if with_image else {}
    result = pipe.generate(seed=9, prompt="a fox", negative_prompt="blurry", return_latent=True, **kw)
    torch.testing.assert_close(latent_from_raw(raw), result.latent, rtol=1e-5, atol=1e-5)
    if with_image:  # latent frame 0 is the image's latent, exactly
        assert torch.equal(latent_from_raw(raw)[:, :, :1], latent_from_raw(latent_to_raw(emb.cond.z)))
    frames = N["WanVAEDecode"]().decode(model, out["result"][0])["result"][0]
    assert frames.shape == (F, 32, W, 3)
    torch.testing.assert_close(frames, result.frames, rtol=1e-4, atol=1e-4)


def test_core_conditioning_drives_the_two_expert_sampler(models):
    """positive / negative from core CLIPTextEncode instead of text_embeds, as for WanSampler: the
    same features give the same latent."""
    high, low = _experts("t2v")
    text = _text(high)
    want, _ = _moe(high, low, text, cfg=(2.0, 1.0), switch_step=1)
    core = N["WanSamplerMoE"]().sample(
        high, low, None, W, H, F, 4, 2.0, 1.0, 5.0, "distill", "step", 0.0, 1, 7, "1000,750,500,250",
        positive=[[text.positive[None], {}]], negative=[[text.negative[None], {}]],
    )["result"][0]["samples"]  # fmt: skip
    assert torch.equal(core, want)
    with pytest.raises(ValueError, match="guidance > 1 needs a negative prompt"):
        N["WanSamplerMoE"]().sample(high, low, None, W, H, F, 4, 1.0, 3.0, positive=[[text.positive[None], {}]])


def test_raw_latents_use_each_vae_statistics():
    """LATENT carries raw latents: 48 channels with the Wan2.2 VAE's mean/std, 16 with the Wan2.1 VAE's."""
    from wan_core.models.vae22 import WAN22_LATENT_MEAN, WAN22_LATENT_STD

    z = torch.zeros(1, 48, 1, 1, 1)
    z[0, 5] = 1.0
    raw = latent_to_raw(z)
    assert raw[0, 0].item() == pytest.approx(WAN22_LATENT_MEAN[0])
    assert raw[0, 5].item() == pytest.approx(WAN22_LATENT_MEAN[5] + WAN22_LATENT_STD[5])
    torch.testing.assert_close(latent_from_raw(raw), z)
    with pytest.raises(ValueError, match="16 channels .* or 48"):
        latent_to_raw(torch.zeros(1, 12, 1, 1, 1))


# ----------------------------------------------------------------------------------------------
# progress, previews, cancel


def test_two_expert_sampler_reports_progress_previews_and_stops_on_cancel(models):
    high, low = _experts("t2v")
    text = _text(high)
    seen = []
    compat.set_progress_hook(lambda v, t, p: seen.append((v, t, p)), previews=True)
    try:
        _, ui = _moe(high, low, text)
    finally:
        compat.set_progress_hook(None)
    assert [(v, t) for v, t, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    fmt, image, _ = seen[-1][2]
    assert fmt == "JPEG" and image.size == (W // 8, H // 8)
    assert [r["stage"] for r in ui] == ["load DiT", "sample"] and ui[1]["steps"] == 4

    steps = []

    def cancel(v, t, p):
        steps.append(v)
        compat.request_cancel()

    compat.set_progress_hook(cancel)
    try:
        with pytest.raises(compat.Interrupted):
            _moe(high, low, text, seed=8)
    finally:
        compat.set_progress_hook(None)
    assert steps == [1]


# ----------------------------------------------------------------------------------------------
# clear errors before any work


@pytest.fixture
def no_weights(monkeypatch):
    """Any DiT load fails the test: the errors below must come from file headers and names alone."""
    import wan_core.loading.dit as dit_loading

    monkeypatch.setattr(dit_loading, "load_dit", lambda *a, **k: pytest.fail("weights were read before the error"))


def test_wrong_expert_pairings_are_one_line_errors(models, no_weights):
    high, low = _experts("t2v")
    text = _text(high)
    with pytest.raises(ValueError, match="same model .* is connected as both experts"):
        _moe(high, high, text)
    with pytest.raises(ModelFamilyError, match="experts are swapped"):
        _moe(low, high, text)
    with pytest.raises(ModelFamilyError, match=r"high-noise expert .*wan2\.1_t2v_14B_bf16.* is a Wan2\.1 T2V DiT"):
        _moe(_load(T2V21), low, text)
    i2v21 = _load(I2V21, clip="clip_vision_h.safetensors")
    with pytest.raises(ModelFamilyError, match=r"low-noise expert .* is a Wan2\.1 I2V DiT \(it has the CLIP image branch"):
        _moe(_experts("i2v")[0], i2v21, text)
    with pytest.raises(ValueError, match="TI2V-5B model, which is one model.*WanSampler"):
        _moe(_load(TI2V, VAE22), low, text)
    with pytest.raises(ValueError, match="high_noise_model is a T2V expert but low_noise_model is for I2V"):
        _moe(high, _experts("i2v")[1], text)
    with pytest.raises(ValueError, match="switch_step 4 puts all 4 steps on the high-noise expert"):
        _moe(high, low, text, switch_step=4)
    with pytest.raises(ValueError, match="boundary is a fraction"):
        _moe(high, low, text, switch="boundary", boundary=1.5)


def test_wrong_image_inputs_are_one_line_errors(models, no_weights):
    hi, lo = _experts("i2v", loras=False)
    text = _text(hi)
    with pytest.raises(ValueError, match="image-to-video model: connect a WanImageEncode"):
        _moe(hi, lo, text)
    from nodes.types import ImageEmbeds
    from wan_core.api import I2VCondition, TI2VCondition

    wan21 = ImageEmbeds(I2VCondition(torch.zeros(1, 20, 2, 6, 8), torch.zeros(1, 257, 32), 48, 64), F)
    with pytest.raises(ValueError, match=r"made for Wan2\.1 I2V \(with CLIP\) but this model is Wan2\.2 I2V-A14B"):
        _moe(hi, lo, text, image_embeds=wan21)
    ti2v = ImageEmbeds(TI2VCondition(torch.zeros(1, 48, 1, 1, 2), 32, 64), F)
    with pytest.raises(ValueError, match="made for TI2V-5B, not for this I2V model"):
        _moe(hi, lo, text, image_embeds=ti2v)
    five = _load(TI2V, VAE22)
    i2v22 = ImageEmbeds(I2VCondition(torch.zeros(1, 20, 2, 6, 8), None, 48, 64), F)
    with pytest.raises(ValueError, match="made for an I2V model, not for TI2V-5B"):
        N["WanSampler"]().sample(five, text, W, 32, F, 1, 5.0, 5.0, "unipc", 0, image_embeds=i2v22)
    with pytest.raises(ValueError, match="multiples of 32"):
        N["WanSampler"]().sample(five, text, W, H, F, 1, 5.0, 5.0, "unipc", 0)
    with pytest.raises(ValueError, match="multiples of 32"):  # before any worker starts
        N["WanMultiGPUSampler"]().sample(five, text, W, H, F, 1, 5.0, 5.0, "unipc", 0, num_gpus=2)
    t2v = _experts("t2v", loras=False)[0]
    with pytest.raises(ValueError, match="needs an image-to-video model .* or Wan2.2 TI2V-5B"):
        N["WanImageEncode"]().encode(t2v, _image(), W, H, F)


def test_decoding_with_the_wrong_vae_is_a_clear_error(models):
    five, a14b = _load(TI2V, VAE22), _experts("t2v", loras=False)[0]
    with pytest.raises(ValueError, match="the latent has 48 channels but this model's VAE .* decodes 16"):
        N["WanVAEDecode"]().decode(a14b, {"samples": torch.zeros(1, 48, 2, 2, 4)})
    with pytest.raises(ValueError, match="the latent has 16 channels but this model's VAE .* decodes 48"):
        N["WanVAEDecode"]().decode(five, {"samples": torch.zeros(1, 16, 2, 6, 8)})
    with pytest.raises(ValueError, match="tiled decoding is not available for the Wan2.2 VAE"):
        N["WanVAEDecode"]().decode(five, {"samples": torch.zeros(1, 48, 2, 2, 4)}, tile_size=8)


def test_two_expert_multi_gpu_sampler_equals_the_one_process_sampler(models):
    """The worker group (2 CPU processes, Ulysses 2, then CFG parallel) with both experts and their
    LoRAs: each rank leases both, the switch and each expert's guidance travel with the request."""
    from wan_core.layers.parallel.workers import shutdown_worker_groups

    high, low = _experts("t2v")
    text = _text(high)
    try:
        for cfg, extra in (((1.0, 1.0), dict(ulysses_degree=2)), ((4.0, 3.0), dict(ulysses_degree=1, cfg_parallel=True))):
            ref, _ = _moe(high, low, text, cfg=cfg)
            out = N["WanMultiGPUSamplerMoE"]().sample(high, low, text, W, H, F, 4, cfg[0], cfg[1], 5.0, "distill",
                                                      "step", 0.0, 2, 7, "1000,750,500,250", num_gpus=2, **extra)  # fmt: skip
            torch.testing.assert_close(out["result"][0]["samples"], ref, rtol=1e-5, atol=1e-5)
    finally:
        shutdown_worker_groups()


def _comfy_fp8_scaled(src: str, dst: str) -> None:
    """ComfyUI's repackaged `*_fp8_scaled` form of an expert file: block linears in e4m3 with one
    `scale_weight` per tensor and the `scaled_fp8` marker, everything else as it was."""
    from safetensors.torch import save_file

    from wan_core.layers.fp8 import is_block_linear
    from wan_core.loading.io import read_state_dict

    pre, out = "model.diffusion_model.", {}
    for k, v in read_state_dict(src).items():
        name = k.removeprefix(pre).removesuffix(".weight")
        if k.endswith(".weight") and is_block_linear(name):
            scale = v.float().abs().amax() / 448.0
            out[k], out[f"{pre}{name}.scale_weight"] = (v.float() / scale).to(torch.float8_e4m3fn), scale.reshape(())
        else:
            out[k] = v
    out[pre + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(out, dst)


def test_comfyui_fp8_scaled_experts_through_the_loader(models):
    """ComfyUI's own Wan2.2 templates load the `wan2.2_t2v_{high,low}_noise_14B_fp8_scaled` files: the
    loader runs them as FP8 experts (both roles read off the names), the two-expert sampler equals
    WanPipeline given the same two files, and the FP8 run stays near the fp16 experts' run."""
    from wan_core.model_cache import lease

    folder = os.path.join(str(models["root"]), "models", "diffusion_models")
    names = {}
    for e in ("high", "low"):
        names[e] = EXPERT[("t2v", e)].replace("_fp16.", "_fp8_scaled.")
        _comfy_fp8_scaled(os.path.join(folder, EXPERT[("t2v", e)]), os.path.join(folder, names[e]))
    try:
        high, low = (_load(names[e]) for e in ("high", "low"))
        text = _text(high)
        raw, ui = _moe(high, low, text)
        with lease(high.replace(expert="high")) as hi:
            assert any(type(m).__name__ == "FP8Linear" for m in hi.modules())
        from wan_core.pipeline import WanPipeline

        m = os.path.join(str(models["root"]), "models")
        pipe = WanPipeline(m, "wan2.2_moe_distill", "t2v", t5_path=os.path.join(m, "text_encoders", T5),
                           vae_path=os.path.join(m, "vae", VAE21), high_noise_path=os.path.join(folder, names["high"]),
                           low_noise_path=os.path.join(folder, names["low"]))  # fmt: skip
        pipe.create_generator(target_height=H, target_width=W, target_video_length=F)
        result = pipe.generate(seed=7, prompt="a fox", negative_prompt="blurry", return_latent=True)
        torch.testing.assert_close(latent_from_raw(raw), result.latent, rtol=1e-5, atol=1e-5)
        fp16, _ = _moe(*_experts("t2v", loras=False), text)
        err = ((raw - fp16).norm() / fp16.norm()).item()
        assert 0 < err < 0.1, err  # FP8 weights: close to, not equal to, the 16-bit run
    finally:
        for n in names.values():
            os.remove(os.path.join(folder, n))
