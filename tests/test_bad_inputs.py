"""Bad and odd inputs through every door (issue 23): each is refused with one line naming the input
(or gets the documented warning) before any model loads, and a run that was started leaves nothing
half-written at its save path. One test per group of the issue, parametrised over its cases; the
task API's cases are at the end (its routes over a stand-in for aiohttp)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import stat
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from wan_core.cli import main
from wan_core.inputs import check_run_size, estimate_run
from wan_core.loading.tiny import COMFY_NAMES, write_tiny_model
from wan_core.options import GenerationConfig
from wan_core.video import VideoWriter, read_video

# a tiny, fast run: 5 frames of 32x32, the 4-step distill schedule, no CFG
TINY_RUN = {"infer_steps": 4, "target_video_length": 5, "target_height": 32, "target_width": 32, "enable_cfg": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("bad_inputs") / "t2v", "t2v", "wan", seed=3)


def _config(tmp_path, **changes) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY_RUN, **changes}))
    return str(path)


def _image(path, size=(40, 24)) -> str:
    Image.fromarray((np.random.RandomState(1).rand(size[1], size[0], 3) * 255).astype(np.uint8)).save(path)
    return str(path)


def _error_line(argv, capsys, rc=2) -> str:
    """Run the CLI; the exit code, and stderr holds one `error:` line (no traceback, nothing loaded)."""
    got = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert got == rc, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert not any(ln.startswith(("DiT:", "text encode:")) for ln in err.splitlines())  # refused before any model loads
    return lines[0]


def _leftovers(folder) -> list[str]:
    return [f for f in os.listdir(folder) if ".partial" in f or f.startswith(".wan_core_probe_")]


# ---------------------------------------------------------------------------------------------
# 1. yes/no keys


YES_NO_KEYS = ["enable_cfg", "dit_quantized", "cpu_offload", "use_tiling_vae", "lora_dynamic_apply", "t5_cpu_offload"]


@pytest.mark.parametrize("key", YES_NO_KEYS)
def test_yes_no_keys_take_booleans_and_refuse_anything_else(key, tiny, tmp_path, capsys):
    for value, want in ((False, False), ("false", False), ("FALSE", False), (True, True), ("true", True)):
        assert getattr(GenerationConfig.from_dict({key: value}), key) is want, value
        assert getattr(GenerationConfig().updated({key: value}), key) is want, value  # create_generator keywords
    for bad in ("yes", "0", "", 1, 0, [], {}):
        with pytest.raises(ValueError, match=f"{key} must be true or false, got"):
            GenerationConfig.from_dict({key: bad})
    cfg = GenerationConfig(**{key: "no"})  # made from keywords: checked by check()
    with pytest.raises(ValueError, match=f"{key} must be true or false"):
        cfg.check()
    line = _error_line(["--model_path", tiny, "--config_json", _config(tmp_path, **{key: "off"})], capsys)
    assert key in line and '"off"' in line


def test_false_string_keeps_the_feature_off(tiny, tmp_path, capsys):
    """`"enable_cfg": "false"` used to turn CFG on (any non-empty string was true)."""
    cfg = GenerationConfig.from_dict({"enable_cfg": "false", "sample_guide_scale": 5.0, "cpu_offload": "false"})
    assert cfg.cfg_enabled is False and cfg.guidance == 1.0 and cfg.offload_options().cpu_offload is False


# ---------------------------------------------------------------------------------------------
# 2. every input checked before anything loads


def _bad_image(tmp_path, kind) -> str:
    if kind == "missing":
        return str(tmp_path / "missing.png")
    if kind == "text":
        (tmp_path / "notes.png").write_text("not an image")
        return str(tmp_path / "notes.png")
    if kind == "folder":
        (tmp_path / "images").mkdir()
        return str(tmp_path / "images")
    if kind == "truncated":
        data = (tmp_path / "ok.png").read_bytes() if (tmp_path / "ok.png").exists() else None
        if data is None:
            _image(tmp_path / "ok.png", (64, 64))
            data = (tmp_path / "ok.png").read_bytes()
        (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
        return str(tmp_path / "cut.png")
    raise AssertionError(kind)


CHECKED_BEFORE_LOADING = [
    ("save folder", lambda t: ["--save_result_path", str(t)], "is a folder"),
    ("save in a file", lambda t: ["--save_result_path", str(t / "cfg.json" / "x.mp4")], "is a file, not a folder"),
    ("unwritable", lambda t: ["--save_result_path", "/proc/wan_core_test/x.mp4"], "cannot write in"),
    ("empty save path", lambda t: ["--save_result_path", ""], "--save_result_path is empty"),
    ("fps 0", lambda t: ["--config_json", _config(t, fps=0)], "fps must be a positive number"),
    ("fps string", lambda t: ["--config_json", _config(t, fps="16")], 'fps must be a number, got "16"'),
    ("image missing", lambda t: ["--task", "i2v", "--image_path", _bad_image(t, "missing")], "input image not found"),
    ("not an image", lambda t: ["--task", "i2v", "--image_path", _bad_image(t, "text")], "is not a readable image file"),
    ("image folder", lambda t: ["--task", "i2v", "--image_path", _bad_image(t, "folder")], "is a folder"),
    ("truncated image", lambda t: ["--task", "i2v", "--image_path", _bad_image(t, "truncated")], "cannot be read"),
]  # fmt: skip


@pytest.mark.parametrize("case", CHECKED_BEFORE_LOADING, ids=[c[0] for c in CHECKED_BEFORE_LOADING])
def test_inputs_are_checked_before_any_model_loads(case, tiny, tmp_path, capsys):
    _, args, message = case
    (tmp_path / "cfg.json").write_text("{}")
    argv = ["--model_path", tiny, "--config_json", _config(tmp_path)] + args(tmp_path)
    line = _error_line(argv, capsys)
    assert message in line, line
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root reads and writes anything")
def test_unreadable_image_and_unwritable_folder(tiny, tmp_path, capsys):
    img = _image(tmp_path / "secret.png")
    os.chmod(img, 0)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        line = _error_line(["--task", "i2v", "--model_path", tiny, "--image_path", img], capsys)
        assert "cannot be read" in line
        line = _error_line(["--model_path", tiny, "--save_result_path", str(locked / "x.mp4")], capsys)
        assert "cannot write in" in line
    finally:
        os.chmod(img, 0o644), os.chmod(locked, 0o755)


@pytest.fixture(scope="module")
def pipe(tiny):
    from wan_core.pipeline import WanPipeline

    return WanPipeline(tiny, "wan2.1_distill", device="cpu", dtype="fp32").create_generator(**TINY_RUN)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"save_result_path": "FOLDER"}, "is a folder"),
        ({"save_result_path": ""}, "save_result_path is empty"),
        ({"seed": 2**64}, "seed must be at most 2**64 - 1"),
        ({"seed": "42"}, "seed must be an integer"),
        ({"prompt": "a \udcff fox"}, "prompt is not valid UTF-8 text (byte 0xff at character 2)"),
        ({"negative_prompt": b"blurry"}, "negative_prompt must be text"),
    ],
)
def test_python_api_checks_generate_inputs_before_any_work(pipe, tmp_path, monkeypatch, kwargs, message):
    def started(*a, **k):
        raise AssertionError("the run started before its inputs were checked")

    monkeypatch.setattr(pipe, "encode_text", started)
    kwargs = {k: (str(tmp_path) if v == "FOLDER" else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError) as e:
        pipe.generate(**{"seed": 1, "prompt": "x", **kwargs})
    assert message in str(e.value)


# ---------------------------------------------------------------------------------------------
# 3. a size limit


def test_run_size_estimate_and_limit(tiny, tmp_path, capsys, monkeypatch):
    est = estimate_run(81, 480, 832)
    assert est.tokens == 21 * 30 * 52  # the DiT sequence of Wan's 480p run
    assert est.frames_bytes == 81 * 480 * 832 * 3 * 4
    assert estimate_run(81, 960, 1664).activation_bytes == 4 * est.activation_bytes  # linear in tokens
    for argv in (["--target_shape", "8192", "8192"], ["--num_frames", "100001", "--target_shape", "480", "832"]):
        line = _error_line(["--model_path", tiny, "--config_json", _config(tmp_path)] + argv, capsys)
        assert "DiT tokens) needs at least" in line and "GiB of host memory" in line and "--allow-large" in line
    # the override: a machine with 1 GiB runs a large video only when asked to
    monkeypatch.setattr("wan_core.inputs.host_memory", lambda: 2**30)
    with pytest.raises(ValueError, match="allow_large_runs"):
        check_run_size(81, 480, 832, "cpu")
    assert check_run_size(81, 480, 832, "cpu", allow_large=True).tokens == est.tokens
    assert GenerationConfig.from_dict({"allow_large_runs": "true"}).allow_large_runs is True
    check_run_size(5, 32, 32, "cpu")  # a small run passes


# ---------------------------------------------------------------------------------------------
# 4. nothing half-written


def test_video_appears_at_its_path_only_when_complete(tmp_path):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"old video")
    w = VideoWriter(out, fps=16, background=True)
    w.write(torch.rand(3, 16, 16, 3))
    assert out.read_bytes() == b"old video"  # still the old file while the new one is written
    w.close()
    assert read_video(out)[0].shape == (3, 16, 16, 3) and _leftovers(tmp_path) == []
    w = VideoWriter(out, fps=16)
    w.write(torch.rand(2, 16, 16, 3))
    w.abort()
    assert read_video(out)[0].shape == (3, 16, 16, 3) and _leftovers(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True], ids=["new file", "existing file"])
def test_sigterm_during_encoding_leaves_nothing_half_written(existing, tiny, tmp_path, capsys, monkeypatch):
    """SIGTERM while the video is being written stops the run as Ctrl-C does: exit 130, no partial file,
    an existing file untouched (the CLI's handler is removed again when main returns)."""
    out = tmp_path / "out.mp4"
    if existing:
        out.write_bytes(b"previous video")
    write = VideoWriter.write

    def write_then_term(self, frames):
        write(self, frames)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(VideoWriter, "write", write_then_term)
    before = signal.getsignal(signal.SIGTERM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["--model_path", tiny, "--config_json", _config(tmp_path), "--save_result_path", str(out)])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) == before
    assert (out.read_bytes() == b"previous video") if existing else not out.exists()
    assert _leftovers(tmp_path) == []


