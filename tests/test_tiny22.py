"""Tiny Wan2.2 models in the real layouts (A14B expert pairs, TI2V-5B with the Wan2.2 VAE), their
discovery, and the one-line errors for files that do not belong together (`wan_core.loading.family`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from wan_core.cli import main
from wan_core.loading.discover import ModelFamilyError, find_model_files, model_config_json
from wan_core.loading.dit import load_dit, official_to_diffusers, save_dit
from wan_core.loading.family import check_dit_family, check_expert_pair, check_vae_fits, path_hints
from wan_core.loading.tiny import (
    tiny_dit22_config,
    tiny_dit22_state_dict,
    tiny_model_dir,
    tiny_vae22_state_dict,
    tiny_vae_state_dict,
    write_tiny_model,
)
from wan_core.loading.tiny22 import COMFY22_NAMES
from wan_core.loading.tiny_parts import TINY_VAE22
from wan_core.loading.vae import load_vae
from wan_core.loading.vae22 import load_vae22, load_vae22_state_dict, vae22_config_from_state_dict

REF = Path(__file__).resolve().parent / "reference" / "checkpoint_layouts"
TASKS = ("t2v", "i2v", "ti2v")
LAYOUTS = ("wan", "comfyui", "diffusers")
SEED = 1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny22")
    return {
        (task, layout): Path(write_tiny_model(root / f"{task}-{layout}", task, layout, seed=SEED, family="wan2.2"))
        for task in TASKS
        for layout in LAYOUTS
    }


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
    """Wan2.1 tiny models (ComfyUI layout: files named as ComfyUI's) to give where Wan2.2 is expected."""
    root = tmp_path_factory.mktemp("tiny21")
    return {task: Path(write_tiny_model(root / task, task, "comfyui", seed=SEED)) for task in ("t2v", "i2v")}


def _load(path, task):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' config says qk_norm "rms_norm_across_heads" (a string)
        return load_dit(str(path), dtype=torch.float32, task=task)


def _expected(root: Path, task: str, layout: str) -> dict:
    """The files each layout has (WAN22.md), by hand."""
    if layout == "wan":
        dits = {"dit": root} if task == "ti2v" else {"high": root / "high_noise_model", "low": root / "low_noise_model"}
        vae = root / ("Wan2.2_VAE.pth" if task == "ti2v" else "Wan2.1_VAE.pth")
        return {
            **dits,
            "vae": vae,
            "t5": root / "models_t5_umt5-xxl-enc-bf16.pth",
            "tokenizer": root / "google" / "umt5-xxl",
        }
    if layout == "comfyui":
        if task == "ti2v":
            dits = {"dit": root / "diffusion_models" / "wan2.2_ti2v_5B_fp16.safetensors"}
        else:
            dits = {
                e: root / "diffusion_models" / f"wan2.2_{task}_{e}_noise_14B_fp16.safetensors" for e in ("high", "low")
            }
        vae = root / "vae" / ("wan2.2_vae.safetensors" if task == "ti2v" else "wan_2.1_vae.safetensors")
        return {**dits, "vae": vae, "t5": root / "text_encoders" / "umt5_xxl_fp16.safetensors", "tokenizer": None}
    dits = (
        {"dit": root / "transformer"}
        if task == "ti2v"
        else {"high": root / "transformer", "low": root / "transformer_2"}
    )
    return {
        **dits,
        "vae": root / "vae" / "diffusion_pytorch_model.safetensors",
        "t5": root / "text_encoder" / "model.safetensors",
        "tokenizer": root / "tokenizer",
    }


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("task", TASKS)
def test_every_layout_is_discovered(models, task, layout):
    root = models[(task, layout)]
    files = find_model_files(str(root), task, family="wan2.2")
    exp = _expected(root, task, layout)
    got = {
        "dit": files.dit,
        "high": files.dit_high,
        "low": files.dit_low,
        "vae": files.vae,
        "t5": files.t5,
        "tokenizer": files.tokenizer,
    }
    want = {k: (str(exp[k]) if exp.get(k) is not None else None) for k in got}
    assert got == want
    assert files.clip is None and files.family == "wan2.2" and files.layout == layout
    assert files.experts == (None if task == "ti2v" else (want["high"], want["low"]))
    # no CLIP file in any layout: Wan2.2 has none
    assert (
        not list(root.glob("models_clip*"))
        and not (root / "clip_vision").exists()
        and not (root / "image_encoder").exists()
    )
    if layout == "wan" and task != "ti2v":  # sharded experts, as the release
        assert (root / "high_noise_model" / "diffusion_pytorch_model.safetensors.index.json").is_file()


def _key_pattern(keys) -> set[str]:
    return {re.sub(r"^blocks\.\d+\.", "blocks.N.", k) for k in keys}


@pytest.mark.parametrize("task", TASKS)
def test_discovered_dits_load_the_same_weights_in_every_layout(models, task):
    cfg = tiny_dit22_config(task)
    ref_name = {
        "t2v": "wan2.2_t2v_a14b_dit.json",
        "i2v": "wan2.2_i2v_a14b_dit.json",
        "ti2v": "wan2.2_ti2v_5b_dit.json",
    }[task]
    ref_keys = json.loads((REF / ref_name).read_text())["tensors"]
    experts = ("dense",) if task == "ti2v" else ("high", "low")
    loaded = {}
    for layout in LAYOUTS:
        files = find_model_files(str(models[(task, layout)]), task, family="wan2.2")
        paths = {"dense": files.dit} if task == "ti2v" else {"high": files.dit_high, "low": files.dit_low}
        for expert in experts:
            model = _load(paths[expert], task)
            assert model.cfg == cfg, (layout, expert)
            assert (
                model.cfg.clip_branch is False
                and (model.cfg.in_dim, model.cfg.out_dim) == {"t2v": (16, 16), "i2v": (36, 16), "ti2v": (48, 48)}[task]
            )
            loaded[(layout, expert)] = model.state_dict()
    for expert in experts:
        want = tiny_dit22_state_dict(task, SEED, expert)
        # the official key set of the real model (block count aside): no img_emb, no k_img
        assert _key_pattern(want) == _key_pattern(ref_keys)
        for layout in LAYOUTS:
            sd = loaded[(layout, expert)]
            assert set(sd) == set(want)
            assert all(torch.equal(sd[k], want[k]) for k in want), (layout, expert)
    if task != "ti2v":
        high, low = tiny_dit22_state_dict(task, SEED, "high"), tiny_dit22_state_dict(task, SEED, "low")
        assert all(not torch.equal(high[k], low[k]) for k in high if high[k].numel() > 1)
        assert not torch.equal(
            high["blocks.0.self_attn.q.weight"],
            tiny_dit22_state_dict(task, SEED + 1, "high")["blocks.0.self_attn.q.weight"],
        )


@pytest.mark.parametrize("task", TASKS)
def test_the_vae_of_each_model(models, task):
    for layout in LAYOUTS:
        vae = find_model_files(str(models[(task, layout)]), task, family="wan2.2").vae
        if task == "ti2v":
            sd = load_vae22_state_dict(vae)
            cfg = vae22_config_from_state_dict(sd)
            assert cfg == TINY_VAE22 and cfg.z_dim == 48
            model = load_vae22(vae, dtype=torch.float32, config=cfg)
            want = tiny_vae22_state_dict(SEED)
        else:
            model = load_vae(vae, dtype=torch.float32)
            assert model.config.z_dim == 16
            want = tiny_vae_state_dict(SEED)
        got = model.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), layout


