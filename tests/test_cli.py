"""The command line: LightX2V flags and config JSON end to end on tiny models, the tiny-model and
demo subcommands, LightX2V's own Wan2.1 configs, and clear errors for bad inputs."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wan_core.cli import main
from wan_core.loading.tiny import COMFY_NAMES, write_tiny_model
from wan_core.options import FeatureNotAvailable, GenerationConfig
from wan_core.video import read_video

WAN_REF = Path(os.environ.get("WAN_REF_DIR", "/work/ref/Wan-Video+Wan2.1"))
LIGHTX2V_CONFIGS = Path(os.environ.get("LIGHTX2V_REF_DIR", "/work/ref/ModelTC+LightX2V")) / "configs"

# configs/distill/wan_i2v_distill_4step_cfg.json of LightX2V, with a tiny size and length
DISTILL_CONFIG = {
    "infer_steps": 4, "target_video_length": 5, "text_len": 512, "target_height": 32, "target_width": 48,
    "self_attn_1_type": "flash_attn3", "cross_attn_1_type": "flash_attn3", "cross_attn_2_type": "flash_attn3",
    "sample_guide_scale": 5, "sample_shift": 5, "enable_cfg": False, "cpu_offload": False,
    "offload_granularity": "model", "denoising_step_list": [1000, 750, 500, 250],
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {
        "t2v": write_tiny_model(root / "t2v", "t2v", "wan", seed=5),
        "i2v": write_tiny_model(root / "comfy", "i2v", "comfyui", seed=5),
        "root": root,
    }


def _config(tmp_path, **changes) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**DISTILL_CONFIG, **changes}))
    return str(path)


def _image(tmp_path, h=40, w=72) -> str:
    from PIL import Image

    path = tmp_path / "start.png"
    Image.fromarray((np.random.RandomState(2).rand(h, w, 3) * 255).astype(np.uint8)).save(path)
    return str(path)


def test_t2v_with_lightx2v_config_writes_the_video(tiny, tmp_path, capsys):
    out = tmp_path / "out" / "video.mp4"
    with pytest.warns(UserWarning) as warned:
        rc = main(["--model_cls", "wan2.1_distill", "--task", "t2v", "--model_path", tiny["t2v"],
                   "--config_json", _config(tmp_path, cross_attn_1_type="sage_attn2"), "--prompt", "a fox", "--seed", "3",
                   "--save_result_path", str(out), "--use_prompt_enhancer"])  # fmt: skip
    err = capsys.readouterr().err
    warned = " ".join(str(w.message) for w in warned)
    assert rc == 0, err
    frames, fps = read_video(out)
    assert frames.shape == (5, 32, 48, 3) and fps == 16
    assert frames.float().std() > 5  # not a flat video
    for line in ("text encode:", "step 1/4", "step 4/4", "vae decode:", "save:"):
        assert line in err
    assert "self_attn_1_type='flash_attn3' cannot run here" in warned  # not installed: falls back, with a warning
    assert "cross_attn_1_type='sage_attn2' cannot run here" in warned  # our Triton kernel: CUDA only
    assert "--use_prompt_enhancer is accepted for LightX2V compatibility and ignored" in warned


def test_i2v_comfyui_layout(tiny, tmp_path, capsys):
    out = tmp_path / "i2v.mp4"
    rc = main(["--task", "i2v", "--model_path", tiny["i2v"], "--config_json", _config(tmp_path, target_height=48,
               target_width=64), "--image_path", _image(tmp_path), "--prompt", "a cat", "--save_result_path", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    frames, _ = read_video(out)
    # a 72x40 image fitted to a 48*64 pixel area: official arithmetic gives 64x32
    assert frames.shape == (5, 32, 64, 3)


def test_demo_and_tiny_model_subcommands(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    assert main(["demo", "--frames", "5", "--height", "32", "--width", "32", "--save_result_path", str(out),
                 "--cache_dir", str(tmp_path / "cache")]) == 0  # fmt: skip
    assert read_video(out)[0].shape == (5, 32, 32, 3)
    assert "saved" in capsys.readouterr().out
    # the module entry point, in a fresh interpreter
    proc = subprocess.run(
        [sys.executable, "-m", "wan_core", "tiny-model", "--task", "i2v", "--layout", "comfyui", "--out", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name in ("i2v", "t5", "vae", "clip"):
        assert (tmp_path / "c" / COMFY_NAMES[name]).is_file()
    assert main([]) == 0 and "tiny-model" in capsys.readouterr().out


def test_wan22_a14b_distill_command_writes_the_video(tiny22, tmp_path):
    """`python -m wan_core --model_cls wan2.2_moe_distill --task t2v --model_path <A14B folder>` in a fresh
    interpreter: both experts load, the video is written, and its latent is the Python door's."""
    import torch

    from wan_core.pipeline import WanPipeline

    out, latent = tmp_path / "a14b.mp4", tmp_path / "a14b.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "wan_core", "--model_cls", "wan2.2_moe_distill", "--task", "t2v", "--model_path",
         tiny22("t2v"), "--prompt", "a fox", "--seed", "3", "--num_frames", "5", "--target_shape", "32", "48",
         "--device", "cpu", "--save_result_path", str(out), "--save_latent", str(latent)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for line in ("high-noise expert:", "low-noise expert:", "step 4/4", "save:"):
        assert line in proc.stderr, line
    frames, fps = read_video(out)
    assert frames.shape == (5, 32, 48, 3) and fps == 16 and frames.float().std() > 5
    pipe = WanPipeline(tiny22("t2v"), "wan2.2_moe_distill", "t2v", device="cpu")
    pipe.create_generator(target_video_length=5, target_height=32, target_width=48)
    assert torch.equal(torch.load(latent), pipe.generate(3, "a fox", return_latent=True).latent)


