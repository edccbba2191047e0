"""CPU offload through the three doors: the CLI's LightX2V keys, the Python API and the
WanOffloadConfig node reach `wan_core.layers.offload.enable_offload` with the right arguments, and the
offloaded run gives the resident run's result; a CUDA out-of-memory error at the run boundary is
re-worded by `explain_oom`; LoRA changes on an offloaded DiT give the fresh build's numbers.

No CUDA here: the offload runs with device="cpu" as the "GPU" (the engine's second CPU placement,
tests/test_offload.py), which exercises the same hooks, packing and load/unload. Offloaded and
resident runs differ by ~1e-6 relative, not bitwise: the resident DiT computes on the memory-mapped
checkpoint tensors, some at addresses that are not 64-byte aligned, and the CPU float32 matmul
kernels round differently for those (measured: only the time-embedding linears change; the same
tensors copied to aligned memory give the offloaded numbers). Two offloaded builds are compared bitwise.
"""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch

from wan_core.layers.offload import BlockOffload, GiB, ModelOffload, OffloadOptions, offload_handle
from wan_core.loading.tiny import write_tiny_model
from wan_core.model_cache import build_text_encoder, build_vae, clear_cache, lease
from wan_core.pipeline import WanPipeline
from wan_core.spec import ModelSpec

TOL = 1e-5
RUN = dict(infer_steps=2, target_video_length=5, target_height=32, target_width=48, sample_guide_scale=4.0, sample_shift=5.0)
PROMPT = "a red fox in the snow"


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("offload") / "t2v", "t2v", "wan", seed=7)


@pytest.fixture(scope="module")
def resident(model_dir):
    """The reference: the same run with every model resident."""
    clear_cache()
    pipe = WanPipeline(model_dir, dtype="fp32", device="cpu").create_generator(**RUN)
    assert offload_handle(pipe.dit) is None
    return pipe.generate(5, PROMPT, return_latent=True)


@pytest.fixture
def calls(monkeypatch):
    """Every enable_offload call (its arguments), passed through to the real one."""
    import wan_core.layers.offload as offload

    seen = []
    real = offload.enable_offload

    def spy(model, granularity="block", **kw):
        seen.append(dict(granularity=granularity, **kw))
        return real(model, granularity, **kw)

    monkeypatch.setattr(offload, "enable_offload", spy)
    clear_cache()
    warnings.filterwarnings("ignore", message=".*saves no memory")
    yield seen
    clear_cache()


def _pipe(model_dir, **params):
    return WanPipeline(model_dir, dtype="fp32", device="cpu").create_generator(**RUN, **params)


# ----------------------------------------------------------------------------------------------
# Python API


@pytest.mark.parametrize("granularity", ["block", "model"])
def test_python_api_offload_equals_resident(model_dir, resident, calls, granularity):
    pipe = _pipe(model_dir, cpu_offload=True, offload_granularity=granularity)
    res = pipe.generate(5, PROMPT, return_latent=True)
    assert calls == [dict(granularity=granularity, resident_blocks=None, vram_budget_gb=None, prefetch=1, device="cpu")]
    handle = offload_handle(pipe.dit)
    assert isinstance(handle, BlockOffload if granularity == "block" else ModelOffload)
    # one load for the whole denoising loop (2 steps x 2 CFG branches), released after it
    assert handle.stats["loads"] == 1 and not handle.is_loaded
    # T5 and the VAE follow cpu_offload: packed in host memory, moved for their stage, released
    for part in (pipe.text_encoder.model, pipe.vae):
        assert isinstance(offload_handle(part), ModelOffload) and not offload_handle(part).is_loaded
    assert rel_err(res.latent, resident.latent) <= TOL, rel_err(res.latent, resident.latent)  # measured 1.4e-6
    assert rel_err(res.frames, resident.frames) <= TOL


