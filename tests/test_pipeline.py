"""Whole runs of WanPipeline against diffusers' WanPipeline / WanImageToVideoPipeline.

One tiny random model is written twice by `wan_core.loading.tiny` with the same values: in the Wan-AI
layout (what our pipeline loads) and in the diffusers layout, which diffusers loads with its own
`from_pretrained` (so the layout writer is checked too: a mis-mapped name would leave a random
weight in diffusers and the outputs would differ). Both sides get the same prompt, image and noise
(`latents=`) in fp32.

Compared, T2V: the text path (diffusers runs its own tokenizer call, UMT5 encoder, trimming and
zero padding), the transformer, the scheduler, CFG, and the VAE decode: final latents and decoded
frames. diffusers' schedulers are fed the grids of the reference implementations: UniPC on the
official Wan grid (diffusers' default starts at sigma 1.0, the official one at 0.999), and Euler on
LightX2V's distill list `[1000, 750, 500, 250] / 1000`, shifted by diffusers' own shift formula.

Compared, I2V: diffusers prepares the image itself in a way the official code does not (PIL resize
to the requested size, CLIPImageProcessor crop), so it is given what the official recipe feeds the
models: the image already bicubic-resized to the size `fit_to_area` chose (its own `preprocess` then
leaves it unchanged), and, through its `encode_image` hook, the penultimate hidden state of its
own CLIPVisionModel on the official CLIP preprocessing of the original image. From there diffusers
builds the mask and the first-frame latent (`prepare_latents`, compared directly with our `y`),
and runs the transformer, scheduler, CFG and VAE decode (final latents and frames compared).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wan_core.loading.tiny import write_tiny_model
from wan_core.model_cache import clear_cache, lease
from wan_core.models.conditioning import resize_image
from wan_core.options import DEFAULT_NEGATIVE_PROMPT
from wan_core.pipeline import WanPipeline
from wan_core.sampling.loop import make_noise
from wan_core.spec import ModelSpec

from .test_schedulers import diffusers_unipc, official_unipc_grid

PROMPT = "a red fox running through the snowy forest, cinematic"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        (task, layout): write_tiny_model(root / f"{task}-{layout}", task, layout, seed=3)
        for task in ("t2v", "i2v")
        for layout in ("wan", "diffusers")
    }


def _diffusers(path, cls_name):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = getattr(diffusers, cls_name).from_pretrained(str(path), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _FixedGrid:
    """Make a diffusers scheduler use a given (unshifted) sigma grid whatever step count it is asked for."""

    @staticmethod
    def install(sched, grid):
        base = type(sched).set_timesteps

        def set_timesteps(num_inference_steps=None, device=None, **_):
            base(sched, sigmas=np.asarray(grid, dtype=np.float64), device=device)

        sched.set_timesteps = set_timesteps
        return sched


def _capture_last_latent():
    box = {}

    def cb(pipe, i, t, kw):
        box["latents"] = kw["latents"].clone()
        return kw

    return box, cb


def _ours(model_path, task, seed, image=None, **params):
    pipe = WanPipeline(model_path, task=task, dtype="fp32", device="cpu").create_generator(**params)
    return pipe, pipe.generate(seed, PROMPT, image_path=image, return_latent=True)


def _frames_of(diffusers_out):
    return diffusers_out.frames[0].permute(0, 2, 3, 1)  # [T, C, H, W] -> [T, H, W, C] in [0, 1]


T2V = dict(target_video_length=5, target_height=32, target_width=48)


def test_t2v_distill_4_steps_equals_diffusers(models):
    from diffusers import FlowMatchEulerDiscreteScheduler

    _, res = _ours(models["t2v", "wan"], "t2v", 7, infer_steps=4, denoising_step_list=[1000, 750, 500, 250],
                   sample_shift=5.0, enable_cfg=False, **T2V)  # fmt: skip
    ref = _diffusers(models["t2v", "diffusers"], "WanPipeline")
    ref.scheduler = _FixedGrid.install(FlowMatchEulerDiscreteScheduler(shift=5.0), [1.0, 0.75, 0.5, 0.25])
    box, cb = _capture_last_latent()
    noise = make_noise((1, 16, 2, 4, 6), 7)
    with torch.no_grad():
        out = ref(prompt=PROMPT, height=32, width=48, num_frames=5, num_inference_steps=4, guidance_scale=1.0,
                  latents=noise.clone(), output_type="pt", callback_on_step_end=cb)  # fmt: skip
    assert res.latent.shape == box["latents"].shape == (1, 16, 2, 4, 6)
    err = rel_err(res.latent, box["latents"])
    assert err <= 1e-4, err  # measured 1.1e-6
    assert res.frames.shape == (5, 32, 48, 3)
    assert rel_err(res.frames, _frames_of(out)) <= 1e-4
    # a real video, not NaN or flat, and the text reaches it
    assert torch.isfinite(res.frames).all() and res.frames.std() > 0.05
    _, other = _ours(models["t2v", "wan"], "t2v", 7, infer_steps=4, denoising_step_list=[1000, 750, 500, 250],
                     sample_shift=5.0, enable_cfg=False, **T2V)  # fmt: skip
    assert torch.equal(other.latent, res.latent)  # same seed, same result
    pipe = WanPipeline(models["t2v", "wan"], dtype="fp32", device="cpu").create_generator(
        infer_steps=4, denoising_step_list=[1000, 750, 500, 250], sample_shift=5.0, enable_cfg=False, **T2V
    )
    assert rel_err(pipe.generate(7, "a city at night", return_latent=True).latent, res.latent) > 1e-3


def test_t2v_unipc_with_cfg_equals_diffusers(models):
    steps, shift, guidance = 3, 5.0, 4.0
    _, res = _ours(models["t2v", "wan"], "t2v", 11, infer_steps=steps, sample_shift=shift,
                   sample_guide_scale=guidance, enable_cfg=True, **T2V)  # fmt: skip
    ref = _diffusers(models["t2v", "diffusers"], "WanPipeline")
    ref.scheduler = _FixedGrid.install(diffusers_unipc(shift), official_unipc_grid(steps))
    box, cb = _capture_last_latent()
    with torch.no_grad():
        out = ref(prompt=PROMPT, negative_prompt=DEFAULT_NEGATIVE_PROMPT, height=32, width=48, num_frames=5,
                  num_inference_steps=steps, guidance_scale=guidance, latents=make_noise((1, 16, 2, 4, 6), 11),
                  output_type="pt", callback_on_step_end=cb)  # fmt: skip
    err = rel_err(res.latent, box["latents"])
    assert err <= 1e-4, err  # measured 1.5e-6
    assert rel_err(res.frames, _frames_of(out)) <= 1e-4
    assert len(res.step_times) == steps and set(res.timings) == {"text_encode", "sampling", "vae_decode"}


def _official_clip_pixels(image: torch.Tensor) -> torch.Tensor:
    """Official CLIP preprocessing of [1, 3, H, W] in [-1, 1]: bicubic to 224, to [0, 1], mean/std."""
    x = F.interpolate(image, size=(224, 224), mode="bicubic", align_corners=False).mul(0.5).add(0.5)
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def test_i2v_equals_diffusers(models, tmp_path, monkeypatch):
    from diffusers.pipelines.wan import pipeline_wan_i2v
    from PIL import Image

    # diffusers' I2V prompt cleaning calls ftfy unguarded (its T2V twin checks that it is installed);
    # ftfy.fix_text leaves these well-formed prompts unchanged, so a pass-through stands in for it
    monkeypatch.setattr(pipeline_wan_i2v, "ftfy", SimpleNamespace(fix_text=lambda text: text), raising=False)

    rng = np.random.RandomState(0)
    img = (rng.rand(60, 100, 3) * 255).astype(np.uint8)  # aspect 0.6 -> fitted to 32 x 64 for a 48 x 64 area
    Image.fromarray(img).save(tmp_path / "start.png")
    steps, shift, guidance = 2, 3.0, 5.0
    pipe, res = _ours(models["i2v", "wan"], "i2v", 5, image=str(tmp_path / "start.png"), infer_steps=steps,
                      sample_shift=shift, sample_guide_scale=guidance, target_video_length=5,
                      target_height=48, target_width=64)  # fmt: skip
    assert res.frames.shape == (5, 32, 64, 3)

    ref = _diffusers(models["i2v", "diffusers"], "WanImageToVideoPipeline")
    ref.scheduler = _FixedGrid.install(diffusers_unipc(shift), official_unipc_grid(steps))
    x = torch.from_numpy(img).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)[None]  # [1, 3, 60, 100]
    with torch.no_grad():
        embeds = ref.image_encoder(pixel_values=_official_clip_pixels(x), output_hidden_states=True).hidden_states[-2]
    ref.encode_image = lambda image, device=None: embeds
    resized = resize_image(x[0], 32, 64)[None]

    # the condition y: diffusers' mask + first-frame latent from the same resized image
    noise = make_noise((1, 16, 2, 4, 8), 5)
    ours_cond = pipe.encode_image(str(tmp_path / "start.png"))
    with torch.no_grad():
        _, ref_y = ref.prepare_latents(resized, 1, 16, 32, 64, 5, torch.float32, torch.device("cpu"), None, noise)
    assert ours_cond.y.shape == ref_y.shape == (1, 20, 2, 4, 8)
    assert torch.equal(ours_cond.y[:, :4], ref_y[:, :4])  # mask: exact
    assert rel_err(ours_cond.y[:, 4:], ref_y[:, 4:]) <= 1e-5  # measured 3e-7
    assert rel_err(ours_cond.clip_fea, embeds) <= 1e-5  # measured 0

    box, cb = _capture_last_latent()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers warns about [-1, 1] tensors
        with torch.no_grad():
            out = ref(image=resized, prompt=PROMPT, negative_prompt=DEFAULT_NEGATIVE_PROMPT, height=32, width=64,
                      num_frames=5, num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(),
                      output_type="pt", callback_on_step_end=cb)  # fmt: skip
    err = rel_err(res.latent, box["latents"])
    assert err <= 1e-4, err  # measured 2.6e-6
    assert rel_err(res.frames, _frames_of(out)) <= 1e-4
    assert set(res.timings) >= {"text_encode", "image_encode", "sampling", "vae_decode"}


def test_layouts_give_the_same_run(models, tmp_path):
    """The ComfyUI layout (bf16 / fp16 files, tokenizer inside the T5 file) runs the same model."""
    comfy = write_tiny_model(tmp_path / "comfy", "t2v", "comfyui", seed=3)
    params = dict(infer_steps=2, denoising_step_list=[1000, 500], sample_shift=5.0, enable_cfg=False, **T2V)
    _, a = _ours(models["t2v", "wan"], "t2v", 1, **params)
    _, b = _ours(comfy, "t2v", 1, **params)
    _, c = _ours(models["t2v", "diffusers"], "t2v", 1, **params)
    assert rel_err(b.latent, a.latent) <= 1e-6 and rel_err(c.latent, a.latent) <= 1e-6


def test_spec_cache(models, tmp_path):
    clear_cache()
    spec = ModelSpec(dit=str(models["t2v", "wan"]), dtype="fp32", device="cpu")
    import pickle

    assert pickle.loads(pickle.dumps(spec)) == spec
    assert hash(pickle.loads(pickle.dumps(spec))) == hash(spec)
    a = _leased(spec)
    assert _leased(pickle.loads(pickle.dumps(spec))) is a
    assert _leased(spec.replace(attention="sdpa_math")) is not a
    # rewriting the files makes a new key: no stale model
    path = write_tiny_model(tmp_path / "m", "t2v", "wan", seed=1)
    b = _leased(spec.replace(dit=str(path)))
    write_tiny_model(path, "t2v", "wan", seed=2)
    assert _leased(spec.replace(dit=str(path))) is not b
    # two pipelines over the same files share the models
    p1 = WanPipeline(models["t2v", "wan"], dtype="fp32", device="cpu").create_generator(**T2V)
    p2 = WanPipeline(models["t2v", "wan"], dtype="fp32", device="cpu").create_generator(infer_steps=4, **T2V)
    assert p1.dit is p2.dit and p1.text_encoder is p2.text_encoder and p1.vae is p2.vae


def test_stage_methods_compose_to_generate(models):
    pipe = WanPipeline(models["t2v", "wan"], dtype="fp32", device="cpu").create_generator(
        infer_steps=2, sample_shift=5.0, sample_guide_scale=3.0, **T2V
    )
    full = pipe.generate(3, PROMPT, return_latent=True)
    cond, uncond = pipe.encode_text(PROMPT)
    assert uncond is not None  # CFG on: guide scale != 1
    latent = pipe.sample(make_noise(pipe.latent_shape(), 3), cond, uncond)
    assert torch.equal(latent, full.latent)
    assert torch.equal(pipe.decode(latent), full.frames)
    # the predict hook (what a multi-process run passes: CFG parallel over a one-process predict) is used as given
    from wan_core.sampling.loop import guided_velocity

    seen = []

    def predict(model, x, t, c, u, g):
        seen.append(float(t[0]))
        return guided_velocity(model, x, t, c, u, g)

    assert torch.equal(pipe.sample(make_noise(pipe.latent_shape(), 3), cond, uncond, predict=predict), full.latent)
    assert len(seen) == 2


def test_saved_video_is_encoded_while_decoding_and_a_failed_decode_leaves_no_file(models, tmp_path, monkeypatch):
    """generate(save_result_path=...) feeds the mp4 writer chunk by chunk during the VAE decode:
    the file holds exactly the returned frames (as write_video would write them); if the decode
    fails midway, the error surfaces, no partial file is left, and the pipeline runs again."""
    from wan_core.video import read_video, write_video

    pipe = WanPipeline(models["t2v", "wan"], dtype="fp32", device="cpu").create_generator(infer_steps=2, **T2V)
    out = tmp_path / "run.mp4"
    res = pipe.generate(3, PROMPT, save_result_path=str(out))
    write_video(tmp_path / "after.mp4", res.frames)
    assert torch.equal(read_video(out)[0], read_video(tmp_path / "after.mp4")[0])
    assert {"vae_decode", "save"} <= set(res.timings)

    decode = type(pipe.vae).decode

    def failing(self, latent, on_frames=None, **kw):
        def one_then_fail(chunk):
            on_frames(chunk)
            raise RuntimeError("decoder failed")

        return decode(self, latent, on_frames=one_then_fail, **kw)

    monkeypatch.setattr(type(pipe.vae), "decode", failing)
    with pytest.raises(RuntimeError, match="decoder failed"):
        pipe.generate(3, PROMPT, save_result_path=str(tmp_path / "failed.mp4"))
    assert not (tmp_path / "failed.mp4").exists()
    monkeypatch.setattr(type(pipe.vae), "decode", decode)
    assert torch.equal(pipe.generate(3, PROMPT, save_result_path=str(tmp_path / "again.mp4")).frames, res.frames)

    # the frames the pipeline assembles chunk by chunk (converted where the VAE runs) are exactly
    # the plain decode's, in ComfyUI's layout; the writer gets them as uint8, tiled or not
    from wan_core.video import frames_to_uint8, wan_to_frames

    latent = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(5))
    plain = wan_to_frames(pipe.vae.decode(latent)[0])
    got = []
    assert torch.equal(pipe.decode(latent, on_frames=got.append), plain)
    assert [c.dtype for c in got] == [torch.uint8] * 3 and torch.equal(torch.cat(got), frames_to_uint8(plain))
    pipe.config.use_tiling_vae, got = True, []
    try:
        torch.testing.assert_close(pipe.decode(latent, on_frames=got.append), plain, atol=1e-5, rtol=0)
        assert len(got) == 1 and got[0].shape == plain.shape and got[0].dtype == torch.uint8
    finally:
        pipe.config.use_tiling_vae = False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pin_result", [False, True, None])
def test_gpu_decode_hands_on_each_chunk_after_its_asynchronous_copy(models, pin_result, monkeypatch):
    """On a GPU the chunks are copied through pinned buffers (or straight into a page-locked
    result) without waiting and handed on one chunk late: the result and the writer's uint8 chunks
    are still the plain decode's, in order, and a NaN chunk still fails with a clear error."""
    from wan_core import vae_frames
    from wan_core.video import frames_to_uint8, wan_to_frames

    monkeypatch.setattr(vae_frames, "PIN_RESULT", pin_result)

    pipe = WanPipeline(models["t2v", "wan"], dtype="fp32", device="cuda").create_generator(infer_steps=2, **T2V)
    latent = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(5))
    plain = wan_to_frames(pipe.vae.decode(latent.cuda())[0]).cpu()
    got = []
    frames = pipe.decode(latent, on_frames=got.append)
    assert frames.is_pinned() == (pin_result is not False)  # None: page-locked when a writer takes the frames
    assert not pipe.decode(latent).is_pinned() or pin_result is True
    torch.testing.assert_close(frames, plain, atol=1e-6, rtol=0)
    assert [c.shape[0] for c in got] == [1, 4, 4] and all(c.dtype == torch.uint8 and not c.is_cuda for c in got)
    assert torch.equal(torch.cat(got), frames_to_uint8(frames))
    latent[:, :, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pipe.decode(latent, on_frames=got.append)


# ----------------------------------------------------------------------------------------------
# the DiT cache with FP8 and LoRAs: strength changes and removal without reading the base again


def _leased(spec):
    """The cached DiT object of `spec` (for identity checks; its weights are only meaningful in a lease)."""
    with lease(spec) as model:
        return model


def _leased_out(spec):
    """`_dit_out` of the DiT leased for `spec`."""
    with lease(spec) as model:
        return _dit_out(model)


def _dit_out(model):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 2, 4, 6, generator=g), [torch.randn(7, 32, generator=g)]
    with torch.no_grad():
        return model(x, torch.tensor([700.0]), ctx)