def test_wan22_expert_files_as_flags_and_ti2v(tiny22, tmp_path, capsys):
    """--high_noise_path / --low_noise_path (ComfyUI's files) beside a model folder give the folder's
    run; TI2V-5B writes t2v and i2v videos at its 24 fps, i2v keeping the image's aspect."""
    import torch

    run = ["--prompt", "a fox", "--seed", "3", "--device", "cpu", "--dtype", "fp32"]
    size = ["--num_frames", "5", "--target_shape", "32", "48"]
    latents = []
    for name, files in (("folder", []), ("flags", ["--high_noise_path", "high", "--low_noise_path", "low"])):
        files = [os.path.join(tiny22("t2v", "comfyui"), "diffusion_models", f"wan2.2_t2v_{f}_noise_14B_fp16.safetensors")
                 if f in ("high", "low") else f for f in files]  # fmt: skip
        rc = main(["--model_cls", "wan2.2_moe_distill", "--model_path", tiny22("t2v"), *files, *run, *size,
                   "--save_result_path", str(tmp_path / f"{name}.mp4"), "--save_latent", str(tmp_path / f"{name}.pt")])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 0, err
        assert "high-noise expert:" in err and "low-noise expert:" in err
        latents.append(torch.load(tmp_path / f"{name}.pt"))
    assert ((latents[1] - latents[0]).norm() / latents[0].norm()).item() <= 1e-6  # the same values, other files
    for task, extra, shape in (("t2v", [], (5, 64, 96, 3)), ("i2v", ["--image_path", _image(tmp_path, 40, 72)], (5, 64, 96, 3))):
        out = tmp_path / f"ti2v_{task}.mp4"
        rc = main(["--model_cls", "wan2.2", "--task", task, "--model_path", tiny22("ti2v", "comfyui"), *run, *extra,
                   "--num_frames", "5", "--target_shape", "64", "96", "--save_result_path", str(out)])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 0, err
        assert "DiT:" in err and "low-noise expert" not in err
        frames, fps = read_video(out)
        assert frames.shape == shape and fps == 24, (frames.shape, fps)