def test_i2v_offload_equals_resident(tmp_path, calls):
    """I2V: the VAE (first-frame latent, then the decode) and CLIP visit the device for their stages."""
    model = write_tiny_model(tmp_path / "i2v", "i2v", "comfyui", seed=7)
    image = torch.rand(3, 40, 72, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = WanPipeline(model, task="i2v", dtype="fp32", device="cpu").create_generator(**RUN)
    ref = ref.generate(5, PROMPT, image=image, return_latent=True)
    pipe = WanPipeline(model, task="i2v", dtype="fp32", device="cpu").create_generator(cpu_offload=True, **RUN)
    res = pipe.generate(5, PROMPT, image=image, return_latent=True)
    assert len(calls) == 1 and offload_handle(pipe.dit) is not None
    assert offload_handle(pipe.image_encoder).stats["loads"] == 1 and offload_handle(pipe.vae).stats["loads"] == 2
    assert rel_err(res.latent, ref.latent) <= TOL and rel_err(res.frames, ref.frames) <= TOL


def test_python_api_enable_offload_resident_blocks(model_dir, resident, calls):
    """LightX2V's enable_offload (with our resident_blocks): T5 offloaded, the VAE kept resident."""
    pipe = WanPipeline(model_dir, dtype="fp32", device="cpu").enable_offload(
        cpu_offload=True, offload_granularity="phase", text_encoder_offload=True, resident_blocks=1, prefetch=2
    )
    pipe.create_generator(**RUN)
    res = pipe.generate(5, PROMPT, return_latent=True)
    assert calls == [dict(granularity="block", resident_blocks=1, vram_budget_gb=None, prefetch=2, device="cpu")]
    assert offload_handle(pipe.dit).resident_blocks == 1
    assert offload_handle(pipe.text_encoder.model) is not None and offload_handle(pipe.vae) is None
    assert rel_err(res.latent, resident.latent) <= TOL


def test_offload_options_are_checked(model_dir):
    with pytest.raises(ValueError, match="vram_budget_gb or offload_resident_blocks, not both"):
        _pipe(model_dir, cpu_offload=True, vram_budget_gb=8, offload_resident_blocks=2)
    with pytest.raises(ValueError, match="needs offload_granularity 'block'"):
        _pipe(model_dir, cpu_offload=True, offload_granularity="model", offload_resident_blocks=2)
    with pytest.raises(ValueError, match="offload_granularity must be one of"):
        _pipe(model_dir, cpu_offload=True, offload_granularity="layer")
    with pytest.raises(ValueError, match="not both"):
        ModelSpec(dit=model_dir, offload=OffloadOptions("block", vram_budget_gb=8, resident_blocks=1))
    with pytest.raises(ValueError, match="needs CPU offload of the DiT"):
        ModelSpec(dit=model_dir, offload=OffloadOptions(vram_budget_gb=8))
    assert ModelSpec(dit=model_dir, offload="phase").offload == OffloadOptions("block")


def test_cpu_only_offload_warns(model_dir):
    clear_cache()
    with pytest.warns(UserWarning, match="saves no memory"):
        with lease(ModelSpec(dit=model_dir, dtype="fp32", device="cpu", offload="block")):
            pass
    clear_cache()


# ----------------------------------------------------------------------------------------------
# CLI


def _cli(model_dir, tmp_path, name, capsys, **config):
    from wan_core.cli import main

    cfg = tmp_path / f"{name}.json"
    cfg.write_text(json.dumps({**RUN, "enable_cfg": True, **config}))
    latent = tmp_path / f"{name}.pt"
    rc = main(["--model_path", model_dir, "--config_json", str(cfg), "--prompt", PROMPT, "--seed", "5", "--device", "cpu",
               "--dtype", "fp32", "--save_result_path", str(tmp_path / f"{name}.mp4"), "--save_latent", str(latent)])  # fmt: skip
    err = capsys.readouterr().err
    return rc, err, (torch.load(latent) if rc == 0 else None)


def test_cli_keys_reach_enable_offload(model_dir, resident, calls, tmp_path, capsys):
    """LightX2V keys (cpu_offload, offload_granularity 'phase', t5_cpu_offload) plus ours (vram_budget_gb,
    offload_prefetch): the budget plans the resident blocks for the run's size before loading."""
    rc, err, latent = _cli(model_dir, tmp_path, "off", capsys, cpu_offload=True, offload_granularity="phase",
                           t5_cpu_offload=False, vram_budget_gb=0.5, offload_prefetch=2)  # fmt: skip
    assert rc == 0, err
    assert calls == [dict(granularity="block", resident_blocks=None, vram_budget_gb=0.5, prefetch=2, device="cpu")]
    assert rel_err(latent, resident.latent) <= TOL
    with lease(ModelSpec(dit=model_dir, dtype="fp32", device="cpu", attention="auto", cross_attention=None,
                         offload=OffloadOptions("block", vram_budget_gb=0.5, prefetch=2))) as dit:  # fmt: skip
        handle = offload_handle(dit)
    assert handle.plan.tokens == 1 * 2 * 2 * 3 and handle.plan.fits  # latent [1, 16, 2, 4, 6], patch 1x2x2
    assert handle.resident_blocks == handle.plan.resident_blocks == 2  # a tiny model fits whole
    # a budget below what block offload needs at this size: a sentence naming the minimum
    rc, err, _ = _cli(model_dir, tmp_path, "small", capsys, cpu_offload=True, vram_budget_gb=0.1)
    assert rc == 2 and "vram_budget_gb=0.1 is too small for block offload" in err and "at least" in err


# ----------------------------------------------------------------------------------------------
# the OOM boundary


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 23.64 GiB total capacity)")