@pytest.mark.parametrize("fp8", [None, "dequant"])
def test_lora_changes_reuse_the_cached_base(models, loras, fp8, monkeypatch):
    """Strength changes, added and removed LoRAs act on the one cached base (no file read again, same
    object) and give bitwise the output of a fresh build with that LoRA set (bf16-style merges are
    recomputed from kept originals; FP8 keeps the LoRA as branches beside its FP8 linears)."""
    import wan_core.loading.dit as dit_loading
    import wan_core.loading.fp8 as fp8_loading
    import wan_core.loading.lora as lora_loading
    from wan_core.layers.fp8 import FP8Linear
    from wan_core.layers.lora import lora_report

    a, b = loras
    spec = ModelSpec(dit=str(models["t2v", "wan"]), dtype="fp32", device="cpu", fp8=fp8)
    sets = [((a, 1.0),), ((a, 0.5),), ((a, 0.5), (b, 1.0)), ((a, 0.5), (b, -0.7)), ((b, 1.0),), ()]
    fresh = {}
    for s in sets:  # the reference: each LoRA set built from scratch
        clear_cache()
        fresh[s] = _leased_out(spec.replace(loras=s))
    clear_cache()
    with lease(spec) as base:
        plain = _dit_out(base)
    assert fp8 is None or any(isinstance(m, FP8Linear) for m in base.modules())
    _leased(spec.replace(loras=((a, 1.0), (b, 1.0))))  # parse both LoRA files once
    reads = []
    for mod in (dit_loading, fp8_loading, lora_loading):
        real = mod.read_state_dict
        monkeypatch.setattr(mod, "read_state_dict", lambda *x, _r=real, **k: (reads.append(x[0]), _r(*x, **k))[1])
    for s in sets + sets[::-1]:
        with lease(spec.replace(loras=s)) as model:
            assert model is base
            assert torch.equal(_dit_out(model), fresh[s]), s
            assert [x.strength for x in lora_report(model).loras] == [st for _, st in s]
    assert reads == [], "a LoRA change read a file again"
    assert torch.equal(fresh[()], plain) and not torch.equal(fresh[((a, 1.0),)], plain)
    with lease(spec.replace(loras=((a, 1.0),))) as model:
        kinds = lora_report(model).loras[0]
    assert (kinds.branched > 0) == (fp8 is not None) and kinds.merged > 0
    # another FP8 kernel is set on the same base, not reloaded
    if fp8 is not None:
        assert _leased(spec.replace(fp8="auto")) is base