def test_demo_runs_wan22(tmp_path, capsys):
    """`demo --family wan2.2` (the two A14B experts, 4 steps) and `demo --task ti2v` (TI2V-5B with the demo image)."""
    for args, shape in ((["--family", "wan2.2"], (5, 32, 64, 3)), (["--family", "wan2.2", "--task", "i2v"], None),
                        (["--task", "ti2v"], (5, 32, 64, 3))):  # fmt: skip
        out = tmp_path / "demo.mp4"
        assert main(["demo", *args, "--frames", "5", "--height", "32", "--width", "64", "--save_result_path", str(out),
                     "--cache_dir", str(tmp_path / "cache")]) == 0  # fmt: skip
        captured = capsys.readouterr()
        assert "tiny random-weight wan2.2 model" in captured.out and "saved" in captured.out
        if "ti2v" not in args:
            assert "high-noise expert:" in captured.err and "low-noise expert:" in captured.err
        frames, _ = read_video(out)
        assert frames.shape[0] == 5 and (shape is None or frames.shape == shape), frames.shape
    assert sorted(os.listdir(tmp_path / "cache")) == ["tiny-wan2.2-i2v-wan-v1", "tiny-wan2.2-t2v-wan-v1", "tiny-wan2.2-ti2v-wan-v1"]