def test_oom_in_generate_names_the_offload_option(model_dir, monkeypatch, calls, tmp_path, capsys):
    import wan_core.sampling.denoise as denoise  # the denoising stage every door runs

    monkeypatch.setattr(denoise, "sample", _oom)
    pipe = _pipe(model_dir)
    with pytest.raises(torch.OutOfMemoryError) as info:
        pipe.generate(5, PROMPT)
    msg = str(info.value)
    assert "CUDA out of memory in the Wan DiT (no DiT offload) at 12 tokens" in msg
    assert "cpu_offload=true" in msg and "vram_budget_gb" in msg
    assert "(original error: CUDA out of memory. Tried to allocate 20.00 GiB" in msg
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    # with block offload on: the message says so, and the DiT is released despite the error
    pipe = _pipe(model_dir, cpu_offload=True)
    with pytest.raises(torch.OutOfMemoryError, match="offload_granularity='block' with 0 resident blocks"):
        pipe.generate(5, PROMPT)
    assert not offload_handle(pipe.dit).is_loaded
    # the CLI prints it as an error (exit code 3), no traceback
    rc, err, _ = _cli(model_dir, tmp_path, "oom", capsys)
    assert rc == 3 and err.count("error: CUDA out of memory in the Wan DiT") == 1 and "Traceback" not in err


def test_oom_in_the_sampler_node_suggests_a_budget_for_the_card(model_dir, monkeypatch, calls):
    """The node's boundary, on a simulated 24 GiB card: the message gives a budget (card - 1.5 GiB)."""
    from nodes import NODE_CLASS_MAPPINGS

    spec = _pipe(model_dir).spec
    text = NODE_CLASS_MAPPINGS["WanTextEncode"]().encode(spec, PROMPT, "")["result"][0]
    import wan_core.sampling.denoise as denoise

    monkeypatch.setattr(denoise, "sample", _oom)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=24 * GiB))
    with pytest.raises(torch.OutOfMemoryError) as info:
        NODE_CLASS_MAPPINGS["WanSampler"]().sample(spec, text, 48, 32, 5, 2, 4.0, 5.0, "unipc", 5)
    msg = str(info.value)
    assert "at 12 tokens" in msg and "To fit this 24.0 GiB card: cpu_offload=true" in msg
    assert "vram_budget_gb=22.5" in msg