def test_compiled_blocks_run_lora_branches_added_later(models, loras, monkeypatch):
    """torch.compile does not guard on module hooks by default: a LoRA branch added to a block that
    already ran compiled would be silently left out. the compile layer turns those guards on before it
    compiles, so adding, changing and removing branches on a compiled FP8 model gives the eager
    results. Checked with dynamo's 'eager' backend (the same tracing and guards as inductor on CUDA,
    no C++ compile), the model's blocks compiled by the lease's compile layer as on a GPU."""
    import wan_core.layers.compile as optimize

    a, b = loras
    monkeypatch.setattr(optimize, "compile_blocks", lambda model: [blk.compile(backend="eager", dynamic=False) for blk in model.blocks])
    spec = ModelSpec(dit=str(models["t2v", "wan"]), dtype="fp32", device="cpu", fp8="dequant", lora_mode="branch")
    sets = [(), ((a, 1.0),), ((a, 0.3), (b, 1.0)), ()]
    clear_cache()
    eager = {s: _leased_out(spec.replace(loras=s)) for s in sets}
    clear_cache()
    torch._dynamo.reset()
    compiled = spec.replace(compile=True)
    for s in sets:
        with lease(compiled.replace(loras=s)) as model:
            assert model.blocks[0]._compiled_call_impl is not None
            assert torch.allclose(_dit_out(model), eager[s], rtol=1e-5, atol=1e-6), s
    clear_cache()
    torch._dynamo.reset()


