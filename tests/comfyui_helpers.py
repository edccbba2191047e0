"""Shared by the workflow tests and the real-ComfyUI test: tiny models under the workflows'
file names, a validator for workflow values against INPUT_TYPES, a size reducer, and a tiny
executor that walks an API-format graph through the node classes (no ComfyUI needed)."""

from __future__ import annotations

import copy
import json
import os
import shutil

import torch

from nodes import NODE_CLASS_MAPPINGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(REPO, "example_workflows")
WORKFLOW_NAMES = sorted(f[:-5] for f in os.listdir(WORKFLOWS) if f.endswith(".json"))
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
CORE_NODE_TYPES = {"LoadImage"}  # ComfyUI core nodes the example workflows use


def load_ui(name: str) -> dict:
    with open(os.path.join(WORKFLOWS, f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


def load_api(name: str) -> dict:
    with open(os.path.join(WORKFLOWS, "api", f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# tiny models in ComfyUI's folder layout, under the file names the workflows use


def populate_models(root: str, scratch: str) -> tuple[dict[str, str], dict[str, str]]:
    """Write every file the example workflows name into `root/<folder>/` (tiny random weights).

    Returns ({file name: path}, {file name: why it could not be made}) — the second for files
    whose engine feature (e.g. the FP8 converter) does not work yet. Also writes
    input/example.png beside `root` for LoadImage.
    """
    from wan_core.convert import convert_to_fp8
    from wan_core.loading.dit import save_dit, to_official
    from wan_core.loading.io import read_state_dict
    from wan_core.loading.lora import random_lora, save_lora
    from wan_core.loading.tiny import COMFY_NAMES, tiny_dit_config, write_tiny_model

    made, missing = {}, {}
    tiny = {task: write_tiny_model(os.path.join(scratch, task), task, "comfyui") for task in ("t2v", "i2v")}

    def put(folder: str, name: str, src: str | None = None) -> str:
        dst = os.path.join(root, folder, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if src is not None:
            shutil.copyfile(src, dst)
        made[name] = dst
        return dst

    comfy = {k: os.path.join(tiny["i2v" if k in ("i2v", "clip") else "t2v"], v) for k, v in COMFY_NAMES.items()}
    put("diffusion_models", "wan2.1_t2v_14B_bf16.safetensors", comfy["t2v"])
    put("diffusion_models", "wan2.1_i2v_480p_14B_bf16.safetensors", comfy["i2v"])
    put("diffusion_models", "wan2.1_i2v_720p_14B_bf16.safetensors", comfy["i2v"])
    put("text_encoders", "umt5_xxl_fp16.safetensors", comfy["t5"])
    put("vae", "wan_2.1_vae.safetensors", comfy["vae"])
    put("clip_vision", "clip_vision_h.safetensors", comfy["clip"])
    # lightx2v distill files: official names, no prefix (merged) and per-channel FP8
    t2v_sd = to_official(read_state_dict(comfy["t2v"]))
    save_dit(
        t2v_sd, put("diffusion_models", "wan2.1_t2v_14b_lightx2v_4step.safetensors"), "single", tiny_dit_config("t2v")
    )
    for task, name in (
        ("t2v", "wan2.1_t2v_14b_scaled_fp8_e4m3_lightx2v_4step.safetensors"),
        ("i2v", "wan2.1_i2v_480p_scaled_fp8_e4m3_lightx2v_4step.safetensors"),
    ):
        try:
            convert_to_fp8(comfy[task], put("diffusion_models", name))
        except Exception as e:  # the FP8 engine is not finished: workflows naming this file are skipped
            missing[name] = f"wan_core.convert.convert_to_fp8 failed: {type(e).__name__}: {e}"
            made.pop(name, None)
    for task, name in (
        ("t2v", "wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors"),
        ("i2v", "wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors"),
    ):
        save_lora(
            random_lora(tiny_dit_config(task), rank=4, seed=1, targets="blocks" if task == "t2v" else "linears"),
            put("loras", name),
        )
    populate_wan22(put, scratch)
    # an image for LoadImage (ComfyUI ships input/example.png; ours is small)
    from PIL import Image

    inp = os.path.join(os.path.dirname(root.rstrip("/")), "input")
    os.makedirs(inp, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(40, 72, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(os.path.join(inp, "example.png"))
    made["example.png"] = os.path.join(inp, "example.png")
    return made, missing


# Wan2.2 files under ComfyUI's names (tests/reference/WAN22.md "Files"): the repackaged experts, TI2V-5B and
# its VAE, and the lightx2v 4-step LoRAs, one per expert
WAN22_LORAS = {
    ("t2v", "high"): "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors",
    ("t2v", "low"): "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors",
    ("i2v", "high"): "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
    ("i2v", "low"): "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors",
}


def populate_wan22(put, scratch: str) -> None:
    """The Wan2.2 tiny models (`write_tiny_model(..., family="wan2.2")`, ComfyUI layout) and a random
    rank-4 LoRA per expert (each expert's its own seed), via `put(folder, name, src)`. Their T5 and
    Wan2.1 VAE are the Wan2.1 tiny model's (same seed, same bytes), so they share those files."""
    from wan_core.loading.lora import random_lora, save_lora
    from wan_core.loading.tiny import write_tiny_model
    from wan_core.loading.tiny22 import COMFY22_NAMES
    from wan_core.loading.tiny_parts import tiny_dit22_config

    for task in ("t2v", "i2v", "ti2v"):
        root = write_tiny_model(os.path.join(scratch, f"wan22-{task}"), task, "comfyui", family="wan2.2")
        for key, rel in COMFY22_NAMES.items():
            if isinstance(key, tuple) and key[0] == task:
                put("diffusion_models", os.path.basename(rel), os.path.join(root, rel))
        if task == "ti2v":
            put("vae", os.path.basename(COMFY22_NAMES["vae22"]), os.path.join(root, COMFY22_NAMES["vae22"]))
    for (task, expert), name in WAN22_LORAS.items():
        lora = random_lora(tiny_dit22_config(task), rank=4, seed=11 if expert == "high" else 12, targets="blocks")
        save_lora(lora, put("loras", name))


# ----------------------------------------------------------------------------------------------
# validation of widget values against INPUT_TYPES


FORMATS = os.path.join(REPO, "tests", "reference", "FORMATS.md")
WAN22 = os.path.join(REPO, "tests", "reference", "WAN22.md")
MODEL_FILE_INPUTS = {"dit", "text_encoder", "vae", "clip_vision", "lora"}  # combos listing a model folder


def real_file_names() -> set[str]:
    """The .safetensors names FORMATS.md and WAN22.md ("Files") say users have, with the shorthand
    expanded: the 720p twins FORMATS.md mentions, WAN22.md's `{high,low}`, "the same four for i2v"
    (the T2V expert names with i2v) and the low-noise LoRAs written `..._low_noise` after the high one."""
    import re

    def expand(name: str) -> list[str]:
        m = re.search(r"\{([^}]*)\}", name)
        return [n for alt in m.group(1).split(",") for n in expand(name[: m.start()] + alt + name[m.end() :])] if m else [name]

    with open(FORMATS, encoding="utf-8") as f:
        names = set(re.findall(r"`([\w.\-]+\.safetensors)`", f.read()))
    names |= {n.replace("480p", "720p") for n in names if n.startswith("wan2.1_i2v_480p_14B")}
    with open(WAN22, encoding="utf-8") as f:
        text = f.read()
    files = text[text.index("## Files") :]
    wan22 = {n for raw in re.findall(r"`([\w.\-{},]+\.safetensors)`", files) for n in expand(raw)}
    wan22 |= {n.replace("_t2v_", "_i2v_") for n in wan22 if re.match(r"wan2\.2_t2v_(high|low)_noise_14B_", n)}
    wan22 |= {n.replace("_high_noise.", "_low_noise.") for n in wan22 if "lightx2v_4steps_lora" in n}
    return names | wan22


def check_value(node_type: str, name: str, value, model_files: set[str] | None = None) -> str | None:
    """None if `value` is acceptable for input `name` of `node_type`, else the reason.

    A model-file combo lists what is on disk; `model_files` (if given) is taken as its list instead.
    """
    spec = NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
    entry = spec.get("required", {}).get(name) or spec.get("optional", {}).get(name)
    if entry is None:
        return f"{node_type} has no input {name!r}"
    typ, opts = entry[0], (entry[1] if len(entry) > 1 else {})
    if isinstance(typ, list):
        if name in MODEL_FILE_INPUTS and model_files is not None:
            typ = [c for c in typ if c.startswith("(")] + sorted(model_files)
        return None if value in typ else f"{node_type}.{name}: {value!r} not in {typ[:8]}"
    if typ == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{node_type}.{name}: {value!r} is not an int"
    elif typ == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{node_type}.{name}: {value!r} is not a number"
    elif typ == "STRING":
        return None if isinstance(value, str) else f"{node_type}.{name}: {value!r} is not a string"
    elif typ == "BOOLEAN":
        return None if isinstance(value, bool) else f"{node_type}.{name}: {value!r} is not a boolean"
    else:
        return f"{node_type}.{name} is a {typ} socket, not a widget"
    if "min" in opts and value < opts["min"] or "max" in opts and value > opts["max"]:
        return f"{node_type}.{name}: {value} outside [{opts.get('min')}, {opts.get('max')}]"
    return None


# ----------------------------------------------------------------------------------------------
# reducing a workflow to tiny sizes, and running it headlessly

TINY = dict(width=64, height=48, num_frames=5, steps=2)
TINY_TI2V = dict(width=64, height=32)  # TI2V-5B sizes are multiples of 32 (Wan2.2 VAE 16 x patch 2)
SAMPLERS = ("WanSampler", "WanMultiGPUSampler", "WanSamplerMoE")


def is_ti2v(graph: dict) -> bool:
    """The graph samples TI2V-5B (its loader names the 5B file)."""
    return any("ti2v" in str(n["inputs"].get("dit", "")) for n in graph.values())


def reduce_api(graph: dict, prefix: str | None = None) -> dict:
    """A copy with the video size, frame count and step count cut down for tiny CPU runs (two experts:
    the switch at step 1 of the 2)."""
    g = copy.deepcopy(graph)
    size = {**TINY, **TINY_TI2V} if is_ti2v(graph) else TINY
    for node in g.values():
        inp = node["inputs"]
        if node["class_type"] in SAMPLERS:
            inp.update(width=size["width"], height=size["height"], num_frames=TINY["num_frames"], steps=TINY["steps"])
            if inp.get("scheduler") == "distill":
                inp["denoising_step_list"] = "1000,500"
            if node["class_type"] == "WanSamplerMoE" and inp.get("switch_step"):
                inp["switch_step"] = 1
        elif node["class_type"] == "WanImageEncode":
            inp.update(width=size["width"], height=size["height"], num_frames=TINY["num_frames"])
        elif node["class_type"] == "WanSaveVideo" and prefix is not None:
            inp["filename_prefix"] = prefix
    return g


class LoadImageStandIn:
    """ComfyUI's LoadImage, for headless runs: input/<name> -> IMAGE [1, H, W, 3] in [0, 1]."""

    input_dir = "input"
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"

    def load_image(self, image: str):
        import numpy as np
        from PIL import Image

        path = os.path.join(self.input_dir, image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LoadImage: {path} not found")
        arr = np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255.0
        t = torch.from_numpy(arr)[None]
        return (t, torch.zeros(t.shape[1:3]))


def run_api(graph: dict, input_dir: str | None = None) -> dict:
    """Execute an API-format graph through the node classes; returns {node id: (outputs, ui)}.

    Walks the graph from its output nodes, each node once (as ComfyUI does), passing linked
    outputs by [node id, output index].
    """
    classes = dict(NODE_CLASS_MAPPINGS)
    stand_in = type("LoadImage", (LoadImageStandIn,), {"input_dir": input_dir or "input"})
    classes["LoadImage"] = stand_in
    done: dict[str, tuple] = {}

    def run(nid: str, trail=()):
        if nid in done:
            return done[nid]
        if nid in trail:
            raise ValueError(f"cycle through node {nid}")
        node = graph[nid]
        cls = classes[node["class_type"]]
        kwargs = {}
        for k, v in node["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                kwargs[k] = run(v[0], (*trail, nid))[0][v[1]]
            else:
                kwargs[k] = v
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            out = getattr(cls(), cls.FUNCTION)(**kwargs)
        ui = None
        if isinstance(out, dict):
            ui, out = out.get("ui"), out.get("result", ())
        done[nid] = (tuple(out), ui)
        return done[nid]

    outputs = [nid for nid, n in graph.items() if getattr(classes[n["class_type"]], "OUTPUT_NODE", False)]
    if not outputs:
        raise ValueError("the graph has no output node")
    for nid in outputs:
        run(nid)
    return done


def write_core_wan_vae(path: str, seed: int = 0) -> str:
    """A Wan2.1 VAE at its real width (random bf16 weights, ~250 MB) for ComfyUI's core VAELoader,
    whose Wan VAE has a fixed width (the tiny one does not load there)."""
    from safetensors.torch import save_file

    from wan_core.models.vae import WanVAE, WanVAEConfig

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanVAE(WanVAEConfig()).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(sd, path)
    return path
