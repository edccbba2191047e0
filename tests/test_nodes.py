"""The node classes without ComfyUI: input/output contracts, the pack entry point, the front-end
presets, progress / preview / cancel, and clear errors for bad inputs."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, compat, types
from tests.comfyui_helpers import REPO, WIDGET_TYPES, check_value, populate_models
from wan_core.layers.offload import OffloadOptions

CUSTOM_TYPES = {
    types.WAN_MODEL, types.WAN_TEXT_EMBEDS, types.WAN_IMAGE_EMBEDS, types.WAN_OFFLOAD, types.WAN_CACHE, types.WAN_RADIAL
}  # fmt: skip
COMFY_TYPES = {"IMAGE", "LATENT", "MASK", "CONDITIONING"}
EXPECTED_NODES = {
    "WanModelLoader", "WanFP8Loader", "WanLoraApply", "WanOffloadConfig", "WanRadialAttention", "WanTextEncode",
    "WanImageEncode", "WanSampler", "WanSamplerMoE", "WanCacheConfig", "WanMultiGPUSampler", "WanMultiGPUSamplerMoE",
    "WanVAEDecode", "WanSaveVideo",
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# contracts


def test_every_issue_node_is_registered_with_a_display_name():
    assert set(NODE_CLASS_MAPPINGS) == EXPECTED_NODES
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == EXPECTED_NODES
    assert all(isinstance(v, str) and v for v in NODE_DISPLAY_NAME_MAPPINGS.values())


@pytest.mark.parametrize("name", sorted(EXPECTED_NODES))
def test_node_contract(name):
    cls = NODE_CLASS_MAPPINGS[name]
    spec = cls.INPUT_TYPES()
    assert isinstance(spec, dict) and set(spec) <= {"required", "optional", "hidden"} and "required" in spec
    names = []
    for section in ("required", "optional"):
        for inp, entry in spec.get(section, {}).items():
            names.append(inp)
            assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, (inp, entry)
            typ = entry[0]
            opts = entry[1] if len(entry) == 2 else {}
            assert isinstance(opts, dict)
            if isinstance(typ, list):  # combo: a default, if given, must be one of the choices
                assert all(isinstance(c, str) for c in typ)
                if "default" in opts:
                    assert opts["default"] in typ, (inp, opts["default"])
            else:
                assert isinstance(typ, str) and typ
                assert typ in WIDGET_TYPES or typ in CUSTOM_TYPES | COMFY_TYPES, (inp, typ)
                if typ in WIDGET_TYPES and "default" in opts:
                    assert check_value(name, inp, opts["default"]) is None
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
    assert all(t in CUSTOM_TYPES | COMFY_TYPES for t in cls.RETURN_TYPES)
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    assert cls.CATEGORY == types.CATEGORY
    fn = getattr(cls, cls.FUNCTION)
    assert callable(fn)
    params = inspect.signature(fn).parameters
    assert set(names) <= set(params) or any(p.kind == p.VAR_KEYWORD for p in params.values())
    required = [
        p
        for p, v in params.items()
        if p != "self" and v.default is inspect.Parameter.empty and v.kind == v.POSITIONAL_OR_KEYWORD
    ]
    assert set(required) <= set(spec["required"]), f"{name}: function requires inputs that are optional or absent"
    if not cls.RETURN_TYPES:
        assert getattr(cls, "OUTPUT_NODE", False), f"{name} returns nothing, so it must be an output node"


def test_custom_types_defined_once():
    """Each custom type name is written once, in nodes/types.py; the other modules use the constants."""
    for f in os.listdir(os.path.join(REPO, "nodes")):
        if f.endswith(".py") and f != "types.py":
            text = open(os.path.join(REPO, "nodes", f), encoding="utf-8").read()
            for t in CUSTOM_TYPES:
                assert f'"{t}"' not in text, f"nodes/{f} spells the type {t} instead of using nodes.types"


def test_no_tensor_math_in_nodes():
    """DESIGN.md principle 6: the nodes call the engine; torch math lives in wan_core."""
    pattern = re.compile(r"torch\.(einsum|matmul|cat|stack|randn|nn\.functional)|F\.\w+\(|@ ")
    for f in os.listdir(os.path.join(REPO, "nodes")):
        if f.endswith(".py"):
            text = open(os.path.join(REPO, "nodes", f), encoding="utf-8").read()
            assert not pattern.search(text), f"nodes/{f} does tensor math: {pattern.search(text).group(0)}"


def test_pack_entry_point_imports_as_comfyui_does(tmp_path):
    """ComfyUI imports custom_nodes/<folder>/__init__.py as a package under a path-derived name."""
    pack = tmp_path / "custom_nodes" / "comfyui-wan-fast"
    pack.parent.mkdir()
    os.symlink(REPO, pack)
    code = (
        "import importlib.util, sys, os\n"
        f"path = {str(pack)!r}\n"
        "spec = importlib.util.spec_from_file_location(path.replace('.', '_x_'), os.path.join(path, '__init__.py'))\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)\n"
        "print(sorted(mod.NODE_CLASS_MAPPINGS), mod.WEB_DIRECTORY)\n"
        "import nodes as n; print('nodes module:', n.__file__)\n"
    )
    # a stand-in for ComfyUI's own top-level `nodes` module, which must stay the one imported
    (tmp_path / "nodes.py").write_text("")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert all(n in out.stdout for n in EXPECTED_NODES)
    assert f"nodes module: {tmp_path / 'nodes.py'}" in out.stdout  # ours did not shadow ComfyUI's
    web = os.path.join(REPO, "js")
    assert "./js" in out.stdout and os.path.isfile(os.path.join(web, "wan_fast.js"))


# ----------------------------------------------------------------------------------------------
# the front-end presets (run under Node.js when it is installed)


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js not installed")
def test_js_presets_match_the_workflows(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import generate_workflows as generate

    shutil.copy(os.path.join(REPO, "js", "wan_presets.js"), tmp_path / "wan_presets.mjs")
    script = tmp_path / "t.mjs"
    script.write_text(
        'import { PRESETS, applyPreset, matchingPreset, timingLines } from "./wan_presets.mjs";\n'
        'const w = [["steps",50],["guidance",5.0],["shift",5.0],["scheduler","unipc"],["seed",7],["denoising_step_list","1000,750,500,250"]]'
        ".map(([name, value]) => ({name, value}));\n"
        'const before = matchingPreset(w); const changed = applyPreset(w, "4-step distill");\n'
        "console.log(JSON.stringify({PRESETS, before, changed, after: matchingPreset(w), values: w,"
        ' lines: timingLines([{stage: "sample", seconds: 2, steps: 4, seconds_per_step: 0.5, peak_vram_gib: 20.25},'
        ' {stage: "text encode", seconds: 9, cached: true}])}));\n'
    )
    out = json.loads(
        subprocess.run(["node", str(script)], capture_output=True, text=True, check=True, timeout=60).stdout
    )
    p = out["PRESETS"]
    assert p["base T2V / I2V-720P"] == generate.BASE_T2V
    assert p["base I2V-480P"] == generate.BASE_I2V_480
    assert p["4-step distill"] == {**generate.DISTILL, "denoising_step_list": types.DISTILL_STEP_LIST}
    assert out["before"] == "base T2V / I2V-720P" and out["after"] == "4-step distill"
    assert set(out["changed"]) == {"steps", "guidance", "scheduler"}
    assert {v["name"]: v["value"] for v in out["values"]}["seed"] == 7  # presets never touch the seed
    assert out["lines"] == [
        "sample: 2.00 s (4 steps, 0.50 s/step), peak 20.3 GiB",
        "text encode: cached",  # a reused result costs nothing this run
        "total: 2.00 s, peak VRAM 20.3 GiB",
    ]
    # every preset key is a sampler widget with a value the sampler accepts
    for preset in p.values():
        for k, v in preset.items():
            assert check_value("WanSampler", k, v) is None


def test_js_extension_keeps_saved_workflows_unchanged():
    """The preset buttons are added after the real widgets and never serialized."""
    text = open(os.path.join(REPO, "js", "wan_fast.js"), encoding="utf-8").read()
    assert "button.serialize = false" in text and text.count("serialize: false") >= 2
    assert 'from "./wan_presets.js"' in text


# ----------------------------------------------------------------------------------------------
# running nodes on tiny models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy")
    made, missing = populate_models(str(root / "models"), str(root / "scratch"))
    compat.set_models_root(str(root / "models"))
    os.environ["WAN_OUTPUT_DIR"] = str(root / "output")
    yield {"root": root, "made": made, "missing": missing}
    compat.set_models_root()
    compat.set_progress_hook(None)


T2V, I2V = "wan2.1_t2v_14B_bf16.safetensors", "wan2.1_i2v_480p_14B_bf16.safetensors"
T5, VAE, CLIP = "umt5_xxl_fp16.safetensors", "wan_2.1_vae.safetensors", "clip_vision_h.safetensors"


def _load(dit=T2V, clip="(none)", task="auto", cls="WanModelLoader"):
    return NODE_CLASS_MAPPINGS[cls]().load(dit, T5, VAE, clip, task=task)[0]


def _text(model):
    return NODE_CLASS_MAPPINGS["WanTextEncode"]().encode(model, "a fox", "blurry")["result"][0]


def _sample(model, text, steps=2, image_embeds=None, scheduler="unipc", seed=3):
    out = NODE_CLASS_MAPPINGS["WanSampler"]().sample(
        model, text, 64, 48, 5, steps, 5.0, 5.0, scheduler, seed, "1000,500", image_embeds=image_embeds
    )
    return out["result"][0], out["ui"]


def test_loader_lists_the_model_folders(models):
    spec = NODE_CLASS_MAPPINGS["WanModelLoader"].INPUT_TYPES()["required"]
    assert T2V in spec["dit"][0] and I2V in spec["dit"][0]
    assert T5 in spec["text_encoder"][0] and VAE in spec["vae"][0] and CLIP in spec["clip_vision"][0]
    assert (
        "wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors"
        in NODE_CLASS_MAPPINGS["WanLoraApply"].INPUT_TYPES()["required"]["lora"][0]
    )


def test_loader_describes_without_building(models, monkeypatch):
    import wan_core.loading.dit as dit_loading

    monkeypatch.setattr(dit_loading, "load_dit", lambda *a, **k: pytest.fail("the loader node must not load weights"))
    t2v, i2v = _load(), _load(I2V, CLIP)
    assert (t2v.task, t2v.clip) == ("t2v", None)
    assert (i2v.task, os.path.basename(i2v.clip)) == ("i2v", CLIP)
    assert _load() == t2v and hash(_load()) == hash(t2v)  # same files, same description


def test_progress_previews_and_seed(models):
    model = _load()
    text = _text(model)
    seen = []
    compat.set_progress_hook(lambda v, t, p: seen.append((v, t, p)), previews=True)
    try:
        a, ui = _sample(model, text)
    finally:
        compat.set_progress_hook(None)
    assert [(v, t) for v, t, _ in seen] == [(1, 2), (2, 2)]
    fmt, image, _ = seen[-1][2]
    assert fmt == "JPEG" and image.size == (64 // 8, 48 // 8)  # latent resolution preview
    assert [r["stage"] for r in ui["wan_timing"]] == ["load DiT", "sample"] and ui["wan_timing"][1]["steps"] == 2
    b, _ = _sample(model, text)
    c, _ = _sample(model, text, seed=4)
    assert torch.equal(a["samples"], b["samples"]) and not torch.equal(a["samples"], c["samples"])
    assert a["samples"].shape == (1, 16, 2, 6, 8)


def test_cancel_stops_between_steps(models):
    model = _load()
    text = _text(model)
    steps = []

    def hook(v, t, p):
        steps.append(v)
        compat.request_cancel()

    compat.set_progress_hook(hook)
    try:
        with pytest.raises(compat.Interrupted):
            _sample(model, text, steps=3)
    finally:
        compat.set_progress_hook(None)
    assert steps == [1]  # the cancel after step 1 stopped the run before step 2
    _sample(model, text, steps=1)  # a stale cancel request does not hit the next run


def test_preview_projection_recovers_a_linear_decoder():
    from types import SimpleNamespace

    from wan_core.sampling.preview import fit_rgb_projection, latent_to_rgb

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 16, generator=g) * 0.2, torch.randn(3, generator=g) * 0.1

    def decode(z):  # [1, 16, 1, h, w] -> [1, 3, 1, 8h, 8w]: a linear map per latent pixel, 8x upsampled
        rgb = torch.einsum("rc,bcfhw->brfhw", w, z) + b.view(1, 3, 1, 1, 1)
        return rgb.repeat_interleave(8, -1).repeat_interleave(8, -2)

    vae = SimpleNamespace(config=SimpleNamespace(z_dim=16, spatial_ratio=8), decode=decode)
    proj = fit_rgb_projection(vae)
    assert torch.allclose(proj.weight, w, atol=1e-5) and torch.allclose(proj.bias, b, atol=1e-5)
    z = torch.randn(16, 3, 5, 7, generator=g) * 0.5
    img = latent_to_rgb(z, proj, frame=1)
    want = ((torch.einsum("rc,chw->hwr", w, z[:, 1]) + b).clamp(-1, 1) + 1) * 127.5
    assert img.shape == (5, 7, 3) and img.dtype == torch.uint8 and (img.float() - want).abs().max() <= 0.5 + 1e-4


def test_decode_and_save_give_comfyui_frames_and_an_mp4(models):
    from wan_core.video import read_video

    model = _load()
    latent, _ = _sample(model, _text(model), steps=1)
    out = NODE_CLASS_MAPPINGS["WanVAEDecode"]().decode(model, latent)
    frames = out["result"][0]
    assert frames.shape == (5, 48, 64, 3) and frames.dtype == torch.float32
    assert 0 <= frames.min() and frames.max() <= 1
    saved = NODE_CLASS_MAPPINGS["WanSaveVideo"]().save(frames, "wan/test", 16.0, 19)["ui"]["images"][0]
    path = os.path.join(os.environ["WAN_OUTPUT_DIR"], saved["subfolder"], saved["filename"])
    video, fps = read_video(path)
    assert video.shape == (5, 48, 64, 3) and fps == 16
    again = NODE_CLASS_MAPPINGS["WanSaveVideo"]().save(frames, "wan/test", 16.0, 19)["ui"]["images"][0]
    assert again["filename"] != saved["filename"]  # a new file per run, never overwritten


def test_i2v_nodes(models):
    model = _load(I2V, CLIP)
    image = torch.rand(1, 40, 72, 3)
    emb = NODE_CLASS_MAPPINGS["WanImageEncode"]().encode(model, image, 64, 48, 5)["result"][0]
    assert emb.num_frames == 5 and emb.width * emb.height <= 64 * 48 and emb.width % 16 == 0
    latent, _ = _sample(model, _text(model), steps=1, image_embeds=emb)
    assert latent["samples"].shape[-2:] == (emb.height // 8, emb.width // 8)


def test_cache_config_node_and_sampler(models):
    """WanCacheConfig -> WanSampler: threshold 0 is the uncached run exactly, a high threshold skips
    evaluations and the sampler's stage record says how many; a table the tiny model lacks is an error."""
    model = _load()
    text = _text(model)
    plain, _ = _sample(model, text)  # 2 UniPC steps with CFG: 4 DiT evaluations
    node = NODE_CLASS_MAPPINGS["WanCacheConfig"]()

    def run(settings):
        out = NODE_CLASS_MAPPINGS["WanSampler"]().sample(
            model, text, 64, 48, 5, 2, 5.0, 5.0, "unipc", 3, "1000,500", cache=settings
        )
        return out["result"][0]["samples"], out["ui"]["wan_timing"][-1]

    (off,) = node.make("Mag", 0.2, True, 0.0, 6, 0.2, cache_model="t2v-14b")
    latent, rec = run(off)
    assert torch.equal(latent, plain["samples"]) and (rec["evaluations"], rec["skipped_evaluations"]) == (4, 0)
    (mag,) = node.make("Mag", 0.2, True, 0.24, 6, 0.2, cache_model="t2v-14b")
    latent, rec = run(mag)
    assert rec["skipped_evaluations"] == 2 and "skipped 2 of 4 DiT evaluations" in rec["cache"]
    assert torch.isfinite(latent).all() and not torch.equal(latent, plain["samples"])
    (tea,) = node.make("Tea", 10.0, False, 0.24, 6, 0.2, end_step=100, cache_model="t2v-14b")
    assert tea.to_config() == {"feature_caching": "Tea", "teacache_thresh": 10.0, "use_ret_steps": False,
                               "teacache_end_step": 100, "cache_model": "t2v-14b"}  # fmt: skip
    assert run(tea)[1]["skipped_evaluations"] == 2
    (auto,) = node.make("Tea", 0.2, True, 0.24, 6, 0.2)
    with pytest.raises(ValueError, match="TeaCache needs 'coefficients'"):
        run(auto)  # the tiny DiT has no published fit