def test_existing_target_is_replaced_with_a_warning(tiny, tmp_path, capsys):
    out = tmp_path / "again.mp4"
    out.write_bytes(b"previous video")
    with pytest.warns(UserWarning, match="exists: it is replaced once the new video is complete") as got:
        assert main(["--model_path", tiny, "--config_json", _config(tmp_path), "--save_result_path", str(out)]) == 0
    assert sum("exists" in str(w.message) for w in got) == 1  # the CLI's check and generate's: one warning
    assert read_video(out)[0].shape == (5, 32, 32, 3) and _leftovers(tmp_path) == []
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# 5. one line instead of a traceback

ONE_LINE = [
    ("text_len string", lambda t, m: ["--model_path", m, "--config_json", _config(t, text_len="512")], 'text_len must be an integer, got "512"'),
    ("guidance null", lambda t, m: ["--model_path", m, "--config_json", _config(t, sample_guide_scale=None)], "sample_guide_scale must be a number, got null"),
    ("attention int", lambda t, m: ["--model_path", m, "--config_json", _config(t, self_attn_1_type=5)], "self_attn_1_type must be a string, got 5"),
    ("fps string", lambda t, m: ["--model_path", m, "--config_json", _config(t, fps="16")], 'fps must be a number, got "16"'),
    ("seed 2**64", lambda t, m: ["--model_path", m, "--seed", str(2**64)], "seed must be at most 2**64 - 1"),
    ("invalid UTF-8", lambda t, m: ["--model_path", m, "--prompt", "caf\udce9"], "prompt is not valid UTF-8 text (byte 0xe9"),
    ("tiny-model onto a file", lambda t, m: ["tiny-model", "--out", str(t / "cfg.json")], "is an existing file"),
    ("bad device string", lambda t, m: ["--model_path", m, "--device", "gpu0"], "is not a device"),
    ("bad JSON", lambda t, m: ["--model_path", m, "--config_json", str(t / "broken.json")], "not valid JSON"),
]  # fmt: skip
NO_GPU = [
    ("cuda without a GPU", lambda t, m: ["--model_path", m, "--device", "cuda"], "device 'cuda' asked for"),
    ("sage_triton on a CPU", lambda t, m: ["--model_path", m, "--device", "cpu", "--attention", "sage_triton"], "runs on CUDA GPUs only"),
]  # fmt: skip
if not torch.cuda.is_available():
    ONE_LINE += NO_GPU


