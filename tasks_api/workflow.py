"""Template API workflow + `TaskRequest` -> the prompt queued on ComfyUI.

Templates: by default the pack's example API workflows that match LightX2V's default server
configs (`configs/wan/wan_t2v.json`, `wan_i2v.json`): `wan21_t2v_14b_base` for text-to-video and
`wan21_i2v_480p_base` when `image_path` is given. `WAN_TASKS_T2V_TEMPLATE` / `WAN_TASKS_I2V_TEMPLATE`
name another one: an example name (`wan21_t2v_14b_distill_lora`) or the path of an API-format
JSON file (ComfyUI's "Export (API)"). The template is read on every request, so an edited file
takes effect without a restart.

Nodes are found by type, not id: one WanTextEncode, one sampler (WanSampler, WanMultiGPUSampler or
another `Wan*Sampler` with a `seed` input, e.g. a Wan2.2 two-expert sampler), one WanSaveVideo, and
for I2V one LoadImage; every image encoder (`Wan*ImageEncode*`) gets the size and frame count.

Which model serves the tasks is the template's choice, as LightX2V's server runs the `model_cls`
it was started with: a Wan2.2 API workflow named in `WAN_TASKS_T2V_TEMPLATE` /
`WAN_TASKS_I2V_TEMPLATE` makes the server a Wan2.2 one (the requests do not change).
"""

from __future__ import annotations

import copy
import json
import os

from .request import RequestError, TaskRequest

API_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_workflows", "api")
TEMPLATE_ENV = {"t2v": "WAN_TASKS_T2V_TEMPLATE", "i2v": "WAN_TASKS_I2V_TEMPLATE"}
DEFAULT_TEMPLATES = {"t2v": "wan21_t2v_14b_base", "i2v": "wan21_i2v_480p_base"}
SAMPLERS = ("WanSampler", "WanMultiGPUSampler")
LORA_NODE = "WanLoraApply"


class TemplateError(Exception):
    """The template workflow cannot serve requests: a server configuration problem (HTTP 500)."""


def template_path(task: str) -> str:
    """The template file for "t2v" or "i2v": the env var's value (a name or a path) or the default."""
    value = os.environ.get(TEMPLATE_ENV[task], "").strip() or DEFAULT_TEMPLATES[task]
    if os.sep in value or "/" in value or os.path.isfile(value):
        return os.path.abspath(value)
    return os.path.join(API_DIR, value if value.endswith(".json") else value + ".json")


def load_template(task: str) -> tuple[str, dict]:
    """(path, API-format graph) of the template for "t2v" or "i2v"."""
    path = template_path(task)
    try:
        with open(path, encoding="utf-8") as f:
            graph = json.load(f)
    except (OSError, ValueError) as e:
        raise TemplateError(f"{task.upper()} template {path} ({TEMPLATE_ENV[task]}) cannot be read: {e}") from None
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise TemplateError(f"{path} is a UI workflow; the template must be in API format (Export (API))")
    if not isinstance(graph, dict) or not all(isinstance(n, dict) and "class_type" in n for n in graph.values()):
        raise TemplateError(f"{path} is not an API-format workflow ({{id: {{class_type, inputs}}}})")
    return path, graph


def _nodes(graph: dict, *types: str) -> list[str]:
    return [nid for nid, n in graph.items() if n["class_type"] in types]


def _one(graph: dict, what: str, *types: str) -> str:
    found = _nodes(graph, *types)
    if len(found) != 1:
        raise TemplateError(f"the template needs exactly one {what} ({' or '.join(types)}), it has {len(found)}")
    return found[0]


def _is_sampler(node: dict) -> bool:
    kind = node["class_type"]
    return kind in SAMPLERS or (kind.startswith("Wan") and "Sampler" in kind and "seed" in node.get("inputs", {}))