def test_lora_on_an_fp8_model(models):
    """WanFP8Loader on a bf16 file (quantised on load) + WanLoraApply: the LoRA runs beside the FP8 linears."""
    from wan_core.layers.lora import lora_report
    from wan_core.model_cache import lease

    fp8 = _load(cls="WanFP8Loader")
    assert fp8.fp8 == "auto"
    with_lora = NODE_CLASS_MAPPINGS["WanLoraApply"]().apply(
        fp8, "wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors", 1.0
    )[0]
    text = _text(fp8)
    a, _ = _sample(with_lora, text, steps=1)
    with lease(with_lora) as dit:
        (summary,) = lora_report(dit).loras
    assert summary.branched > 0
    b, _ = _sample(fp8, text, steps=1)
    assert not torch.equal(a["samples"], b["samples"]) and _lora_count(fp8) == 0


# ----------------------------------------------------------------------------------------------
# bad inputs -> clear errors


def test_missing_file_is_a_clear_error(models):
    with pytest.raises(FileNotFoundError, match=r"wan2\.1_t2v_14B_fp8_e4m3fn\.safetensors.*diffusion_models"):
        _load("wan2.1_t2v_14B_fp8_e4m3fn.safetensors")
    with pytest.raises(FileNotFoundError, match="no_such_lora.safetensors.*loras"):
        NODE_CLASS_MAPPINGS["WanLoraApply"]().apply(_load(), "no_such_lora.safetensors", 1.0)


