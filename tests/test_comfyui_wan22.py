"""Wan2.2 in a real ComfyUI (marker `comfyui`; the server is set up as in tests/test_comfyui_real.py,
whose generic test also runs every API workflow, the Wan2.2 ones included).

Here: /object_info shows the two-expert sampler and lists the Wan2.2 files; every UI workflow, read
the way the front end reads it (node types and widget order from /object_info only, not from our
classes), has no missing node type, no unknown model file, and says what its API twin says; the
Wan2.2 UI workflows, converted that way, run to an mp4; both experts are entered in ComfyUI's model
management as their own parts.
"""

from __future__ import annotations

import json
import os

import pytest

from tests import test_comfyui_real as real
from tests.comfyui_helpers import WAN22_LORAS, WORKFLOW_NAMES, load_api, reduce_api

pytestmark = pytest.mark.comfyui
server = real.server  # the same module-scoped fixture: one ComfyUI for this module
WAN22 = [n for n in WORKFLOW_NAMES if n.startswith("wan22")]
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def _inputs(info: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of a node's inputs in the order the front end makes its widgets."""
    spec = info["input"]
    order = info.get("input_order") or {k: list(v) for k, v in spec.items()}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            entry = spec[section][name]
            out.append((name, entry[0], entry[1] if len(entry) > 1 else {}))
    return out


def ui_to_api(ui: dict, info: dict) -> tuple[dict, list[str]]:
    """A UI workflow as the front end turns it into a prompt, from /object_info alone; and its problems
    (missing node types, widget values a combo does not list, widgets left over or missing)."""
    links = {link[0]: link for link in ui["links"]}
    graph, problems = {}, []
    for node in ui["nodes"]:
        t = node["type"]
        if t not in info:
            problems.append(f"missing node type {t}")
            continue
        values = list(node["widgets_values"])
        sockets = {i["name"]: i["link"] for i in node["inputs"]}
        inputs = {}
        for name, typ, opts in _inputs(info[t]):
            is_combo = isinstance(typ, list) or typ == "COMBO"
            if is_combo or typ in WIDGETS:
                if not values:
                    problems.append(f"{t}.{name}: no widget value")
                    continue
                value = values.pop(0)
                choices = typ if isinstance(typ, list) else opts.get("options")
                if is_combo and choices is not None and value not in choices:
                    problems.append(f"{t}.{name}: {value!r} is not among the choices ComfyUI lists")
                inputs[name] = value
                if opts.get("control_after_generate") or (typ == "INT" and name in ("seed", "noise_seed")):
                    values.pop(0)  # the front end's "control after generate" value
                if opts.get("image_upload"):
                    values.pop(0)  # LoadImage's upload button value
            elif sockets.get(name) is not None:
                link = links[sockets[name]]
                inputs[name] = [str(link[1]), link[2]]
        if values:
            problems.append(f"{t}: {len(values)} widget values left over")
        graph[str(node["id"])] = {"class_type": t, "inputs": inputs}
    return graph, problems


def _ui(server, name: str) -> dict:
    ui = server.get(f"/api/workflow_templates/{real.PACK}/{name}.json")
    return json.loads(ui) if isinstance(ui, bytes) else ui


def test_object_info_has_the_two_expert_sampler_and_the_wan22_files(object_info):
    moe = object_info["WanSamplerMoE"]
    assert moe["display_name"] == "Wan2.2 Sampler (two experts)"
    req = moe["input"]["required"]
    assert req["high_noise_model"][0] == req["low_noise_model"][0] == "WAN_MODEL"
    assert req["switch"][0] == ["boundary", "step"] and moe["output"] == ["LATENT"]
    loader = object_info["WanModelLoader"]["input"]["required"]
    assert {"wan2.2_t2v_high_noise_14B_fp16.safetensors", "wan2.2_i2v_low_noise_14B_fp16.safetensors",
            "wan2.2_ti2v_5B_fp16.safetensors"} <= set(loader["dit"][0])  # fmt: skip
    assert "wan2.2_vae.safetensors" in loader["vae"][0] and "ti2v" in loader["task"][0]
    assert set(WAN22_LORAS.values()) <= set(object_info["WanLoraApply"]["input"]["required"]["lora"][0])


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_ui_workflow_loads_with_no_missing_nodes(server, object_info, name):
    graph, problems = ui_to_api(_ui(server, name), object_info)
    assert not problems, problems
    api = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in load_api(name).items()}
    assert graph == api


@pytest.mark.parametrize("name", WAN22)
def test_wan22_ui_workflow_runs_as_the_front_end_sends_it(server, object_info, name):
    graph, _ = ui_to_api(_ui(server, name), object_info)
    graph = reduce_api(graph, prefix=f"real22/{name}")
    entry = real._ok(server, graph)
    save = next(k for k, n in graph.items() if n["class_type"] == "WanSaveVideo")
    (video,) = entry["outputs"][save]["images"]
    assert os.path.getsize(os.path.join(server.base, "output", video["subfolder"], video["filename"])) > 0
    sampler = next(k for k, n in graph.items() if n["class_type"] in ("WanSampler", "WanSamplerMoE"))
    records = entry["outputs"][sampler]["wan_timing"]
    assert [r["stage"] for r in records] == ["load DiT", "sample"]
    mem = server.get("/wan_fast/memory")
    if graph[sampler]["class_type"] == "WanSamplerMoE":  # reduced to 2 steps, switch at step 1
        assert records[-1]["experts"] == "1 of 2 steps on the high-noise expert (step < 1)"
        assert {"dit_high", "dit_low"} <= set(mem["parts"]) and {"dit_high", "dit_low"} <= set(mem["tracked"]), mem
    else:
        assert "dit" in mem["parts"] and "dit" in mem["tracked"], mem