# ----------------------------------------------------------------------------------------------
# ComfyUI nodes


def _node_run(spec, seed=5):
    from nodes import NODE_CLASS_MAPPINGS

    text = NODE_CLASS_MAPPINGS["WanTextEncode"]().encode(spec, PROMPT, "blurry")["result"][0]
    out = NODE_CLASS_MAPPINGS["WanSampler"]().sample(spec, text, 48, 32, 5, 2, 4.0, 5.0, "unipc", seed)["result"][0]
    frames = NODE_CLASS_MAPPINGS["WanVAEDecode"]().decode(spec, out)["result"][0]
    return text, out["samples"], frames


def test_offload_node_reaches_the_engine_and_equals_the_plain_graph(model_dir, calls):
    from nodes import NODE_CLASS_MAPPINGS

    spec = _pipe(model_dir).spec
    clear_cache()
    calls.clear()
    text, plain, plain_frames = _node_run(spec)
    assert calls == []
    (settings,) = NODE_CLASS_MAPPINGS["WanOffloadConfig"]().make("block", 0.5, True)
    off = spec.replace(offload=settings)
    text2, samples, frames = _node_run(off)
    assert calls == [dict(granularity="block", resident_blocks=None, vram_budget_gb=0.5, prefetch=1, device="cpu")]
    assert torch.equal(text2.positive, text.positive)  # T5 moved for its stage: the same numbers
    assert rel_err(samples, plain) <= TOL and rel_err(frames, plain_frames) <= TOL
    with lease(off) as dit:
        assert not offload_handle(dit).is_loaded  # the sampler released the DiT before the decode ran
    assert isinstance(offload_handle(build_vae(off)), ModelOffload)
    assert isinstance(offload_handle(build_text_encoder(off).model), ModelOffload)


# ----------------------------------------------------------------------------------------------
# the DiT cache: LoRA / FP8 on an offloaded base


from .test_pipeline import _dit_out, _leased_out  # noqa: E402  (the same probe as the resident tests; `loras`: conftest.py)


@pytest.mark.parametrize("fp8", [None, "dequant"])
def test_lora_changes_on_an_offloaded_base(model_dir, loras, fp8, calls):
    """Starting with no LoRA, then adding, re-weighting and removing LoRAs on the one offloaded base gives
    bitwise the fresh offloaded build of each set, and the original weights back at the end: a merged
    LoRA's kept originals are the offload's host memory, which must never receive a merge."""
    warnings.filterwarnings("ignore", message=".*saves no memory")
    a, b = loras
    spec = ModelSpec(dit=model_dir, dtype="fp32", device="cpu", fp8=fp8, offload="block")
    sets = [(), ((a, 1.0),), ((a, 0.5),), ((a, 0.5), (b, 1.0)), ((b, -0.7),), ((a, 0.0),), ()]
    fresh = {}
    for s in sets:
        clear_cache()
        fresh[s] = _leased_out(spec.replace(loras=s))
    clear_cache()
    resident = _leased_out(spec.replace(offload=None))
    assert rel_err(fresh[()], resident) <= TOL
    clear_cache()
    with lease(spec) as base:
        pass
    for s in sets + sets[::-1]:
        with lease(spec.replace(loras=s)) as model:
            assert model is base and offload_handle(model) is not None
            assert torch.equal(_dit_out(model), fresh[s]), s
    assert not torch.equal(fresh[((a, 1.0),)], fresh[()])
    if fp8 is not None:  # FP8 weights are packed and moved as FP8
        handle = offload_handle(base)
        assert torch.float8_e4m3fn in handle.block_groups[0].dtypes
        with lease(spec.replace(fp8="auto")) as model:
            assert model is base and offload_handle(base) is not None
            assert torch.equal(_dit_out(base), fresh[()])