def test_i2v_without_image_is_a_clear_error(models):
    with pytest.raises(FileNotFoundError, match="clip_vision"):
        _load(I2V, "(none)")
    model = _load(I2V, CLIP)
    with pytest.raises(ValueError, match="WanImageEncode"):
        _sample(model, _text(model))
    with pytest.raises(ValueError, match="start image"):
        NODE_CLASS_MAPPINGS["WanImageEncode"]().encode(model, None, 64, 48, 5)
    with pytest.raises(ValueError, match="image-to-video model"):
        NODE_CLASS_MAPPINGS["WanImageEncode"]().encode(_load(), torch.rand(1, 40, 72, 3), 64, 48, 5)


def test_task_mismatch_and_bad_sampler_settings(models):
    with pytest.raises(ValueError, match="T2V model but task is set to i2v"):
        _load(task="i2v")
    model = _load()
    text = _text(model)
    with pytest.raises(ValueError, match="denoising_step_list has 2 entries"):
        _sample(model, text, steps=4, scheduler="distill")
    with pytest.raises(ValueError, match="4n\\+1"):
        NODE_CLASS_MAPPINGS["WanSampler"]().sample(model, text, 64, 48, 6, 1, 5.0, 5.0, "unipc", 0)
    with pytest.raises(ValueError, match="multiples of 16"):
        NODE_CLASS_MAPPINGS["WanSampler"]().sample(model, text, 60, 48, 5, 1, 5.0, 5.0, "unipc", 0)