@pytest.mark.parametrize("case", ONE_LINE, ids=[c[0] for c in ONE_LINE])
def test_user_errors_are_one_line(case, tiny, tmp_path, capsys):
    _, args, message = case
    (tmp_path / "cfg.json").write_text("{}")
    (tmp_path / "broken.json").write_text("{'infer_steps': 4}")
    line = _error_line(args(tmp_path, tiny), capsys)
    assert message in line, line


def test_debug_shows_the_traceback(tiny, tmp_path, capsys, monkeypatch):
    argv = ["--model_path", tiny, "--config_json", _config(tmp_path, text_len="512")]
    assert main(argv + ["--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("WAN_CORE_DEBUG", "1")
    assert main(argv) == 2
    assert "Traceback" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 6. warnings for silent surprises


def test_16_bit_grayscale_png_keeps_its_levels(tmp_path):
    from wan_core.models.conditioning import load_image

    ramp = np.linspace(0, 1, 64 * 32).reshape(32, 64)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray((ramp * 255).round().astype(np.uint8)).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    deep, flat = load_image(tmp_path / "g16.png"), load_image(tmp_path / "g8.png")
    assert deep.shape == (3, 32, 64)
    assert (deep - flat).abs().max() <= 2 / 255 + 1e-6  # the same picture, not nearly white
    assert abs(deep.mean().item()) < 0.01


def test_long_prompt_warns_that_it_is_cut(tiny):
    from wan_core.models.tokenizer import load_tokenizer

    tok = load_tokenizer(os.path.join(tiny, "google", "umt5-xxl"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, _ = tok("a short prompt")  # no warning
    with pytest.warns(UserWarning, match=r"a prompt of \d+ tokens is cut to the text encoder's 512"):
        ids, mask = tok(" ".join(["fox"] * 700))
    assert ids.shape == (1, 512) and mask.sum() == 512


@pytest.mark.parametrize("scale", [-1.0, -7.5])
def test_negative_guidance_warns(scale):
    with pytest.warns(UserWarning, match="is negative: guidance pushes the video away from the prompt"):
        GenerationConfig(sample_guide_scale=scale).check()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GenerationConfig(sample_guide_scale=scale, enable_cfg=False).check()  # not applied: no warning


# ---------------------------------------------------------------------------------------------
# 8. LightX2V semantics: a DiT file's architecture comes from model_path's config.json


def _bare_dit_file(tiny, path):
    """The tiny DiT as one safetensors file without the config in its header (as a downloaded
    merged/distilled checkpoint): its shapes give dim 64, from which 128-wide heads would make 1 head."""
    from safetensors.torch import save_file

    from wan_core.loading.dit import find_dit_files
    from wan_core.loading.io import read_state_dict

    files, _ = find_dit_files(tiny)
    save_file({k: v.contiguous() for k, v in read_state_dict(files).items()}, str(path))
    return str(path)


@pytest.mark.parametrize("key", ["dit_original_ckpt", "dit_quantized_ckpt"])
def test_dit_file_takes_the_architecture_from_model_path(key, tiny, tmp_path):
    from wan_core.pipeline import WanPipeline

    dit = _bare_dit_file(tiny, tmp_path / "merged.safetensors")
    with open(os.path.join(tiny, "config.json")) as f:
        heads = json.load(f)["num_heads"]
    assert heads == 4 and max(1, 64 // 128) != heads  # what the shapes alone would give is wrong
    extra = {"dit_quantized": True, "dit_quant_scheme": "fp8"} if key == "dit_quantized_ckpt" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file agrees with the folder's config: no warning
        warnings.filterwarnings("ignore", message=".*(FP8|fp8|quantis).*")
        pipe = WanPipeline(tiny, "wan2.1_distill", device="cpu", dtype="fp32").create_generator(**TINY_RUN, **{key: dit}, **extra)
    assert pipe.spec.dit == dit and pipe.dit.cfg.num_heads == heads


def test_dit_file_contradicting_the_folder_config_warns(tiny, tmp_path):
    import shutil

    from wan_core.pipeline import WanPipeline

    folder = tmp_path / "model"
    shutil.copytree(tiny, folder)
    with open(folder / "config.json") as f:
        cfg = json.load(f)
    (folder / "config.json").write_text(json.dumps({**cfg, "num_layers": 3, "num_heads": 3}))
    dit = _bare_dit_file(tiny, tmp_path / "other.safetensors")
    with pytest.warns(UserWarning, match="does not match the checkpoint's tensors") as got:
        pipe = WanPipeline(str(folder), "wan2.1_distill", device="cpu", dtype="fp32").create_generator(**TINY_RUN, dit_original_ckpt=dit)
    text = " ".join(str(w.message) for w in got)
    assert "num_layers 3 (file: 2)" in text and "num_heads 3 (does not divide the file's dim 64" in text
    assert pipe.dit.cfg.num_layers == 2 and 64 % pipe.dit.cfg.num_heads == 0  # what the file holds runs


# ---------------------------------------------------------------------------------------------
# 9. install and first run


def test_tiny_model_is_readable_by_all(tmp_path):
    out = write_tiny_model(tmp_path / "m", "t2v", "wan")
    modes = {}
    for folder, dirs, files in os.walk(out):
        for name in dirs + files + ([""] if folder == out else []):
            path = os.path.join(folder, name)
            modes[path] = stat.S_IMODE(os.stat(path).st_mode)
    assert len(modes) > 5
    for path, mode in modes.items():
        assert mode == (0o755 if os.path.isdir(path) else 0o644), (path, oct(mode))


def test_help_says_flags_only_runs_generate(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Without a subcommand the arguments are LightX2V's and run `generate`" in text and "--debug" in text


def test_lora_mismatch_message_names_what_can_be_done(tmp_path):
    from wan_core.layers.lora import LoraMismatchError, apply_loras
    from wan_core.loading.lora import random_lora, save_lora
    from wan_core.loading.tiny import tiny_dit_config, tiny_dit_state_dict
    from wan_core.models.dit import WanModel

    model = WanModel(tiny_dit_config("t2v"))
    model.load_state_dict(tiny_dit_state_dict("t2v", 0))
    path = save_lora(random_lora(tiny_dit_config("i2v"), seed=1), tmp_path / "i2v.safetensors")
    with pytest.raises(LoraMismatchError) as e:
        apply_loras(model, [(path, 1.0)])
    assert "apply_loras(..., strict=False)" in str(e.value) and "from a config or the CLI" in str(e.value)


def test_progress_is_plain_lines_when_not_a_terminal(tiny, tmp_path, capsys):
    from wan_core.progress import progress_bar

    assert progress_bar(4, True).disable  # stderr is captured here: not a TTY
    assert main(["--model_path", tiny, "--config_json", _config(tmp_path), "--save_result_path", str(tmp_path / "p.mp4")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "%|" not in err  # no bar redrawn into the log
    assert [ln.split(" (")[0] for ln in err.splitlines() if ln.startswith("step ")] == [f"step {i}/4" for i in range(1, 5)]
    for name in ("DiT:", "T5 text encoder:", "VAE:"):  # what loads, with its size and time
        line = next(ln for ln in err.splitlines() if ln.startswith(name))
        assert ("MiB in " in line or "GiB in " in line) and line.endswith(" s"), line


def test_test_extra_does_not_pin_triton():
    """A pin would make `pip install -e .[test]` replace a CUDA torch's own triton (and that torch)."""
    import tomllib

    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "pyproject.toml"), "rb") as f:
        test_extra = tomllib.load(f)["project"]["optional-dependencies"]["test"]
    triton = [r for r in test_extra if r.startswith("triton")]
    assert triton and all("==" not in r.split(";")[0] and "<" not in r.split(";")[0] for r in triton), triton


# ---------------------------------------------------------------------------------------------
# 6b. Wan2.2 files and settings that do not make a run: one line, through WanPipeline and the CLI,
# before any model is built (tiny Wan2.2 models: the conftest's tiny22)


@pytest.fixture(scope="module")
def wan21_i2v(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("wan21_i2v") / "i2v", "i2v", "comfyui", seed=3)


def _comfy22(tiny22, task, expert):
    name = "wan2.2_ti2v_5B_fp16" if task == "ti2v" else f"wan2.2_{task}_{expert}_noise_14B_fp16"
    return os.path.join(tiny22(task, "comfyui"), "diffusion_models", f"{name}.safetensors")


# (id, model folder, model_cls, task, paths given (WanPipeline keyword = CLI flag), config keys, message)
WAN22_BAD = [
    ("Wan2.1 I2V DiT as an expert", lambda t, w: t("i2v"), "wan2.2_moe", "i2v",
     lambda t, w: {"high_noise_path": os.path.join(w, COMFY_NAMES["i2v"])}, {},
     "is a Wan2.1 I2V DiT (it has the CLIP image branch: img_emb / k_img), but a Wan2.2 I2V run needs a Wan2.2 I2V-A14B expert"),
    ("Wan2.2 expert as the Wan2.1 DiT", lambda t, w: w, "wan2.1", "i2v",
     lambda t, w: {"dit_path": _comfy22(t, "i2v", "high")}, {},
     "is a Wan2.2 I2V-A14B expert (in_dim 36, no CLIP image branch"),
    ("TI2V-5B DiT as an expert", lambda t, w: t("t2v"), "wan2.2_moe_distill", "t2v",
     lambda t, w: {"high_noise_path": _comfy22(t, "ti2v", None)}, {}, "is the Wan2.2 TI2V-5B DiT"),
    ("experts swapped", lambda t, w: t("i2v", "comfyui"), "wan2.2_moe", "i2v",
     lambda t, w: {"high_noise_path": _comfy22(t, "i2v", "low"), "low_noise_path": _comfy22(t, "i2v", "high")}, {},
     "the experts are swapped"),
    ("low-noise file as the high expert", lambda t, w: t("t2v"), "wan2.2_moe_distill", "t2v",
     lambda t, w: {"high_noise_path": os.path.join(t("t2v"), "low_noise_model")}, {},
     "the high-noise expert given is a low-noise file ('low_noise_model' in its path"),
    ("TI2V-5B with the Wan2.1 VAE", lambda t, w: t("ti2v"), "wan2.2", "t2v",
     lambda t, w: {"vae_path": os.path.join(t("t2v"), "Wan2.1_VAE.pth")}, {},
     "is the Wan2.1 VAE (16 latent channels), but the Wan2.2 TI2V-5B DiT"),
    ("unnamed LoRA entry", lambda t, w: t("t2v"), "wan2.2_moe_distill", "t2v", lambda t, w: {},
     {"lora_configs": [{"path": "distill_lora.safetensors", "strength": 1.0}]},
     'lora_configs[0] needs "name": "high_noise_model" or "low_noise_model"'),
    ("boundary and boundary_step_index", lambda t, w: t("t2v"), "wan2.2_moe", "t2v", lambda t, w: {},
     {"boundary": 0.875, "boundary_step_index": 2}, "give either boundary"),
    ("feature caching with two experts", lambda t, w: t("t2v"), "wan2.2_moe", "t2v", lambda t, w: {},
     {"feature_caching": "Tea"}, "feature caching (TeaCache / MagCache) is not available for the two-expert"),
    ("TI2V size not a multiple of 32", lambda t, w: t("ti2v"), "wan2.2", "t2v", lambda t, w: {},
     {"target_height": 48}, "TI2V-5B sizes are multiples of 32 (VAE 16 x patch 2), got 48x96"),
    ("wan2.2 on a folder without a 5B", lambda t, w: t("t2v", "comfyui"), "wan2.2", "t2v", lambda t, w: {}, {},
     "the Wan2.2 TI2V-5B DiT (diffusion model) not found; looked for"),
    ("dit_path for two experts", lambda t, w: t("t2v"), "wan2.2_moe", "t2v",
     lambda t, w: {"dit_path": os.path.join(t("t2v"), "high_noise_model")}, {},
     "wan2.2_moe has two experts: give high_noise_path= and low_noise_path=, not dit_path="),
    ("[high, low] scale for one model", lambda t, w: t("ti2v"), "wan2.2", "t2v", lambda t, w: {},
     {"sample_guide_scale": [4.0, 3.0]}, "is a [high, low] pair, which only the two-expert Wan2.2 A14B models"),
]  # fmt: skip


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any model build fails the test: the error must come first."""
    from wan_core.pipeline import WanPipeline

    def load(self):
        raise AssertionError("a model was built before the error")

    monkeypatch.setattr(WanPipeline, "load", load)


def _wan22_size(model_cls):
    return {"target_video_length": 5, **({"target_height": 64, "target_width": 96} if model_cls == "wan2.2" else
                                          {"target_height": 32, "target_width": 48})}  # fmt: skip


@pytest.mark.parametrize("case", WAN22_BAD, ids=[c[0] for c in WAN22_BAD])
def test_wan22_mistakes_are_one_line_before_any_model(case, tiny22, wan21_i2v, tmp_path, capsys, nothing_loads):
    from wan_core.pipeline import WanPipeline

    _, folder, model_cls, task, paths, config, message = case
    folder, paths = folder(tiny22, wan21_i2v), paths(tiny22, wan21_i2v)
    run = {**_wan22_size(model_cls), **config}
    with pytest.raises((ValueError, OSError)) as e:
        WanPipeline(folder, model_cls, task, dtype="fp32", device="cpu", **paths).create_generator(**run)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    cfg = tmp_path / "wan22.json"
    cfg.write_text(json.dumps(run))
    argv = ["--model_cls", model_cls, "--task", task, "--model_path", folder, "--config_json", str(cfg),
            "--device", "cpu", "--save_result_path", str(tmp_path / "x.mp4")]  # fmt: skip
    if task == "i2v":
        argv += ["--image_path", _image(tmp_path / "start.png")]
    for flag, value in paths.items():
        argv += [f"--{flag}", value]
    line = _error_line(argv, capsys)
    assert message in line, line
    assert not (tmp_path / "x.mp4").exists() and _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 7. the task API (request objects and routes, over a stand-in for aiohttp)


@pytest.fixture
def folders(tmp_path):
    inp, out = tmp_path / "input", tmp_path / "output"
    inp.mkdir(), out.mkdir()
    return str(inp), str(out)


def _png(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("how", ["file", "base64", "data url"])
def test_task_api_decompression_bomb_is_a_400(folders, monkeypatch, how):
    from tasks_api.request import RequestError, parse_request

    inp, out = folders
    data = _png(200, 100)  # 20000 pixels: a bomb once PIL's limit is 1000 (more than twice the limit)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    if how == "file":
        with open(os.path.join(inp, "bomb.png"), "wb") as f:
            f.write(data)
        image_path = "bomb.png"
    else:
        image_path = ("data:image/png;base64," if how == "data url" else "") + base64.b64encode(data).decode()
    with pytest.raises(RequestError) as e:
        parse_request({"prompt": "x", "image_path": image_path}, input_dir=inp, output_dir=out)
    assert e.value.status == 400 and "the image is too large" in e.value.detail


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_task_api_prompt_length_is_capped(folders, field):
    from tasks_api.request import MAX_PROMPT_CHARS, RequestError, parse_request

    inp, out = folders
    parse_request({field: "a" * MAX_PROMPT_CHARS}, input_dir=inp, output_dir=out)
    with pytest.raises(RequestError) as e:
        parse_request({field: "a" * (MAX_PROMPT_CHARS + 1)}, input_dir=inp, output_dir=out)
    assert e.value.status == 400 and f"{field} is 20,001 characters; at most 20,000" in e.value.detail


class _TooLarge(Exception):
    text = "Maximum request body size 1048576 exceeded, actual body size 2097152"


@pytest.fixture
def routes(monkeypatch):
    """tasks_api.routes imported over a stand-in for aiohttp.web (aiohttp exists only beside ComfyUI)."""
    web = types.SimpleNamespace(
        json_response=lambda data, status=200: types.SimpleNamespace(status=status, data=data),
        HTTPRequestEntityTooLarge=_TooLarge, Request=object, Response=object, StreamResponse=object,
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "aiohttp", types.SimpleNamespace(web=web))
    sys.modules.pop("tasks_api.routes", None)
    import tasks_api.routes as routes

    yield routes
    sys.modules.pop("tasks_api.routes", None)


class _Request:
    def __init__(self, raw: bytes, length: int | None = -1, fail: Exception | None = None):
        self.raw, self.content_length, self.fail = raw, len(raw) if length == -1 else length, fail

    async def read(self):
        if self.fail is not None:
            raise self.fail
        return self.raw


@pytest.mark.parametrize(
    "request_,status,message",
    [
        (_Request(b"{}", length=65 * 2**20), 413, "the request body is 65.0 MB; at most 64 MB"),
        (_Request(b'{"prompt": "' + b"a" * (2 * 2**20) + b'"}', length=None), 413, "at most 2 MB"),
        (_Request(b"x", fail=_TooLarge()), 413, "Maximum request body size 1048576 exceeded"),
        (_Request(b"\xff\xfe{"), 400, "the request body must be JSON"),
        (_Request(json.dumps({"prompt": "x" * 20_001}).encode()), 400, "prompt is 20,001 characters"),
    ],
    ids=["content-length", "bytes over the env limit", "aiohttp's limit", "not JSON", "long prompt"],
)
def test_task_api_routes_answer_413_and_400_with_a_message(routes, request_, status, message, monkeypatch):
    from tasks_api.service import TaskService

    if "env limit" in message or message == "at most 2 MB":
        monkeypatch.setenv("WAN_TASKS_MAX_BODY_MB", "2")
    backend = types.SimpleNamespace(input_dir=lambda: "/nonexistent", output_dir=lambda: "/nonexistent", lora_names=lambda: None)
    video = next(h for m, p, h in routes.handlers(TaskService(backend)) if (m, p) == ("POST", "/v1/tasks/video/"))
    resp = asyncio.run(video(request_))
    assert resp.status == status and message in resp.data["detail"], resp.data