def _run_error(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


def test_missing_component_is_named(tiny, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny["t2v"], model)
    os.remove(model / "Wan2.1_VAE.pth")
    err = _run_error(["--model_path", str(model), "--config_json", _config(tmp_path)], capsys)
    assert "the VAE not found" in err and str(model / "Wan2.1_VAE.pth") in err
    err = _run_error(["--model_path", tiny["t2v"], "--vae_path", str(tmp_path / "nope.pth")], capsys)
    assert "vae_path does not exist" in err
    err = _run_error(["--task", "i2v", "--model_path", tiny["t2v"]], capsys)  # a t2v folder has no CLIP
    assert "CLIP image encoder" in err


def test_video_encoding_flags_reach_the_encoder(tiny, tmp_path, capsys):
    """--video_crf / --video_preset (and the config keys) set x264's crf and preset: x264 writes its
    settings into the stream (an SEI message), read back here."""
    out = tmp_path / "fast.mp4"
    rc = main(["--model_cls", "wan2.1_distill", "--model_path", tiny["t2v"], "--config_json", _config(tmp_path),
               "--video_preset", "ultrafast", "--video_crf", "30", "--save_result_path", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    sei = out.read_bytes()
    assert b"crf=30.0" in sei and b"subme=0" in sei  # ultrafast: no subpixel refinement
    out = tmp_path / "default.mp4"
    assert main(["--model_cls", "wan2.1_distill", "--model_path", tiny["t2v"], "--config_json",
                 _config(tmp_path, video_preset="veryslow"), "--save_result_path", str(out)]) == 0  # fmt: skip
    sei = out.read_bytes()
    assert b"crf=19.0" in sei and b"subme=10" in sei  # veryslow from the config key, crf 19 by default


def test_bad_inputs_get_clear_errors(tiny, tmp_path, capsys):
    t2v, i2v = ["--model_path", tiny["t2v"]], ["--task", "i2v", "--model_path", tiny["i2v"]]
    err = _run_error(t2v + ["--config_json", _config(tmp_path, target_width=50)], capsys)
    assert "multiples of 16" in err and "32x48" in err
    err = _run_error(t2v + ["--config_json", _config(tmp_path), "--num_frames", "6"], capsys)
    assert "4n+1" in err
    err = _run_error(i2v + ["--config_json", _config(tmp_path)], capsys)
    assert "needs an input image" in err
    err = _run_error(i2v + ["--config_json", _config(tmp_path), "--image_path", str(tmp_path / "missing.jpg")], capsys)
    assert "input image not found" in err and "missing.jpg" in err
    err = _run_error(t2v + ["--config_json", str(tmp_path / "nope.json")], capsys)
    assert "config JSON not found" in err
    err = _run_error(t2v + ["--model_cls", "wan2.3"], capsys)
    assert "model_cls 'wan2.3' is not supported" in err and "wan2.2_moe" in err
    err = _run_error(t2v + ["--model_cls", "wan2.2_moe"], capsys)  # a Wan2.1 folder has no experts
    assert "the Wan2.2 T2V-A14B high-noise expert not found" in err and "--high_noise_path" not in err
    err = _run_error(t2v + ["--config_json", _config(tmp_path), "--video_preset", "quick"], capsys)
    assert "x264 preset must be one of" in err and "'quick'" in err and "text encode:" not in err  # before any work
    err = _run_error(t2v + ["--config_json", _config(tmp_path, video_crf=70)], capsys)
    assert "crf must be an integer in 0..51" in err


def test_pending_features_and_unknown_keys(tiny, tmp_path, capsys):
    t2v = ["--model_path", tiny["t2v"]]
    err = _run_error(t2v + ["--config_json", _config(tmp_path, cpu_offload=True, lazy_load=True)], capsys)
    assert "'lazy_load'" in err and "disk offload" in err and "not available yet" in err
    # offload and parallel keys are wired (tests/test_offload_doors.py, tests/test_parallel_doors.py):
    # parallel degrees outside torchrun say how to launch them
    par = {"seq_p_size": 4, "seq_p_attn_type": "ulysses", "cfg_p_size": 2}
    err = _run_error(t2v + ["--config_json", _config(tmp_path, parallel=par)], capsys)
    assert "asks for 8 processes" in err and "torchrun --nproc_per_node=8 -m wan_core" in err
    err = _run_error(t2v + ["--config_json", _config(tmp_path, t5_quantized=True, t5_quant_scheme="fp8-sgl")], capsys)
    assert "'t5_quantized'" in err and "not available yet" in err
    # LoRA, FP8 and caching keys are wired now (tests/test_variants.py): here only that they are read
    lora = [{"path": "x.safetensors", "strength": 1.0}]
    err = _run_error(t2v + ["--config_json", _config(tmp_path, lora_configs=lora)], capsys)
    assert "lora_configs[0].path: file not found: 'x.safetensors'" in err
    err = _run_error(t2v + ["--config_json", _config(tmp_path, dit_quantized=True, dit_quant_scheme="nvfp4")], capsys)
    assert "'nvfp4'" in err
    # an unknown key is named in a warning (the run then fails on frames to stay fast)
    with pytest.warns(UserWarning, match="unknown keys ignored: infer_stpes"):
        _run_error(t2v + ["--config_json", _config(tmp_path, infer_stpes=8, target_video_length=6)], capsys)
    # defaults of those keys are fine
    cfg = GenerationConfig.from_dict({**DISTILL_CONFIG, "parallel": {"seq_p_size": 1, "cfg_p_size": 1}, "lora_configs": []})
    cfg.check("t2v")
    # the caching keys are kept for wan_core.layers.cache, and survive a keyword update
    cfg = GenerationConfig.from_dict({**DISTILL_CONFIG, "feature_caching": "Mag", "magcache_K": 4, "magcache_thresh": 0.1})
    cfg = cfg.updated({"infer_steps": 4})
    assert cfg.cache_config() == {"feature_caching": "Mag", "infer_steps": 4, "magcache_K": 4, "magcache_thresh": 0.1}


def test_convert_fp8_subcommand(tiny, tmp_path, capsys):
    """`convert-fp8` is wan_core.convert mounted: same file as the Python call, LoRAs merged first."""
    import torch

    from wan_core.convert import convert_to_fp8
    from wan_core.loading.io import read_state_dict
    from wan_core.loading.lora import random_lora, save_lora
    from wan_core.loading.tiny import tiny_dit_config

    lora = save_lora(random_lora(tiny_dit_config("t2v"), rank=2, seed=4), tmp_path / "l.safetensors")
    out = tmp_path / "fp8.safetensors"
    assert main(["convert-fp8", tiny["t2v"], str(out), "--lora", f"{lora}:0.5", "--dtype", "fp32"]) == 0
    assert str(out) in capsys.readouterr().out
    ref = convert_to_fp8(tiny["t2v"], str(tmp_path / "ref.safetensors"), loras=[(lora, 0.5)], dtype=torch.float32)
    a, b = read_state_dict(str(out)), read_state_dict(ref)
    assert set(a) == set(b) and all(torch.equal(a[k].float(), b[k].float()) for k in a)
    assert a["blocks.0.ffn.0.weight"].dtype == torch.float8_e4m3fn and "blocks.0.ffn.0.weight_scale" in a
    assert "DiT checkpoint not found" in _run_error(["convert-fp8", str(tmp_path / "missing"), str(out)], capsys)


def test_calibrate_cache_subcommand_feeds_a_cached_run(tiny, tmp_path, capsys):
    """`calibrate-cache` (wan_core.layers.cache's own command line) fits TeaCache coefficients for a model with
    no published ones; its 'config' block then runs that model with feature_caching 'Tea'."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    embeds = tmp_path / "embeds.safetensors"
    save_file({"context": torch.randn(6, 32, generator=g), "context_null": torch.randn(4, 32, generator=g)}, str(embeds))
    out = tmp_path / "calib.json"
    rc = main(["calibrate-cache", "--dit", tiny["t2v"], "--embeds", str(embeds), "--steps", "8", "--size", "48x32",
               "--frames", "5", "--device", "cpu", "--dtype", "fp32", "--compile", "false", "--out", str(out)])  # fmt: skip
    assert rc == 0 and "coefficients" in capsys.readouterr().out
    fitted = json.loads(out.read_text())["config"]
    assert len(fitted["coefficients"]) == 2 and len(fitted["magcache_ratios"][0]) == 8
    config = _config(tmp_path, **fitted, feature_caching="Tea", teacache_thresh=0.3, enable_cfg=True,
                     sample_guide_scale=5.0, infer_steps=8, denoising_step_list=None)  # fmt: skip
    rc = main(["--model_path", tiny["t2v"], "--config_json", config, "--save_result_path", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "feature cache Tea" in err and "DiT evaluations" in err


def _lightx2v_wan21_configs() -> list[str]:
    files = glob.glob(str(LIGHTX2V_CONFIGS / "wan" / "wan_[ti]2v*.json")) + glob.glob(str(LIGHTX2V_CONFIGS / "distill" / "*.json"))
    files += glob.glob(str(LIGHTX2V_CONFIGS / "distill" / "wan21" / "*.json"))
    files += [f for f in glob.glob(str(LIGHTX2V_CONFIGS / "*" / "*.json")) if os.path.basename(f).startswith(("wan_t2v", "wan_i2v"))]
    files += [f for f in glob.glob(str(LIGHTX2V_CONFIGS / "caching" / "*" / "*.json")) if os.path.basename(f).startswith(("wan_t2v", "wan_i2v"))]
    return sorted(set(files))


@pytest.mark.skipif(not LIGHTX2V_CONFIGS.is_dir(), reason="LightX2V reference checkout not available")
def test_lightx2v_wan21_configs_parse():
    """Every Wan2.1 T2V/I2V config LightX2V ships is read: it runs, names the missing feature, or (a
    quantisation scheme that is not FP8 per-channel: int8, nvfp4) says the scheme is not supported."""
    import warnings

    files = _lightx2v_wan21_configs()
    assert len(files) >= 10
    runnable = set()
    for f in files:
        task = "i2v" if "i2v" in os.path.basename(f) else "t2v"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = GenerationConfig.from_json(f)
        try:
            cfg.check(task)
            runnable.add(os.path.relpath(f, LIGHTX2V_CONFIGS))
        except FeatureNotAvailable as e:
            assert "not available yet" in str(e)
        except ValueError as e:
            assert cfg.dit_quantized and "not supported" in str(e), (f, e)
    assert len(runnable) >= 40  # measured 54 of 83
    for variant in ("lora", "model", "fp8"):  # the seed's distill variants, as LightX2V ships them
        for task in ("t2v", "i2v"):
            assert f"distill/wan21/wan_{task}_distill_{variant}_4step_cfg.json" in runnable
    assert {"caching/teacache/wan_t2v_1_3b_tea_480p.json", "caching/magcache/wan_t2v_mag_1_3b.json"} <= runnable


@pytest.mark.skipif(not (WAN_REF / "wan/configs/shared_config.py").is_file(), reason="official Wan2.1 source not available")
def test_default_negative_prompt_is_the_official_one():
    import re

    from wan_core.options import DEFAULT_NEGATIVE_PROMPT

    src = (WAN_REF / "wan/configs/shared_config.py").read_text(encoding="utf-8")
    assert DEFAULT_NEGATIVE_PROMPT == re.search(r"sample_neg_prompt = '(.*)'", src).group(1)