def test_lora_for_another_model_is_a_clear_error(models):
    model = NODE_CLASS_MAPPINGS["WanLoraApply"]().apply(
        _load(), "wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors", 1.0
    )[0]
    with pytest.raises(Exception, match="k_img|not in this model") as info:
        _sample(model, _text(model), steps=1)
    assert "LoRA" in str(info.value) or "lora" in str(info.value), info.value


def _lora_count(spec) -> int:
    from wan_core.layers.lora import lora_report
    from wan_core.model_cache import lease

    with lease(spec) as dit:
        return len(lora_report(dit))


def test_offload_settings_reach_the_model_description(models):
    """WanOffloadConfig -> loader -> ModelSpec offload fields (the engine side: tests/test_offload_doors.py);
    the multi-GPU sampler checks its degrees before any process starts."""
    (offload,) = NODE_CLASS_MAPPINGS["WanOffloadConfig"]().make("block", 14.0)
    assert offload == OffloadOptions("block", 14.0, text_encoder=True, image_encoder=True, vae=True)
    model = NODE_CLASS_MAPPINGS["WanModelLoader"]().load(T2V, T5, VAE, "(none)", offload=offload)[0]
    off = model.offload
    assert (off.granularity, off.vram_budget_gb, off.resident_blocks) == ("block", 14.0, None)
    assert off.text_encoder and off.image_encoder and off.vae
    assert model.replace(offload=OffloadOptions()) == _load()
    (plain,) = NODE_CLASS_MAPPINGS["WanOffloadConfig"]().make("none", 0.0, False)
    assert NODE_CLASS_MAPPINGS["WanModelLoader"]().load(T2V, T5, VAE, "(none)", offload=plain)[0] == _load()
    (enc,) = NODE_CLASS_MAPPINGS["WanOffloadConfig"]().make("none", 0.0, True)  # encoders only, the DiT resident
    model = NODE_CLASS_MAPPINGS["WanModelLoader"]().load(T2V, T5, VAE, "(none)", offload=enc)[0]
    assert model.offload.granularity is None and model.offload.vae
    with pytest.raises(ValueError, match="applies to granularity 'block'"):
        NODE_CLASS_MAPPINGS["WanOffloadConfig"]().make("model", 14.0)
    text = _text(_load())
    with pytest.raises(ValueError, match="num_gpus=3"):
        NODE_CLASS_MAPPINGS["WanMultiGPUSampler"]().sample(
            _load(), text, 64, 48, 5, 1, 5.0, 5.0, "unipc", 0, num_gpus=3
        )


