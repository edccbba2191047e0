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
from wan_core.options import FeatureNotAvailable, GenerationConfig
from wan_core.tiny import COMFY_NAMES, write_tiny_model
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
                   "--config_json", _config(tmp_path), "--prompt", "a fox", "--seed", "3",
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
    err = _run_error(t2v + ["--model_cls", "wan2.2_moe"], capsys)
    assert "not supported" in err


def test_pending_features_and_unknown_keys(tiny, tmp_path, capsys):
    t2v = ["--model_path", tiny["t2v"]]
    err = _run_error(t2v + ["--config_json", _config(tmp_path, cpu_offload=True, offload_granularity="block")], capsys)
    assert "'cpu_offload'" in err and "not available yet" in err
    par = {"seq_p_size": 4, "seq_p_attn_type": "ulysses", "cfg_p_size": 2}
    err = _run_error(t2v + ["--config_json", _config(tmp_path, parallel=par)], capsys)
    assert "'parallel'" in err and "not available yet" in err
    lora = [{"path": "x.safetensors", "strength": 1.0}]
    assert "'lora_configs'" in _run_error(t2v + ["--config_json", _config(tmp_path, lora_configs=lora)], capsys)
    err = _run_error(t2v + ["--config_json", _config(tmp_path, dit_quantized=True, dit_quant_scheme="fp8-sgl")], capsys)
    assert "'dit_quantized'" in err
    # an unknown key is named in a warning (the run then fails on frames to stay fast)
    with pytest.warns(UserWarning, match="unknown keys ignored: infer_stpes"):
        _run_error(t2v + ["--config_json", _config(tmp_path, infer_stpes=8, target_video_length=6)], capsys)
    # defaults of those keys are fine
    cfg = GenerationConfig.from_dict({**DISTILL_CONFIG, "parallel": {"seq_p_size": 1, "cfg_p_size": 1}, "lora_configs": []})
    cfg.check("t2v")


def _lightx2v_wan21_configs() -> list[str]:
    files = glob.glob(str(LIGHTX2V_CONFIGS / "wan" / "wan_[ti]2v*.json")) + glob.glob(str(LIGHTX2V_CONFIGS / "distill" / "*.json"))
    files += glob.glob(str(LIGHTX2V_CONFIGS / "distill" / "wan21" / "*.json"))
    files += [f for f in glob.glob(str(LIGHTX2V_CONFIGS / "*" / "*.json")) if os.path.basename(f).startswith(("wan_t2v", "wan_i2v"))]
    return sorted(set(files))


@pytest.mark.skipif(not LIGHTX2V_CONFIGS.is_dir(), reason="LightX2V reference checkout not available")
def test_lightx2v_wan21_configs_parse():
    """Every Wan2.1 T2V/I2V config LightX2V ships is read: it runs, or names the missing feature."""
    import warnings

    files = _lightx2v_wan21_configs()
    assert len(files) >= 10
    runnable = 0
    for f in files:
        task = "i2v" if "i2v" in os.path.basename(f) else "t2v"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = GenerationConfig.from_json(f)
        try:
            cfg.check(task)
            runnable += 1
        except FeatureNotAvailable as e:
            assert "not available yet" in str(e)
    assert runnable >= 4  # wan_t2v, wan_i2v, the distill configs without offload/LoRA/FP8


@pytest.mark.skipif(not (WAN_REF / "wan/configs/shared_config.py").is_file(), reason="official Wan2.1 source not available")
def test_default_negative_prompt_is_the_official_one():
    import re

    from wan_core.options import DEFAULT_NEGATIVE_PROMPT

    src = (WAN_REF / "wan/configs/shared_config.py").read_text(encoding="utf-8")
    assert DEFAULT_NEGATIVE_PROMPT == re.search(r"sample_neg_prompt = '(.*)'", src).group(1)
