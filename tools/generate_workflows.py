"""Write the example workflows: one per seed scenario, in ComfyUI's UI format and API format.

    python tools/generate_workflows.py          # rewrite the JSON files
    python tools/generate_workflows.py --check  # exit 1 if a committed file is out of date

Each scenario is declared once below as a small graph (node type, widget values by input name,
links); both formats are derived from it and from the nodes' own INPUT_TYPES, so a renamed or
re-ordered input can never leave a stale workflow behind. UI files go in example_workflows/
(ComfyUI lists every *.json there as one of the pack's templates); their API twins go in
example_workflows/api/ (not listed as templates; for POST /prompt and `comfy run`). This script lives outside
example_workflows/ because ComfyUI serves that folder as the pack's templates.

File names are the ones users have (FORMATS.md, WAN22.md "Files"): ComfyUI's repackaged Wan2.1 and
Wan2.2 files, lightx2v's distill models and LoRAs (Wan2.2: one 4-step LoRA per expert).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "example_workflows")
sys.path.insert(0, REPO)

from nodes import NODE_CLASS_MAPPINGS  # noqa: E402
from nodes.types import DEFAULT_NEGATIVE_PROMPT, DISTILL_STEP_LIST  # noqa: E402

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")

# ComfyUI's core LoadImage node (used by the I2V workflows): its widgets and its two outputs.
CORE_NODES = {
    "LoadImage": {
        "widgets": [("image", "example.png"), ("upload", "image")],
        "api_inputs": ["image"],
        "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    }
}

# ----------------------------------------------------------------------------------------------
# file names users have (tests/reference/FORMATS.md)
T2V = "wan2.1_t2v_14B_bf16.safetensors"
I2V_480 = "wan2.1_i2v_480p_14B_bf16.safetensors"
I2V_720 = "wan2.1_i2v_720p_14B_bf16.safetensors"
T2V_MERGED = "wan2.1_t2v_14b_lightx2v_4step.safetensors"
T2V_FP8 = "wan2.1_t2v_14b_scaled_fp8_e4m3_lightx2v_4step.safetensors"
I2V_FP8 = "wan2.1_i2v_480p_scaled_fp8_e4m3_lightx2v_4step.safetensors"
T2V_LORA = "wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors"
I2V_LORA = "wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors"
T5 = "umt5_xxl_fp16.safetensors"
VAE = "wan_2.1_vae.safetensors"
CLIP = "clip_vision_h.safetensors"
IMAGE = "example.png"  # ships in ComfyUI's input/ folder
# Wan2.2 (tests/reference/WAN22.md "Files": Comfy-Org/Wan_2.2_ComfyUI_Repackaged and the lightx2v 4-step LoRAs)
WAN22_EXPERTS = {
    (task, e): f"wan2.2_{task}_{e}_noise_14B_fp16.safetensors" for task in ("t2v", "i2v") for e in ("high", "low")
}
WAN22_LORAS = {
    ("t2v", "high"): "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors",
    ("t2v", "low"): "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors",
    ("i2v", "high"): "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
    ("i2v", "low"): "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors",
}
TI2V_5B = "wan2.2_ti2v_5B_fp16.safetensors"
VAE22 = "wan2.2_vae.safetensors"

T2V_PROMPT = (
    "A red fox trotting through fresh snow in a pine forest at sunrise, soft golden light, cinematic tracking shot."
)
I2V_PROMPT = "The scene comes alive: gentle camera push-in, leaves sway in the wind, natural motion."

# the official I2V config prepends "camera shake" to the shared negative prompt
I2V_NEGATIVE_PROMPT = "镜头晃动，" + DEFAULT_NEGATIVE_PROMPT

BASE_T2V = dict(steps=50, guidance=5.0, shift=5.0, scheduler="unipc")
BASE_I2V_480 = dict(steps=40, guidance=5.0, shift=3.0, scheduler="unipc")
BASE_I2V_720 = dict(steps=40, guidance=5.0, shift=5.0, scheduler="unipc")
DISTILL = dict(steps=4, guidance=1.0, shift=5.0, scheduler="distill")
# Wan2.2 A14B with the 4-step LoRAs, as ComfyUI's own templates run it: 4 steps, no CFG, shift 5, the
# high-noise expert for steps 0-1 and the low-noise one for steps 2-3 (LightX2V's wan2.2_moe_distill
# schedule 1000,750,500,250, boundary_step_index 2)
MOE_4STEP = dict(steps=4, cfg_high=1.0, cfg_low=1.0, shift=5.0, scheduler="distill", switch="step", boundary=0.0,
                 switch_step=2)  # fmt: skip
# TI2V-5B, official: UniPC, 50 steps, guidance 5, shift 5, 1280x704, 121 frames at 24 fps
TI2V_BASE = dict(steps=50, guidance=5.0, shift=5.0, scheduler="unipc")


@dataclass
class Node:
    id: int
    type: str
    widgets: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)  # input name -> (source node id, output index)
    title: str | None = None


@dataclass
class Scenario:
    name: str
    title: str
    note: str
    nodes: list[Node]


def _loader(
    nid: int, dit: str, clip: str = "(none)", fp8: bool = False, offload: int | None = None, vae: str = VAE
) -> Node:
    w = dict(dit=dit, text_encoder=T5, vae=vae, clip_vision=clip, task="auto", dtype="auto", attention="auto",
             residual="auto")
    if fp8:
        w["fp8_kernel"] = "auto"
    links = {"offload": (offload, 0)} if offload is not None else {}
    return Node(nid, "WanFP8Loader" if fp8 else "WanModelLoader", w, links)


def _t2v(name, title, note, loader_nodes, model_out, sampler, sampler_type="WanSampler", extra=None, cache=None,
         size=(832, 480, 81), fps=16.0) -> Scenario:  # fmt: skip
    """Loader(s) -> text encode -> sampler -> decode -> save.

    Only the sampler takes the LoRA'd model (`model_out`); the encoders and the VAE hang off the
    loader (node 1), so a LoRA strength change re-runs the sampler and the decode, nothing else.
    `cache`: a WanCacheConfig node (feature caching) plugged into the sampler.
    """
    s = dict(width=size[0], height=size[1], num_frames=size[2], seed=42, denoising_step_list=DISTILL_STEP_LIST, **sampler)
    s.update(extra or {})
    links = {"model": (model_out, 0), "text_embeds": (10, 0)}
    if cache is not None:
        links["cache"] = (cache.id, 0)
    nodes = [
        *loader_nodes,
        *([cache] if cache is not None else []),
        Node(10, "WanTextEncode", dict(prompt=T2V_PROMPT, negative_prompt=DEFAULT_NEGATIVE_PROMPT), {"model": (1, 0)}),
        Node(11, sampler_type, s, links),
        Node(12, "WanVAEDecode", dict(tile_size=0), {"model": (1, 0), "samples": (11, 0)}),
        Node(13, "WanSaveVideo", dict(filename_prefix=f"wan/{name}", fps=fps, crf=19, preset="medium"), {"images": (12, 0)}),
    ]
    return Scenario(name, title, note, nodes)


def _moe(name, title, note, task: str, width: int = 832, height: int = 480) -> Scenario:
    """Wan2.2 A14B as ComfyUI's templates wire it: a loader per expert (1 high, 2 low), each with its
    own 4-step LoRA (3, 4), into the two-expert sampler; the encoders and the VAE hang off loader 1
    (the experts share T5 and the Wan2.1 VAE). I2V adds LoadImage -> WanImageEncode (no CLIP)."""
    s = dict(width=width, height=height, num_frames=81, seed=42, denoising_step_list=DISTILL_STEP_LIST, **MOE_4STEP)
    links = {"high_noise_model": (3, 0), "low_noise_model": (4, 0), "text_embeds": (10, 0)}
    prompt, image = (I2V_PROMPT, [Node(9, "LoadImage", dict(image=IMAGE, upload="image"))]) if task == "i2v" else (T2V_PROMPT, [])
    if task == "i2v":
        image.append(Node(14, "WanImageEncode", dict(width=width, height=height, num_frames=81), {"model": (1, 0), "image": (9, 0)}))
        links["image_embeds"] = (14, 0)
    high, low = _loader(1, WAN22_EXPERTS[(task, "high")]), _loader(2, WAN22_EXPERTS[(task, "low")])
    high.title, low.title = "Wan Model Loader (high-noise expert)", "Wan Model Loader (low-noise expert)"
    lora = lambda nid, e, src: Node(nid, "WanLoraApply", dict(lora=WAN22_LORAS[(task, e)], strength=1.0),  # noqa: E731
                                    {"model": (src, 0)}, f"Wan LoRA ({e}-noise expert)")  # fmt: skip
    nodes = [high, low, lora(3, "high", 1), lora(4, "low", 2),
        *image,
        Node(10, "WanTextEncode", dict(prompt=prompt, negative_prompt=DEFAULT_NEGATIVE_PROMPT), {"model": (1, 0)}),
        Node(11, "WanSamplerMoE", s, links),
        Node(12, "WanVAEDecode", dict(tile_size=0), {"model": (1, 0), "samples": (11, 0)}),
        Node(13, "WanSaveVideo", dict(filename_prefix=f"wan/{name}", fps=16.0, crf=19, preset="medium"), {"images": (12, 0)}),
    ]
    return Scenario(name, title, note, nodes)


def _i2v(name, title, note, loader_nodes, model_out, sampler, width, height) -> Scenario:
    """Loader(s) + LoadImage -> text encode, image encode -> sampler -> decode -> save."""
    s = dict(width=width, height=height, num_frames=81, seed=42, denoising_step_list=DISTILL_STEP_LIST, **sampler)
    nodes = [
        *loader_nodes,
        Node(9, "LoadImage", dict(image=IMAGE, upload="image")),
        Node(10, "WanTextEncode", dict(prompt=I2V_PROMPT, negative_prompt=I2V_NEGATIVE_PROMPT), {"model": (1, 0)}),
        Node(14, "WanImageEncode", dict(width=width, height=height, num_frames=81), {"model": (1, 0), "image": (9, 0)}),
        Node(11, "WanSampler", s, {"model": (model_out, 0), "text_embeds": (10, 0), "image_embeds": (14, 0)}),
        Node(12, "WanVAEDecode", dict(tile_size=0), {"model": (1, 0), "samples": (11, 0)}),
        Node(13, "WanSaveVideo", dict(filename_prefix=f"wan/{name}", fps=16.0, crf=19, preset="medium"), {"images": (12, 0)}),
    ]
    return Scenario(name, title, note, nodes)


# MagCache with the authors' published setting for Wan2.1 T2V-14B (threshold 0.24, K 6, first 20 % computed)
MAGCACHE_T2V_14B = dict(
    method="Mag", teacache_thresh=0.2, use_ret_steps=True, magcache_thresh=0.24, magcache_K=6,
    magcache_retention_ratio=0.2, start_step=-1, end_step=0, max_skips=0, cache_model="t2v-14b",
)  # fmt: skip


def scenarios() -> list[Scenario]:
    lora = lambda file: Node(2, "WanLoraApply", dict(lora=file, strength=1.0), {"model": (1, 0)})  # noqa: E731
    return [
        _t2v("wan21_t2v_14b_base", "Wan2.1 T2V 14B (base, 50 steps)",
             "Official settings: UniPC, 50 steps, CFG 5, shift 5.", [_loader(1, T2V)], 1, BASE_T2V),
        _t2v("wan21_t2v_14b_base_cache", "Wan2.1 T2V 14B (base, 50 steps) + MagCache",
             "Official settings with feature caching: DiT evaluations whose output barely changes are skipped "
             "(the sampler reports how many). Raise the threshold to skip more, set it to 0 to skip none.",
             [_loader(1, T2V)], 1, BASE_T2V, cache=Node(4, "WanCacheConfig", MAGCACHE_T2V_14B)),
        _t2v("wan21_t2v_14b_distill_lora", "Wan2.1 T2V 14B + lightx2v 4-step LoRA",
             "Base bf16 DiT with the rank-64 distill LoRA: 4 steps, no CFG.", [_loader(1, T2V), lora(T2V_LORA)], 2, DISTILL),
        _t2v("wan21_t2v_14b_distill_merged", "Wan2.1 T2V 14B lightx2v 4-step (merged)",
             "The distill model with the LoRA merged in: 4 steps, no CFG.", [_loader(1, T2V_MERGED)], 1, DISTILL),
        _t2v("wan21_t2v_14b_distill_fp8", "Wan2.1 T2V 14B lightx2v 4-step FP8",
             "Per-channel scaled FP8 distill model: about half the DiT memory.", [_loader(1, T2V_FP8, fp8=True)], 1, DISTILL),
        _i2v("wan21_i2v_480p_base", "Wan2.1 I2V 14B 480P (base, 40 steps)",
             "Official I2V-480P settings: UniPC, 40 steps, CFG 5, shift 3.", [_loader(1, I2V_480, CLIP)], 1, BASE_I2V_480, 832, 480),
        _i2v("wan21_i2v_480p_distill_lora", "Wan2.1 I2V 14B 480P + lightx2v 4-step LoRA",
             "Base I2V-480P DiT with the distill LoRA: 4 steps, no CFG.", [_loader(1, I2V_480, CLIP), lora(I2V_LORA)], 2, DISTILL, 832, 480),
        _i2v("wan21_i2v_480p_distill_fp8", "Wan2.1 I2V 14B 480P lightx2v 4-step FP8",
             "Per-channel scaled FP8 distill I2V model.", [_loader(1, I2V_FP8, CLIP, fp8=True)], 1, DISTILL, 832, 480),
        _i2v("wan21_i2v_720p_base", "Wan2.1 I2V 14B 720P (base, 40 steps)",
             "Official I2V-720P settings: UniPC, 40 steps, CFG 5, shift 5.", [_loader(1, I2V_720, CLIP)], 1, BASE_I2V_720, 1280, 720),
        _t2v("wan21_t2v_14b_offload_distill_lora", "Wan2.1 T2V 14B, block offload, 4-step LoRA (16-24 GB cards)",
             "The DiT stays in CPU RAM and streams block by block to the GPU; the text encoder and VAE visit the GPU only for their stage.",
             [Node(3, "WanOffloadConfig", dict(granularity="block", vram_budget_gb=0.0, offload_encoders=True)), _loader(1, T2V, offload=3), lora(T2V_LORA)],
             2, DISTILL),
        _t2v("wan21_t2v_14b_multigpu", "Wan2.1 T2V 14B on 2 GPUs (Ulysses)",
             "Sequence parallel over 2 GPUs; set num_gpus = cfg_parallel (1/2) x ulysses x ring.",
             [_loader(1, T2V)], 1, BASE_T2V, "WanMultiGPUSampler",
             dict(num_gpus=2, ulysses_degree=2, ring_degree=1, cfg_parallel=False)),
        _moe("wan22_t2v_a14b_4step_lora", "Wan2.2 T2V A14B + lightx2v 4-step LoRAs (two experts)",
             "ComfyUI's Wan2.2 template path: the high-noise and low-noise experts, each with its own 4-step LoRA; "
             "4 steps, no CFG, shift 5, steps 0-1 on the high-noise expert and 2-3 on the low-noise one.", "t2v"),
        _moe("wan22_i2v_a14b_4step_lora", "Wan2.2 I2V A14B + lightx2v 4-step LoRAs (two experts)",
             "Image to video with the two I2V experts and their 4-step LoRAs (no CLIP file: Wan2.2 has none); "
             "4 steps, no CFG, shift 5, switch at step 2.", "i2v"),
        _t2v("wan22_ti2v_5b", "Wan2.2 TI2V 5B (text to video, 720p, 24 fps)",
             "Official settings: UniPC, 50 steps, CFG 5, shift 5, 1280x704, 121 frames at 24 fps, with the Wan2.2 VAE. "
             "Connect a WanImageEncode (start image) to the sampler for text+image to video.",
             [_loader(1, TI2V_5B, vae=VAE22)], 1, TI2V_BASE, size=(1280, 704, 121), fps=24.0),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# node descriptions from INPUT_TYPES


def node_io(node_type: str) -> tuple[list[tuple[str, str, bool]], list[tuple[str, str]]]:
    """([(input name, type, is_widget)] in INPUT_TYPES order, [(output name, type)])."""
    if node_type in CORE_NODES:
        core = CORE_NODES[node_type]
        return [(n, "COMBO", True) for n, _ in core["widgets"]], core["outputs"]
    cls = NODE_CLASS_MAPPINGS[node_type]
    spec = cls.INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, (typ, *_) in spec.get(section, {}).items():
            is_widget = isinstance(typ, list) or typ in WIDGET_TYPES
            inputs.append((name, "COMBO" if isinstance(typ, list) else typ, is_widget))
    names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
    return inputs, list(zip(names, cls.RETURN_TYPES))


def _has_control(node_type: str, name: str) -> bool:
    """Seed-like INT widgets get a second widget ('control after generate') in the UI."""
    if node_type in CORE_NODES:
        return False
    typ, *opts = NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()["required"].get(name, (None,))
    return typ == "INT" and ((opts and opts[0].get("control_after_generate")) or name in ("seed", "noise_seed"))


def to_api(sc: Scenario) -> dict:
    out = {}
    for n in sc.nodes:
        inputs = {}
        if n.type in CORE_NODES:
            inputs = {k: n.widgets[k] for k in CORE_NODES[n.type]["api_inputs"]}
        else:
            for name, _, is_widget in node_io(n.type)[0]:
                if is_widget:
                    inputs[name] = n.widgets[name]
                elif name in n.links:
                    src, idx = n.links[name]
                    inputs[name] = [str(src), idx]
        out[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
    return out


def _topo(sc: Scenario) -> list[Node]:
    done, order = set(), []
    pending = list(sc.nodes)
    while pending:
        for n in pending:
            if all(src in done for src, _ in n.links.values()):
                order.append(n)
                done.add(n.id)
                pending.remove(n)
                break
        else:
            raise ValueError(f"{sc.name}: cycle or dangling link")
    return order


def to_ui(sc: Scenario) -> dict:
    order = _topo(sc)
    depth: dict[int, int] = {}
    for n in order:
        depth[n.id] = 1 + max((depth[src] for src, _ in n.links.values()), default=-1)
    rows: dict[int, int] = {}
    links, ui_nodes = [], []
    link_id = 0
    out_links: dict[tuple[int, int], list[int]] = {}
    in_links: dict[tuple[int, str], int] = {}
    for n in order:
        inputs, _ = node_io(n.type)
        for name, _typ, _ in inputs:
            if name in n.links:
                src, idx = n.links[name]
                link_id += 1
                src_type = node_io(next(m.type for m in sc.nodes if m.id == src))[1][idx][1]
                slot = [i for i, _, w in inputs if not w].index(name)
                links.append([link_id, src, idx, n.id, slot, src_type])
                out_links.setdefault((src, idx), []).append(link_id)
                in_links[(n.id, name)] = link_id
    for i, n in enumerate(order):
        inputs, outputs = node_io(n.type)
        col = depth[n.id]
        row = rows.get(col, 0)
        rows[col] = row + 1
        values = []
        for name, _, is_widget in inputs:
            if is_widget:
                values.append(n.widgets[name])
                if _has_control(n.type, name):
                    values.append("fixed")
        ui_nodes.append(
            {
                "id": n.id,
                "type": n.type,
                "pos": [40 + 380 * col, 60 + 360 * row],
                "size": [340, 300],
                "flags": {},
                "order": i,
                "mode": 0,
                "inputs": [
                    {"name": name, "type": typ, "link": in_links.get((n.id, name))}
                    for name, typ, is_widget in inputs
                    if not is_widget
                ],
                "outputs": [
                    {"name": oname, "type": otyp, "links": out_links.get((n.id, k), []), "slot_index": k}
                    for k, (oname, otyp) in enumerate(outputs)
                ],
                "properties": {"Node name for S&R": n.type},
                "widgets_values": values,
                **({"title": n.title} if n.title else {}),
            }
        )
    return {
        "last_node_id": max(n.id for n in sc.nodes),
        "last_link_id": link_id,
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"wan_fast": {"title": sc.title, "note": sc.note}},
        "version": 0.4,
    }


def render() -> dict[str, str]:
    """relative path -> file text, for every workflow in both formats."""
    files = {}
    for sc in scenarios():
        files[f"{sc.name}.json"] = json.dumps(to_ui(sc), indent=2, ensure_ascii=False) + "\n"
        files[f"api/{sc.name}.json"] = json.dumps(to_api(sc), indent=2, ensure_ascii=False) + "\n"
    return files


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for rel, text in render().items():
        path = os.path.join(OUT, rel)
        old = open(path, encoding="utf-8").read() if os.path.isfile(path) else None
        if old != text:
            stale.append(rel)
            if not check:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
    if check and stale:
        print("out of date (run python tools/generate_workflows.py):", ", ".join(stale))
        return 1
    print(("checked" if check else "wrote"), len(render()), "files" + (f", {len(stale)} changed" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