def test_radial_attention_settings_reach_the_model(models):
    """WanRadialAttention -> a loader's `radial` input -> ModelSpec.radial (attention 'auto' becomes radial_attn)
    -> the leased DiT's blocks. Through WanSampler at a size whose mask drops blocks (33 frames at 192 x 128:
    9 latent frames of 8 x 12 tokens, 49 % of the blocks kept): every layer dense, or every step dense, is
    the dense sampler's latent bit for bit; the defaults are not."""
    from wan_core.kernels.radial_attention import RadialOptions
    from wan_core.model_cache import lease

    node, loader = NODE_CLASS_MAPPINGS["WanRadialAttention"](), NODE_CLASS_MAPPINGS["WanModelLoader"]()
    (defaults,) = node.make(0.2, 0, 0)
    assert defaults == RadialOptions() and node.make(0.5, 1, 12, "bf16")[0] == RadialOptions(0.5, 1, 12, "bf16")
    model = loader.load(T2V, T5, VAE, "(none)", radial=defaults)[0]
    assert (model.attention, model.radial) == ("radial_attn", defaults)
    assert model.replace(attention="auto", radial=None) == _load()
    assert loader.load(T2V, T5, VAE, "(none)", attention="radial_attn", radial=defaults)[0] == model
    fp8 = NODE_CLASS_MAPPINGS["WanFP8Loader"]().load(T2V, T5, VAE, "(none)", radial=node.make(0.5, 1, 12)[0])[0]
    assert (fp8.attention, fp8.radial, fp8.fp8) == ("radial_attn", RadialOptions(0.5, 1, 12), "auto")
    with pytest.raises(ValueError, match="attention is 'sdpa': set attention to radial_attn or auto"):
        loader.load(T2V, T5, VAE, "(none)", attention="sdpa", radial=defaults)
    with pytest.raises(ValueError, match="decay_factor must be a positive number"):
        node.make(0.0, 0, 0)
    with lease(model) as dit:
        layers = len(dit.blocks)
        assert {blk.self_attn.attn_fn.options for blk in dit.blocks} == {defaults}
    text = _text(_load())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small runs: ~30x faster than with the threads of a shared machine contending
    try:

        def run(spec):
            out = NODE_CLASS_MAPPINGS["WanSampler"]().sample(spec, text, 192, 128, 33, 2, 5.0, 5.0, "unipc", 3)
            return out["result"][0]["samples"]

        dense = run(_load())
        all_layers = run(loader.load(T2V, T5, VAE, "(none)", radial=node.make(0.2, layers, 0)[0])[0])
        all_steps = run(loader.load(T2V, T5, VAE, "(none)", radial=node.make(0.2, 0, 2)[0])[0])
        sparse = run(model)
    finally:
        torch.set_num_threads(threads)
    assert dense.shape == (1, 16, 9, 16, 24)
    assert torch.equal(all_layers, dense) and torch.equal(all_steps, dense) and not torch.equal(sparse, dense)


