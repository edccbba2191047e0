"""The example workflows: up to date with their generator, only existing node types with valid
values and well-typed links, UI and API twins saying the same thing, and every API workflow
executed headlessly through the node classes on tiny models written under the workflows' own
file names (sizes and steps reduced), producing frames and an mp4."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS, compat
from tests.comfyui_helpers import (
    CORE_NODE_TYPES,
    REPO,
    SAMPLERS,
    TINY,
    TINY_TI2V,
    WIDGET_TYPES,
    WORKFLOW_NAMES,
    check_value,
    is_ti2v,
    load_api,
    load_ui,
    populate_models,
    real_file_names,
    reduce_api,
    run_api,
)

SEED_SCENARIOS = {
    "wan21_t2v_14b_base", "wan21_t2v_14b_distill_lora", "wan21_t2v_14b_distill_merged", "wan21_t2v_14b_distill_fp8",
    "wan21_i2v_480p_base", "wan21_i2v_480p_distill_lora", "wan21_i2v_480p_distill_fp8", "wan21_i2v_720p_base",
    "wan21_t2v_14b_offload_distill_lora", "wan21_t2v_14b_multigpu", "wan21_t2v_14b_base_cache",
}  # fmt: skip
WAN22_SCENARIOS = {"wan22_t2v_a14b_4step_lora", "wan22_i2v_a14b_4step_lora", "wan22_ti2v_5b"}
CORE_OUTPUTS = {"LoadImage": ["IMAGE", "MASK"]}
# Model-file combos list what is on disk; the workflows must name files users really have.
REAL_FILES = real_file_names()


def _io(node_type):
    """([(name, type, is_widget, required)], [output types]) of one of our node types."""
    cls = NODE_CLASS_MAPPINGS[node_type]
    spec = cls.INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, (typ, *_opts) in spec.get(section, {}).items():
            widget = isinstance(typ, list) or typ in WIDGET_TYPES
            inputs.append((name, "COMBO" if isinstance(typ, list) else typ, widget, section == "required"))
    return inputs, list(cls.RETURN_TYPES)


def _has_control(node_type, name):
    typ, *opts = NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()["required"].get(name, (None,))
    return typ == "INT" and bool(opts and opts[0].get("control_after_generate"))


def test_one_workflow_per_seed_scenario_in_both_formats():
    assert set(WORKFLOW_NAMES) == SEED_SCENARIOS | WAN22_SCENARIOS
    for name in WORKFLOW_NAMES:
        assert os.path.isfile(os.path.join(REPO, "example_workflows", "api", f"{name}.json"))


def test_workflows_are_what_the_generator_writes():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import generate_workflows as generate

    for rel, text in generate.render().items():
        with open(os.path.join(REPO, "example_workflows", rel), encoding="utf-8") as f:
            assert f.read() == text, f"{rel} is stale: run python tools/generate_workflows.py"


def ui_to_api(ui: dict) -> dict:
    """An independent reading of a UI workflow into API form (what ComfyUI's front end sends)."""
    links = {l[0]: l for l in ui["links"]}
    out = {}
    for node in ui["nodes"]:
        t = node["type"]
        if t in CORE_NODE_TYPES:
            out[str(node["id"])] = {"class_type": t, "inputs": {"image": node["widgets_values"][0]}}
            continue
        inputs, _ = _io(t)
        values = list(node["widgets_values"])
        sockets = {i["name"]: i["link"] for i in node["inputs"]}
        api = {}
        for name, _, widget, _ in inputs:
            if widget:
                api[name] = values.pop(0)
                if _has_control(t, name):
                    assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
            elif sockets.get(name) is not None:
                link = links[sockets[name]]
                api[name] = [str(link[1]), link[2]]
        assert not values, f"{t}: {len(values)} widget values left over"
        out[str(node["id"])] = {"class_type": t, "inputs": api}
    return out


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_ui_workflow_is_valid(name):
    ui = load_ui(name)
    by_id = {n["id"]: n for n in ui["nodes"]}
    assert len(by_id) == len(ui["nodes"]) and ui["last_node_id"] >= max(by_id)
    for link_id, src, src_slot, dst, dst_slot, typ in ui["links"]:
        out = by_id[src]["outputs"][src_slot]
        inp = by_id[dst]["inputs"][dst_slot]
        assert out["type"] == typ == inp["type"], (name, link_id)
        assert link_id in out["links"] and inp["link"] == link_id
    for node in ui["nodes"]:
        t = node["type"]
        assert t in NODE_CLASS_MAPPINGS or t in CORE_NODE_TYPES, f"unknown node type {t}"
        if t in CORE_NODE_TYPES:
            assert [o["type"] for o in node["outputs"]] == CORE_OUTPUTS[t]
            continue
        inputs, outputs = _io(t)
        assert [o["type"] for o in node["outputs"]] == outputs
        sockets = [(n, typ, req) for n, typ, w, req in inputs if not w]
        assert [(i["name"], i["type"]) for i in node["inputs"]] == [(n, typ) for n, typ, _ in sockets]
        for (n, _, req), i in zip(sockets, node["inputs"]):
            assert i["link"] is not None or not req, f"{name}: {t}.{n} is required but not connected"
    for node in ui_to_api(ui).values():
        if node["class_type"] in NODE_CLASS_MAPPINGS:
            for k, v in node["inputs"].items():
                if not isinstance(v, list):
                    assert check_value(node["class_type"], k, v, REAL_FILES) is None, check_value(
                        node["class_type"], k, v, REAL_FILES
                    )


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_api_workflow_is_valid_and_matches_the_ui_one(name):
    api = load_api(name)
    for nid, node in api.items():
        t = node["class_type"]
        assert t in NODE_CLASS_MAPPINGS or t in CORE_NODE_TYPES, f"unknown node type {t}"
        if t in CORE_NODE_TYPES:
            continue
        inputs, _ = _io(t)
        for n, typ, widget, req in inputs:
            if req:
                assert n in node["inputs"], f"{name}: node {nid} ({t}) lacks required input {n}"
            if n not in node["inputs"]:
                continue
            v = node["inputs"][n]
            if widget:
                assert check_value(t, n, v, REAL_FILES) is None, check_value(t, n, v, REAL_FILES)
            else:
                src, slot = v
                src_t = api[src]["class_type"]
                src_out = CORE_OUTPUTS[src_t] if src_t in CORE_OUTPUTS else _io(src_t)[1]
                assert src_out[slot] == typ, f"{name}: {t}.{n} wants {typ}, gets {src_out[slot]}"
        assert set(node["inputs"]) <= {n for n, *_ in inputs}
    stripped = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert stripped == ui_to_api(load_ui(name))


def test_seed_scenarios_use_the_right_settings():
    """The values that define each scenario (files, schedule, guidance, shift, size)."""

    def sampler(name):
        return next(
            n["inputs"] for n in load_api(name).values() if n["class_type"] in ("WanSampler", "WanMultiGPUSampler")
        )

    def nodes(name, t):
        return [n["inputs"] for n in load_api(name).values() if n["class_type"] == t]

    for name in sorted(SEED_SCENARIOS):
        s = sampler(name)
        if "distill" in name:
            assert (s["scheduler"], s["steps"], s["guidance"], s["shift"]) == ("distill", 4, 1.0, 5.0)
            assert s["denoising_step_list"] == "1000,750,500,250"
        else:
            assert s["scheduler"] == "unipc" and s["guidance"] == 5.0
            assert (s["steps"], s["shift"]) == (
                (40, 3.0) if "480p" in name else (40, 5.0) if "i2v" in name else (50, 5.0)
            )
        if "i2v" in name:
            (enc,) = nodes(name, "WanImageEncode")
            assert (enc["width"], enc["height"]) == ((1280, 720) if "720p" in name else (832, 480))
            assert nodes(name, "LoadImage")
        if "lora" in name:
            (lora,) = nodes(name, "WanLoraApply")
            assert lora["lora"].endswith("lora_rank64_lightx2v_4step.safetensors") and lora["strength"] == 1.0
        if "fp8" in name:
            assert "scaled_fp8_e4m3" in nodes(name, "WanFP8Loader")[0]["dit"]
    (cache,) = nodes("wan21_t2v_14b_base_cache", "WanCacheConfig")
    assert (cache["method"], cache["magcache_thresh"], cache["magcache_K"], cache["cache_model"]) == ("Mag", 0.24, 6, "t2v-14b")
    graph = load_api("wan21_t2v_14b_base_cache")
    assert graph[sampler("wan21_t2v_14b_base_cache")["cache"][0]]["class_type"] == "WanCacheConfig"
    assert nodes("wan21_t2v_14b_offload_distill_lora", "WanOffloadConfig")[0]["granularity"] == "block"
    assert sampler("wan21_t2v_14b_multigpu")["num_gpus"] == 2


def test_wan22_scenarios_use_the_right_settings():
    """ComfyUI's Wan2.2 template path for A14B (a loader and a 4-step LoRA per expert, 4 steps, cfg 1,
    shift 5, switch at step 2, the experts' real file names, high into high and low into low) and the
    official TI2V-5B settings (50 steps, cfg 5, shift 5, 1280x704x121 at 24 fps, the Wan2.2 VAE)."""

    def nodes(name, t):
        return [n["inputs"] for n in load_api(name).values() if n["class_type"] == t]

    def sampler(name):
        return next(n["inputs"] for n in load_api(name).values() if n["class_type"] in SAMPLERS)

    for task in ("t2v", "i2v"):
        name = f"wan22_{task}_a14b_4step_lora"
        graph = load_api(name)
        s = sampler(name)
        assert {k: s[k] for k in ("steps", "cfg_high", "cfg_low", "shift", "scheduler", "switch", "switch_step")} == {
            "steps": 4, "cfg_high": 1.0, "cfg_low": 1.0, "shift": 5.0, "scheduler": "distill", "switch": "step",
            "switch_step": 2,
        }  # fmt: skip
        assert s["denoising_step_list"] == "1000,750,500,250"
        assert (s["width"], s["height"], s["num_frames"]) == (832, 480, 81)
        for expert in ("high", "low"):
            lora = graph[s[f"{expert}_noise_model"][0]]
            assert lora["class_type"] == "WanLoraApply" and lora["inputs"]["strength"] == 1.0
            assert lora["inputs"]["lora"].startswith(f"wan2.2_{task}_lightx2v_4steps_lora_v1")
            assert lora["inputs"]["lora"].endswith(f"_{expert}_noise.safetensors")
            loader = graph[lora["inputs"]["model"][0]]["inputs"]
            assert loader["dit"] == f"wan2.2_{task}_{expert}_noise_14B_fp16.safetensors"
            assert (loader["vae"], loader["clip_vision"]) == ("wan_2.1_vae.safetensors", "(none)")
        assert bool(nodes(name, "WanImageEncode")) == (task == "i2v") == ("image_embeds" in s)
        assert nodes(name, "WanSaveVideo")[0]["fps"] == 16.0
    s = sampler("wan22_ti2v_5b")
    assert (s["steps"], s["guidance"], s["shift"], s["scheduler"]) == (50, 5.0, 5.0, "unipc")
    assert (s["width"], s["height"], s["num_frames"]) == (1280, 704, 121)
    (loader,) = nodes("wan22_ti2v_5b", "WanModelLoader")
    assert (loader["dit"], loader["vae"]) == ("wan2.2_ti2v_5B_fp16.safetensors", "wan2.2_vae.safetensors")
    assert nodes("wan22_ti2v_5b", "WanSaveVideo")[0]["fps"] == 24.0


# ----------------------------------------------------------------------------------------------
# headless runs on tiny models


@pytest.fixture(scope="module")
def comfy_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfyui")
    made, missing = populate_models(str(root / "models"), str(root / "scratch"))
    compat.set_models_root(str(root / "models"))
    os.environ["WAN_OUTPUT_DIR"] = str(root / "output")
    yield {"root": root, "made": made, "missing": missing}
    compat.set_models_root()


def _run(name, comfy_dirs, graph=None):
    graph = graph or reduce_api(load_api(name), prefix=f"test/{name}")
    files = {
        v for n in graph.values() for v in n["inputs"].values() if isinstance(v, str) and v.endswith(".safetensors")
    }
    missing = files & set(comfy_dirs["missing"])
    if missing:
        pytest.skip(f"{name}: cannot make {sorted(missing)}: {comfy_dirs['missing'][sorted(missing)[0]]}")
    return graph, run_api(graph, input_dir=str(comfy_dirs["root"] / "input"))


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_api_workflow_runs_headless(name, comfy_dirs):
    from wan_core.video import read_video

    graph, done = _run(name, comfy_dirs)
    decode = next(k for k, n in graph.items() if n["class_type"] == "WanVAEDecode")
    frames = done[decode][0][0]
    i2v = any(n["class_type"] == "WanImageEncode" for n in graph.values())
    assert frames.shape[0] == TINY["num_frames"] and frames.shape[-1] == 3
    size = {**TINY, **TINY_TI2V} if is_ti2v(graph) else TINY
    if not i2v:
        assert frames.shape[1:3] == (size["height"], size["width"])
    assert torch.isfinite(frames).all() and 0 <= frames.min() and frames.max() <= 1 and frames.std() > 0
    save = next(k for k, n in graph.items() if n["class_type"] == "WanSaveVideo")
    (result,) = done[save][1]["images"]
    video, fps = read_video(os.path.join(os.environ["WAN_OUTPUT_DIR"], result["subfolder"], result["filename"]))
    assert video.shape[:3] == frames.shape[:3] and fps == graph[save]["inputs"]["fps"]
    records = [r for _, ui in done.values() if ui for r in ui.get("wan_timing", [])]
    stages = [r["stage"] for r in records]
    assert {"text encode", "VAE decode", "save"} <= set(stages)
    assert {"load DiT", "sample"} <= set(stages) or "multi-GPU sample" in stages
    if any(n["class_type"] == "WanCacheConfig" for n in graph.values()):  # 2 steps x 2 branches, step 1 skipped
        (rec,) = [r for r in records if r["stage"] == "sample"]
        assert (rec["evaluations"], rec["skipped_evaluations"]) == (4, 2), rec


def test_second_run_does_not_reload(comfy_dirs, monkeypatch):
    """Models are described by the loader and built once: running the workflow again reads no weights."""
    import wan_core.loading.dit as dit_loading
    import wan_core.loading.t5 as t5_loading
    import wan_core.loading.vae as vae_loading

    _run("wan21_t2v_14b_base", comfy_dirs)
    calls = []
    for mod, attr in ((dit_loading, "load_dit"), (t5_loading, "load_text_encoder"), (vae_loading, "load_vae")):
        real = getattr(mod, attr)
        monkeypatch.setattr(mod, attr, lambda *a, _real=real, _n=attr, **k: (calls.append(_n), _real(*a, **k))[1])
    _run("wan21_t2v_14b_base", comfy_dirs)
    assert calls == []


def test_lora_strength_change_does_not_reload_the_base(comfy_dirs, monkeypatch):
    import wan_core.loading.dit as dit_loading

    name = "wan21_t2v_14b_distill_lora"
    graph, done = _run(name, comfy_dirs)
    calls = []
    real = dit_loading.load_dit
    monkeypatch.setattr(dit_loading, "load_dit", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    lora = next(k for k, n in graph.items() if n["class_type"] == "WanLoraApply")
    graph[lora]["inputs"]["strength"] = 0.5
    _, done2 = _run(name, comfy_dirs, graph)
    assert calls == [], "changing a LoRA strength reloaded the base DiT from disk"
    sampler = next(k for k, n in graph.items() if n["class_type"] == "WanSampler")
    assert not torch.equal(done[sampler][0][0]["samples"], done2[sampler][0][0]["samples"])


def test_offload_workflow_streams_the_dit_and_equals_the_resident_graph(comfy_dirs):
    """The offload workflow builds a block-offloaded DiT (the encoders and the VAE offloaded too) and gives
    the samples of the same graph without WanOffloadConfig (fp32 on the CPU: ~1e-6, see test_offload_doors)."""
    import warnings

    from wan_core.layers.offload import OffloadOptions, offload_handle
    from wan_core.model_cache import build_vae, lease

    name = "wan21_t2v_14b_offload_distill_lora"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*saves no memory")
        graph, done = _run(name, comfy_dirs)
        lora = next(k for k, n in graph.items() if n["class_type"] == "WanLoraApply")
        with lease(done[lora][0][0]) as dit:  # the cached DiT the sampler ran
            handle = offload_handle(dit)
        assert handle is not None and handle.granularity == "block" and handle.stats["loads"] >= 1
        assert not handle.is_loaded
        loader = next(k for k, n in graph.items() if n["class_type"] == "WanModelLoader")
        spec = done[loader][0][0]
        assert spec.offload.granularity == "block" and spec.offload.text_encoder and spec.offload.vae
        assert offload_handle(build_vae(spec)) is not None  # packed in host memory by its first stage
        plain = {k: {**n, "inputs": {i: v for i, v in n["inputs"].items() if i != "offload"}}
                 for k, n in graph.items() if n["class_type"] != "WanOffloadConfig"}  # fmt: skip
        _, resident = _run(name, comfy_dirs, plain)
    assert resident[loader][0][0].offload == OffloadOptions()  # nothing offloaded
    sampler = next(k for k, n in graph.items() if n["class_type"] == "WanSampler")
    a, b = done[sampler][0][0]["samples"], resident[sampler][0][0]["samples"]
    assert ((a - b).norm() / b.norm()).item() <= 1e-5