def test_diffusers_loads_the_tiny_folders(models):
    diffusers = pytest.importorskip("diffusers")
    for task, cls, boundary in (
        ("t2v", "WanPipeline", 0.875),
        ("i2v", "WanImageToVideoPipeline", 0.9),
        ("ti2v", "WanPipeline", None),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = getattr(diffusers, cls).from_pretrained(str(models[(task, "diffusers")]), torch_dtype=torch.float32)
        assert pipe.config.boundary_ratio == boundary and bool(pipe.config.expand_timesteps) == (task == "ti2v")
        assert pipe.vae.config.z_dim == (48 if task == "ti2v" else 16)
        if task == "i2v":
            assert pipe.image_encoder is None
        experts = {"transformer": "dense"} if task == "ti2v" else {"transformer": "high", "transformer_2": "low"}
        assert (pipe.transformer_2 is None) == (task == "ti2v")
        for attr, expert in experts.items():
            want = official_to_diffusers(tiny_dit22_state_dict(task, SEED, expert))
            got = getattr(pipe, attr).state_dict()
            assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), (task, attr)


# ----------------------------------------------------------------------------- one-line errors


def _error(fn, *args, match: str, **kw) -> str:
    with pytest.raises(ModelFamilyError, match=match) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_wan21_i2v_dit_as_a_wan22_expert_and_the_reverse(models, wan21):
    root22 = models[("i2v", "comfyui")]
    d21 = str(wan21["i2v"] / "diffusion_models" / "wan2.1_i2v_480p_14B_bf16.safetensors")
    d22 = str(root22 / COMFY22_NAMES[("i2v", "high")])
    msg = _error(find_model_files, str(root22), "i2v", family="wan2.2", high=d21, match="is a Wan2.1 I2V DiT")
    assert "CLIP image branch" in msg and d21 in msg and "give the Wan2.2 I2V-A14B experts" in msg
    # the reverse: a Wan2.2 I2V expert in a Wan2.1 run, told by its keys whatever its name
    renamed = wan21["i2v"].parent / "neutral.safetensors"
    shutil.copy(d22, renamed)
    for dit in (d22, str(renamed)):
        msg = _error(find_model_files, str(wan21["i2v"]), "i2v", dit=dit, match="is a Wan2.2 I2V-A14B expert")
        assert "no CLIP image branch" in msg and "give a Wan2.1-I2V DiT" in msg