def test_latent_is_comfyui_raw_convention(models):
    """LATENT carries raw VAE latents, as ComfyUI's own nodes exchange them: the sampler's output is
    `latent_to_raw` of the engine's latent, and WanVAEDecode of a raw latent equals the engine's
    decode of the normalised one (so core VAE Decode / core samplers mix with ours)."""
    from wan_core.model_cache import build_vae, lease
    from wan_core.models.vae import WAN21_LATENT_MEAN, latent_from_raw, latent_to_raw
    from wan_core.sampling.loop import Cond, make_noise, sample
    from wan_core.sampling.schedulers import make_scheduler

    model = _load()
    text = _text(model)
    raw = _sample(model, text, steps=2)[0]["samples"]
    noise = make_noise((1, *raw.shape[1:]), 3)
    with torch.no_grad(), lease(model) as dit:
        z = sample(dit, noise, make_scheduler("unipc", 2, 5.0), Cond([text.positive]), Cond([text.negative]), 5.0)
    torch.testing.assert_close(raw, latent_to_raw(z), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(raw, z)  # really the other convention
    assert abs(latent_to_raw(torch.zeros(1, 16, 1, 1, 1))[0, 0].item() - WAN21_LATENT_MEAN[0]) < 1e-6
    frames = NODE_CLASS_MAPPINGS["WanVAEDecode"]().decode(model, {"samples": raw})["result"][0]
    with torch.no_grad():
        ref = build_vae(model).decode(latent_from_raw(raw), out_device="cpu")
    torch.testing.assert_close(frames, (ref[0].permute(1, 2, 3, 0) + 1) / 2, rtol=1e-5, atol=1e-5)


def test_loaders_residual_widget_reaches_the_spec(models):
    """The loaders' optional `residual` widget (auto / float32 / bfloat16) is ModelSpec.residual_dtype;
    left out (older workflows, API JSON without it) it is 'auto'; a value outside the list is refused."""
    assert NODE_CLASS_MAPPINGS["WanModelLoader"].INPUT_TYPES()["optional"]["residual"][0] == ["auto", "float32", "bfloat16"]
    for name in ("WanModelLoader", "WanFP8Loader"):
        loader = NODE_CLASS_MAPPINGS[name]()
        assert loader.load(T2V, T5, VAE, "(none)")[0].residual_dtype == "auto"
        assert loader.load(T2V, T5, VAE, "(none)", residual="bfloat16")[0].residual_dtype == "bfloat16"
        with pytest.raises(ValueError, match="residual_dtype must be one of"):
            loader.load(T2V, T5, VAE, "(none)", residual="float16")