def _sampler(graph: dict) -> str:
    found = [nid for nid, n in graph.items() if _is_sampler(n)]
    if len(found) != 1:
        raise TemplateError(f"the template needs exactly one sampler ({' or '.join(SAMPLERS)} or another Wan*Sampler), it has {len(found)}")
    return found[0]


def _image_encoders(graph: dict) -> list[str]:
    return [nid for nid, n in graph.items() if n["class_type"].startswith("Wan") and "ImageEncode" in n["class_type"]]


def _step_count(step_list: str) -> int:
    return len([x for x in str(step_list).replace(";", ",").split(",") if x.strip()])


def _set_lora(graph: dict, sampler: str, name: str | None, strength: float | None, warnings: list[str]) -> None:
    """Replace the template's single LoRA, or insert one in front of the sampler if it has none."""
    loras = _nodes(graph, LORA_NODE)
    if len(loras) > 1:
        raise RequestError(
            400,
            f"the template chains {len(loras)} LoRAs (a Wan2.2 two-expert template has one per expert); "
            "lora_name / lora_strength cannot say which one to replace",
        )
    if loras:
        inputs = graph[loras[0]]["inputs"]
        if name is not None:
            inputs["lora"] = name
        if strength is not None:
            inputs["strength"] = strength
        return
    if name is None:
        warnings.append("lora_strength ignored: no lora_name given and the template has no LoRA")
        return
    new_id = "tasks_api_lora"
    while new_id in graph:
        new_id += "_"
    inputs = graph[sampler]["inputs"]
    graph[new_id] = {
        "class_type": LORA_NODE,
        "inputs": {"model": inputs["model"], "lora": name, "strength": 1.0 if strength is None else strength},
        "_meta": {"title": "LoRA (task API)"},
    }
    inputs["model"] = [new_id, 0]


def build_graph(template: dict, req: TaskRequest, save_prefix: str) -> tuple[dict, str]:
    """(the graph to queue, the id of its WanSaveVideo node). The template is not modified.

    `save_prefix`: WanSaveVideo's filename_prefix (the file is moved to `req.output` afterwards).
    Raises TemplateError for a template that cannot serve the request, RequestError (400) for a
    request the template cannot honour.
    """
    g = copy.deepcopy(template)
    encode = _one(g, "text encoder", "WanTextEncode")
    sampler = _sampler(g)
    save = _one(g, "video output", "WanSaveVideo")
    image_encoders = _image_encoders(g)
    s = g[sampler]["inputs"]

    g[encode]["inputs"]["prompt"] = req.prompt
    if req.negative_prompt is not None:
        g[encode]["inputs"]["negative_prompt"] = req.negative_prompt  # "" = the official default (the node's rule)
    s["seed"] = req.seed
    if req.infer_steps is not None:
        if s.get("scheduler") == "distill":
            n = _step_count(s.get("denoising_step_list", ""))
            if req.infer_steps != n:
                raise RequestError(
                    400,
                    f"infer_steps={req.infer_steps}, but this server's template runs the {n}-step distill schedule "
                    f"({s.get('denoising_step_list')}); omit infer_steps or send {n}",
                )
        s["steps"] = req.infer_steps
    if req.target_video_length is not None:
        for nid in (sampler, *image_encoders):
            g[nid]["inputs"]["num_frames"] = req.target_video_length
    if req.target_shape is not None:
        h, w = req.target_shape
        for nid in (sampler, *image_encoders):
            g[nid]["inputs"].update(height=h, width=w)
    if req.lora_name is not None or req.lora_strength is not None:
        _set_lora(g, sampler, req.lora_name, req.lora_strength, req.warnings)
    if req.image is not None:
        loader = _one(g, "image loader", "LoadImage")
        if not image_encoders:
            raise TemplateError("the I2V template has no image encoder node (WanImageEncode)")
        g[loader]["inputs"]["image"] = req.image.name
    g[save]["inputs"]["filename_prefix"] = save_prefix
    return g, save