def test_wan21_t2v_dit_as_a_wan22_expert_and_the_reverse_by_names(models, wan21, tmp_path):
    root22 = models[("t2v", "comfyui")]
    d21 = str(wan21["t2v"] / "diffusion_models" / "wan2.1_t2v_14B_bf16.safetensors")
    msg = _error(
        find_model_files,
        str(root22),
        "t2v",
        family="wan2.2",
        low=d21,
        match="the low-noise expert .* is a Wan2.1 T2V DiT",
    )
    assert "only the name tells them apart" in msg and "wan2.1_t2v_14B_bf16.safetensors" in msg
    # a Wan-AI Wan2.1 folder is told by its folder name
    folder = tmp_path / "Wan2.1-T2V-14B"
    write_tiny_model(folder, "t2v", "wan", seed=SEED)
    _error(
        find_model_files, str(root22), "t2v", family="wan2.2", high=str(folder), match="'Wan2.1-T2V-14B' in its path"
    )
    # the reverse: Wan2.2 experts in a Wan2.1 run (ComfyUI name, Wan-AI folder, diffusers transformer_2)
    for dit in (
        root22 / COMFY22_NAMES[("t2v", "high")],
        models[("t2v", "wan")] / "low_noise_model",
        models[("t2v", "diffusers")] / "transformer_2",
    ):
        msg = _error(find_model_files, str(wan21["t2v"]), "t2v", dit=str(dit), match="is a Wan2.2 T2V-A14B expert")
        assert "give a Wan2.1-T2V DiT" in msg
    # what the names cannot tell passes (the key sets are identical): a neutral name in both runs
    neutral = tmp_path / "model.safetensors"
    shutil.copy(d21, neutral)
    check_dit_family(str(neutral), "wan2.2", "t2v")
    check_dit_family(str(neutral), "wan2.1", "t2v")