@pytest.mark.parametrize("env,want", [(None, "auto"), ("None", "auto"), ("FP32", "float32"), ("BF16", "bfloat16")])
def test_lightx2v_sensitive_layer_dtype_sets_the_residual_stream(models, monkeypatch, env, want):
    """LightX2V's SENSITIVE_LAYER_DTYPE (its base.sh: FP32 or None) picks the residual stream's dtype
    of the run; a value LightX2V does not know is a one-line error before anything is built."""
    if env is None:
        monkeypatch.delenv("SENSITIVE_LAYER_DTYPE", raising=False)
    else:
        monkeypatch.setenv("SENSITIVE_LAYER_DTYPE", env)
    pipe = WanPipeline(models["t2v", "wan"], dtype="fp32", device="cpu").create_generator(**T2V)
    assert pipe.spec.residual_dtype == want
    assert pipe.dit.residual_dtype == (torch.bfloat16 if want == "bfloat16" else torch.float32)  # fp32, no FP8: auto = float32
    monkeypatch.setenv("SENSITIVE_LAYER_DTYPE", "FP16")
    with pytest.raises(ValueError, match="SENSITIVE_LAYER_DTYPE='FP16'"):
        WanPipeline(models["t2v", "wan"], dtype="fp32", device="cpu").create_generator(**T2V)