def test_ti2v_dit_in_a_wan21_run_and_tasks_that_do_not_match(models, wan21):
    ti2v = str(models[("ti2v", "comfyui")] / COMFY22_NAMES[("ti2v", "dense")])
    _error(find_model_files, str(wan21["t2v"]), "t2v", dit=ti2v, match="is the Wan2.2 TI2V-5B DiT .48 latent channels")
    t2v_high = str(models[("t2v", "comfyui")] / COMFY22_NAMES[("t2v", "high")])
    _error(
        find_model_files,
        str(models[("ti2v", "comfyui")]),
        "ti2v",
        family="wan2.2",
        dit=t2v_high,
        match="needs the Wan2.2 TI2V-5B DiT",
    )
    i2v_low = str(models[("i2v", "comfyui")] / COMFY22_NAMES[("i2v", "low")])
    msg = _error(
        find_model_files,
        str(models[("t2v", "comfyui")]),
        "t2v",
        family="wan2.2",
        low=i2v_low,
        match="is a Wan2.2 I2V-A14B expert",
    )
    assert "T2V run needs a Wan2.2 T2V-A14B expert" in msg


@pytest.mark.parametrize("layout", LAYOUTS)
def test_swapped_experts(models, layout):
    root = models[("t2v", layout)]
    files = find_model_files(str(root), "t2v", family="wan2.2")
    msg = _error(
        find_model_files,
        str(root),
        "t2v",
        family="wan2.2",
        high=files.dit_low,
        low=files.dit_high,
        match="the experts are swapped",
    )
    assert f"high = {files.dit_high}" in msg and f"low = {files.dit_low}" in msg
    _error(check_expert_pair, files.dit_low, files.dit_high, "t2v", match="swapped")
    _error(
        check_expert_pair,
        files.dit_high,
        files.dit_high,
        "t2v",
        match="the low-noise expert given is a high-noise file",
    )


def test_one_expert_of_the_wrong_role(models, tmp_path):
    root = models[("i2v", "comfyui")]
    high, low = (str(root / COMFY22_NAMES[("i2v", e)]) for e in ("high", "low"))
    neutral = tmp_path / "expert_b.safetensors"
    shutil.copy(high, neutral)
    msg = _error(check_expert_pair, low, str(neutral), "i2v", match="the high-noise expert given is a low-noise file")
    assert "wan2.2_i2v_low_noise_14B_fp16.safetensors" in msg and "high_noise_original_ckpt" in msg
    _error(check_expert_pair, str(neutral), high, "i2v", match="the low-noise expert given is a high-noise file")
    check_expert_pair(high, str(neutral), "i2v")  # the name says nothing: accepted
    _error(check_expert_pair, str(neutral), str(neutral), "i2v", match="the same file is given as both experts")


def test_experts_of_different_architectures(models, tmp_path):
    root = models[("t2v", "comfyui")]
    cfg = tiny_dit22_config("t2v").replace(num_layers=3)
    with torch.device("meta"):
        from wan_core.models.dit import WanModel

        shapes = WanModel(cfg).state_dict()
    other = save_dit(
        {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in shapes.items()},
        str(tmp_path / "other_low_noise"),
        layout="comfyui",
        cfg=cfg,
    )
    msg = _error(
        check_expert_pair, str(root / COMFY22_NAMES[("t2v", "high")]), other, "t2v", match="different architectures"
    )
    assert "2 blocks" in msg and "3 blocks" in msg


def test_vae_that_does_not_fit_the_dit(models, wan21):
    ti2v, t2v = models[("ti2v", "comfyui")], models[("t2v", "comfyui")]
    vae21, vae22 = str(t2v / COMFY22_NAMES["vae21"]), str(ti2v / COMFY22_NAMES["vae22"])
    msg = _error(
        find_model_files,
        str(ti2v),
        "ti2v",
        family="wan2.2",
        vae=vae21,
        match=r"is the Wan2.1 VAE \(16 latent channels\)",
    )
    assert "TI2V-5B DiT" in msg and "give the Wan2.2 VAE (Wan2.2_VAE.pth" in msg
    msg = _error(
        find_model_files, str(t2v), "t2v", family="wan2.2", vae=vae22, match=r"is the Wan2.2 VAE \(48 latent channels\)"
    )
    assert "Wan2.2 T2V-A14B expert" in msg and "give the Wan2.1 VAE" in msg and "TI2V-5B's only" in msg
    _error(find_model_files, str(wan21["i2v"]), "i2v", vae=vae22, match="the Wan2.2 VAE")
    # the official .pth and diffusers files are read too
    _error(
        check_vae_fits, str(models[("ti2v", "wan")]), str(models[("t2v", "wan")] / "Wan2.1_VAE.pth"), match="Wan2.1 VAE"
    )
    _error(
        check_vae_fits,
        str(models[("t2v", "diffusers")] / "transformer"),
        str(models[("ti2v", "diffusers")] / "vae" / "diffusion_pytorch_model.safetensors"),
        match="Wan2.2 VAE",
    )


def test_checks_read_headers_only(models, wan21, monkeypatch):
    """No tensor is read before the error (safetensors files: headers only)."""
    import wan_core.loading.io as io

    def no_weights(*a, **k):
        raise AssertionError("tensor data read")

    monkeypatch.setattr(io, "read_state_dict", no_weights)
    root = models[("t2v", "comfyui")]
    files = find_model_files(str(root), "t2v", family="wan2.2")
    _error(find_model_files, str(root), "t2v", family="wan2.2", high=files.dit_low, low=files.dit_high, match="swapped")
    _error(find_model_files, str(wan21["t2v"]), "t2v", dit=files.dit_high, match="Wan2.2 T2V-A14B expert")


def test_argument_errors(models, wan21):
    root = str(models[("t2v", "comfyui")])
    with pytest.raises(ValueError, match="two experts: give them as high= and low="):
        find_model_files(root, "t2v", family="wan2.2", dit=root)
    with pytest.raises(ValueError, match="Wan2.1 has one DiT"):
        find_model_files(str(wan21["t2v"]), "t2v", high=root)
    with pytest.raises(ValueError, match="no CLIP image encoder"):
        find_model_files(root, "i2v", family="wan2.2", clip=root)
    with pytest.raises(ValueError, match="a wan2.1 task is one of"):
        find_model_files(root, "ti2v")
    with pytest.raises(ValueError, match="family must be one of"):
        find_model_files(root, "t2v", family="wan2.3")


def test_missing_expert_is_named(models, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(models[("t2v", "wan")], root)
    shutil.rmtree(root / "low_noise_model")
    with pytest.raises(
        FileNotFoundError,
        match=r"the Wan2.2 T2V-A14B low-noise expert not found; looked for .*low_noise_model; pass low_noise_path=",
    ):
        find_model_files(str(root), "t2v", family="wan2.2")
    comfy = tmp_path / "c"
    shutil.copytree(models[("i2v", "comfyui")], comfy)
    (comfy / COMFY22_NAMES[("i2v", "high")]).unlink()
    with pytest.raises(
        FileNotFoundError, match=r"high-noise expert not found; looked for .*<wan2.2_i2v_high_noise_\*>"
    ):
        find_model_files(str(comfy), "i2v", family="wan2.2")


def test_mixed_comfyui_folder(models, wan21, tmp_path):
    """One ComfyUI models folder with Wan2.1 and every Wan2.2 file: each run picks its own."""
    root = tmp_path / "models"
    for src in (wan21["t2v"], wan21["i2v"], *(models[(t, "comfyui")] for t in TASKS)):
        shutil.copytree(src, root, dirs_exist_ok=True)
    high = root / COMFY22_NAMES[("t2v", "high")]
    fp8 = high.with_name("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors")
    from safetensors.torch import load_file, save_file

    save_file({k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in load_file(high).items()}, fp8)
    assert find_model_files(str(root), "t2v").dit.endswith("wan2.1_t2v_14B_bf16.safetensors")
    assert find_model_files(str(root), "i2v").dit.endswith("wan2.1_i2v_480p_14B_bf16.safetensors")
    for task in ("t2v", "i2v"):
        f = find_model_files(str(root), task, family="wan2.2")
        assert (f.dit_high, f.dit_low) == tuple(
            str(root / COMFY22_NAMES[(task, e)]) for e in ("high", "low")
        )  # fp16 over fp8
        assert f.vae == str(root / COMFY22_NAMES["vae21"])
    f = find_model_files(str(root), "ti2v", family="wan2.2")
    assert (f.dit, f.vae) == (str(root / COMFY22_NAMES[("ti2v", "dense")]), str(root / COMFY22_NAMES["vae22"]))
    assert find_model_files(str(root), "t2v", family="wan2.2", high=str(fp8)).dit_high == str(fp8)  # explicit wins
    shutil.copy(high, high.with_name("wan2.2_t2v_high_noise_14B_bf16.safetensors"))
    with pytest.raises(FileNotFoundError, match="several high-noise T2V expert files .*choose one with high_noise_path="):
        find_model_files(str(root), "t2v", family="wan2.2")


def test_path_hints():
    h = path_hints("/m/Wan2.2-T2V-A14B/high_noise_model")
    assert (h.family, h.role) == ("wan2.2", "high")
    h = path_hints("/m/Wan2.2-T2V-A14B/low_noise_model/diffusion_pytorch_model.safetensors.index.json")
    assert (h.family, h.role) == ("wan2.2", "low")
    h = path_hints("/m/diffusion_models/Wan2_2-T2V-A14B-HIGH_fp8_e4m3fn_scaled_KJ.safetensors")
    assert (h.family, h.role) == ("wan2.2", "high")
    h = path_hints("/m/loras/wan2.2_i2v_A14b_low_noise_lightx2v_4step.safetensors")
    assert (h.family, h.role) == ("wan2.2", "low")
    h = path_hints("/m/Wan2.1-T2V-14B/diffusion_pytorch_model.safetensors")
    assert (h.family, h.role) == ("wan2.1", None)
    h = path_hints("/wan22_experiments/models/t2v/model.safetensors")  # far folders say nothing
    assert (h.family, h.role) == (None, None)
    assert path_hints("/m/Wan2_1-T2V-14B_fp8_e4m3fn.safetensors").family == "wan2.1"


def test_model_config_json_of_each_expert(models):
    wan, diff = models[("t2v", "wan")], models[("t2v", "diffusers")]
    assert model_config_json(str(wan), "high") == str(wan / "high_noise_model" / "config.json")
    assert model_config_json(str(wan), "low") == str(wan / "low_noise_model" / "config.json")
    assert model_config_json(str(diff), "low") == str(diff / "transformer_2" / "config.json")
    assert model_config_json(str(models[("ti2v", "wan")])) == str(models[("ti2v", "wan")] / "config.json")
    cfg = json.loads((wan / "high_noise_model" / "config.json").read_text())
    assert (cfg["model_type"], cfg["in_dim"], cfg["num_heads"]) == ("t2v", 16, 4)


# ----------------------------------------------------------------------------- the CLI and the cache


def test_tiny_model_cli_family_flag(tmp_path, capsys):
    assert main(["tiny-model", "--family", "wan2.2", "--task", "t2v", "--out", str(tmp_path / "w")]) == 0
    assert "wan2.2 t2v" in capsys.readouterr().out
    files = find_model_files(str(tmp_path / "w"), "t2v", family="wan2.2")
    assert files.dit_high.endswith("high_noise_model") and files.vae.endswith("Wan2.1_VAE.pth")
    proc = subprocess.run(
        [sys.executable, "-m", "wan_core", "tiny-model", "--family", "wan2.2", "--task", "ti2v", "--layout", "comfyui", "--out", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for key in (("ti2v", "dense"), "vae22"):
        assert (tmp_path / "c" / COMFY22_NAMES[key]).is_file()
    assert main(["tiny-model", "--task", "ti2v", "--out", str(tmp_path / "x")]) == 2
    assert "ti2v is Wan2.2: family wan2.2" in capsys.readouterr().err


def test_tiny_model_dir_keeps_families_apart(tmp_path):
    path = tiny_model_dir("i2v", "diffusers", root=str(tmp_path), family="wan2.2")
    assert Path(path).name == "tiny-wan2.2-i2v-diffusers-v1"
    assert find_model_files(path, "i2v", family="wan2.2").dit_low == str(Path(path) / "transformer_2")
    assert tiny_model_dir("i2v", "diffusers", root=str(tmp_path), family="wan2.2") == path  # cached
