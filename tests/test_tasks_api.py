"""The LightX2V-compatible task API without ComfyUI: request -> workflow mapping, validation, status.

The service runs here over a fake ComfyUI (a queue, a running slot, a history dict, and a
"WanSaveVideo" that writes `<prefix>_00001_.mp4` as the real node does); the real server is
exercised in test_tasks_api_real.py (marker comfyui).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

from tasks_api.request import RANDOM_SEED_MAX, RequestError, parse_request
from tasks_api.service import IMAGE_TASKS_REFUSED, TaskService
from tasks_api.status import observe
from tasks_api.workflow import API_DIR, TEMPLATE_ENV, TemplateError, build_graph, load_template, template_path
from tests.comfyui_helpers import REPO

# the body LightX2V's scripts/server/post.py sends
POST_PY_BODY = {
    "prompt": "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage.",
    "negative_prompt": "镜头晃动，色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走",
    "image_path": "",
    "seed": 42,
    "save_result_path": "./cat_boxing_seed42.mp4",
}
LORA = "wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors"


def png_bytes(w: int = 24, h: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 60)).save(buf, format="PNG")
    return buf.getvalue()


def files_under(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def by_type(graph: dict, class_type: str) -> list[dict]:
    return [n["inputs"] for n in graph.values() if n["class_type"] == class_type]


class FakeComfy:
    """ComfyUI's queue, history and WanSaveVideo, as the task service's backend."""

    def __init__(self, root):
        self.inp, self.out = str(root / "input"), str(root / "output")
        os.makedirs(self.inp), os.makedirs(self.out)
        self.queue: list[tuple[str, dict]] = []
        self.running: tuple[str, dict] | None = None
        self.hist: dict[str, dict] = {}
        self.rejection: str | None = None
        self.interrupted: list[str] = []

    def input_dir(self):
        return self.inp

    def output_dir(self):
        return self.out

    def lora_names(self):
        return [LORA, "other.safetensors"]

    async def prepare(self, prompt_id, graph):
        if self.rejection:
            raise RequestError(400, self.rejection)
        return graph

    def put(self, prompt_id, graph):
        self.queue.append((prompt_id, graph))

    def snapshot(self):
        return ([self.running[0]] if self.running else []), [q[0] for q in self.queue]

    def history(self, prompt_id):
        return copy.deepcopy(self.hist.get(prompt_id))

    def delete_queued(self, prompt_id):
        n = len(self.queue)
        self.queue = [q for q in self.queue if q[0] != prompt_id]
        return len(self.queue) < n

    def interrupt(self, prompt_id):
        if self.running and self.running[0] == prompt_id:
            self.interrupted.append(prompt_id)
            self.finish(interrupted=True)
            return True
        return False

    # driving the fake
    def start(self):
        self.running = self.queue.pop(0)

    def finish(self, interrupted=False, error=None):
        pid, graph = self.running
        self.running = None
        msgs = [["execution_start", {"prompt_id": pid, "timestamp": 1_700_000_000_000}]]
        outputs = {}
        if interrupted:
            msgs.append(["execution_interrupted", {"prompt_id": pid, "timestamp": 1_700_000_001_000}])
        elif error:
            msgs.append(["execution_error", {"exception_message": error, "exception_type": "ValueError",
                                              "node_id": "11", "node_type": "WanSampler", "timestamp": 1_700_000_001_000}])  # fmt: skip
        else:
            (save_id,) = [k for k, n in graph.items() if n["class_type"] == "WanSaveVideo"]
            sub, name = os.path.split(graph[save_id]["inputs"]["filename_prefix"])
            os.makedirs(os.path.join(self.out, sub), exist_ok=True)
            fname = f"{name}_00001_.mp4"
            with open(os.path.join(self.out, sub, fname), "wb") as f:
                f.write(b"\x00\x00\x00\x18ftypmp42 video of " + pid.encode())
            outputs[save_id] = {"images": [{"filename": fname, "subfolder": sub, "type": "output"}]}
            msgs.append(["execution_success", {"prompt_id": pid, "timestamp": 1_700_000_002_000}])
        ok = not interrupted and not error
        self.hist[pid] = {"prompt": [0, pid, graph, {}, []], "outputs": outputs,
                          "status": {"status_str": "success" if ok else "error", "completed": ok, "messages": msgs}}  # fmt: skip


@pytest.fixture
def comfy(tmp_path):
    return FakeComfy(tmp_path)


@pytest.fixture
def service(comfy):
    return TaskService(comfy, max_queue_size=10)


def parse(comfy, body, **kw):
    return parse_request(body, input_dir=comfy.inp, output_dir=comfy.out, lora_names=comfy.lora_names(), **kw)


def submit(service, body, kind="video"):
    return asyncio.run(service.submit(body, kind))


# ---------------------------------------------------------------------------------------------
# request -> workflow


def test_post_py_body_maps_onto_the_t2v_template(comfy):
    req = parse(comfy, POST_PY_BODY)
    assert req.task == "t2v" and req.output == "cat_boxing_seed42.mp4" and req.warnings == []
    assert req.save_result_path == "./cat_boxing_seed42.mp4"  # echoed back as LightX2V does
    path, template = load_template(req.task)
    assert path == os.path.join(API_DIR, "wan21_t2v_14b_base.json")
    before = copy.deepcopy(template)
    graph, save = build_graph(template, req, f"{req.task_id}")
    assert template == before  # the template is not modified
    (enc,) = by_type(graph, "WanTextEncode")
    (smp,) = by_type(graph, "WanSampler")
    assert enc["prompt"] == POST_PY_BODY["prompt"] and enc["negative_prompt"] == POST_PY_BODY["negative_prompt"]
    assert smp["seed"] == 42 and graph[save]["inputs"]["filename_prefix"] == req.task_id
    # nothing else changed: the template's size, steps, scheduler, models
    changed = {
        (nid, k)
        for nid, n in graph.items()
        for k, v in n["inputs"].items()
        if before.get(nid, {}).get("inputs", {}).get(k) != v
    }
    enc_id = next(k for k, n in graph.items() if n["class_type"] == "WanTextEncode")
    smp_id = next(k for k, n in graph.items() if n["class_type"] == "WanSampler")
    assert changed <= {(enc_id, "prompt"), (enc_id, "negative_prompt"), (smp_id, "seed"), (save, "filename_prefix")}
    assert set(graph) == set(before) and not by_type(graph, "LoadImage")


def test_every_honoured_field_reaches_its_node(comfy):
    Image.new("RGB", (40, 24)).save(os.path.join(comfy.inp, "cat.png"))
    body = {
        "prompt": "a cat",
        "negative_prompt": "",
        "image_path": "cat.png",
        "seed": 7,
        "infer_steps": 12,
        "target_video_length": 33,
        "target_shape": [720, 1280],
        "lora_name": "other.safetensors",
        "lora_strength": 0.5,
        "save_result_path": "runs/a/cat",
    }
    req = parse(comfy, body)
    assert req.task == "i2v" and req.output == "runs/a/cat.mp4" and req.image.name == "cat.png"
    path, template = load_template(req.task)
    assert path.endswith("wan21_i2v_480p_base.json")
    graph, save = build_graph(template, req, "runs/a/" + req.task_id)
    (enc,), (smp,), (img,), (load,) = (by_type(graph, t) for t in ("WanTextEncode", "WanSampler", "WanImageEncode", "LoadImage"))  # fmt: skip
    assert enc["negative_prompt"] == "" and enc["prompt"] == "a cat"  # "" is passed on (the node's official default)
    assert (smp["seed"], smp["steps"], smp["num_frames"], smp["height"], smp["width"]) == (7, 12, 33, 720, 1280)
    assert (img["num_frames"], img["height"], img["width"]) == (33, 720, 1280)
    assert load["image"] == "cat.png" and graph[save]["inputs"]["filename_prefix"] == "runs/a/" + req.task_id
    # the base template has no LoRA: one is inserted between the model and the sampler
    (lora_id,) = [k for k, n in graph.items() if n["class_type"] == "WanLoraApply"]
    assert graph[lora_id]["inputs"]["lora"] == "other.safetensors" and graph[lora_id]["inputs"]["strength"] == 0.5
    loader = next(k for k, n in graph.items() if n["class_type"] == "WanModelLoader")
    assert graph[lora_id]["inputs"]["model"] == [loader, 0]
    assert next(n for n in graph.values() if n["class_type"] == "WanSampler")["inputs"]["model"] == [lora_id, 0]


def test_lora_replaces_the_templates_lora_and_distill_steps_must_match(comfy, monkeypatch):
    monkeypatch.setenv("WAN_TASKS_T2V_TEMPLATE", "wan21_t2v_14b_distill_lora")
    assert template_path("t2v") == os.path.join(API_DIR, "wan21_t2v_14b_distill_lora.json")
    _, template = load_template("t2v")
    req = parse(comfy, {"prompt": "x", "lora_name": "other.safetensors", "lora_strength": 0.8, "infer_steps": 4})
    graph, _ = build_graph(template, req, "p")
    (lora,) = by_type(graph, "WanLoraApply")
    assert (lora["lora"], lora["strength"]) == ("other.safetensors", 0.8) and len(graph) == len(template)
    req = parse(comfy, {"prompt": "x", "lora_strength": 0.3})  # strength alone: the template's LoRA file
    (lora,) = by_type(build_graph(template, req, "p")[0], "WanLoraApply")
    assert (lora["lora"], lora["strength"]) == (LORA, 0.3)
    with pytest.raises(RequestError, match="4-step distill schedule") as e:
        build_graph(template, parse(comfy, {"infer_steps": 5}), "p")
    assert e.value.status == 400
    with pytest.raises(RequestError, match="not found in ComfyUI's loras folder"):
        parse(comfy, {"lora_name": "missing.safetensors"})


def test_random_seed_when_none_and_task_id_named_file(comfy):
    reqs = [parse(comfy, {"prompt": "x"}) for _ in range(6)]
    assert all(0 <= r.seed <= RANDOM_SEED_MAX and not r.seed_given for r in reqs)
    assert len({r.seed for r in reqs}) > 1 and len({r.task_id for r in reqs}) == 6
    for r in reqs:
        assert r.output == f"{r.task_id}.mp4" and r.save_result_path == r.task_id  # LightX2V's default
        assert len(r.task_id) == 24 and r.task_id.count("-") == 4
    r = parse(comfy, {"seed": None, "task_id": "my-task_1"})
    assert r.task_id == "my-task_1" and r.output == "my-task_1.mp4" and not r.seed_given


def test_output_paths_inside_the_output_folder_are_accepted(comfy):
    for given, want in [
        ("./a.mp4", "a.mp4"),
        ("a", "a.mp4"),
        ("sub/dir/b.MP4", "sub/dir/b.MP4"),
        ("sub/../c.mp4", "c.mp4"),
        (os.path.join(comfy.out, "d.mp4"), "d.mp4"),
    ]:
        assert parse(comfy, {"save_result_path": given}).output == want, given
    with pytest.raises(RequestError, match=".mp4 videos only"):
        parse(comfy, {"save_result_path": "x.png"})
    with pytest.raises(RequestError, match="names a folder"):
        parse(comfy, {"save_result_path": "sub/"})


# ---------------------------------------------------------------------------------------------
# validation


@pytest.fixture
def escape(comfy, tmp_path):
    """Things outside ComfyUI's folders a request could try to reach, and symlinks to them."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0")
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "etc", os.path.join(comfy.out, "link"))
    os.symlink(tmp_path / "secret.png", os.path.join(comfy.inp, "link.png"))
    return tmp_path


SAVE_ATTACKS = [
    "../../etc/passwd",
    "../etc/passwd",
    "sub/../../../etc/passwd",
    "/etc/passwd",
    "link/passwd",  # a symlink inside output pointing outside
    "..",
    ".",
    "s3://bucket/x.mp4",
    "..\\..\\x.mp4",
    "x\x00.mp4",
]
IMAGE_ATTACKS = [
    "../../etc/passwd",
    "../secret.png",
    "/etc/passwd",
    "link.png",
    "http://169.254.169.254/latest/meta-data.png",
    "https://example.com/cat.png",
    "file:///etc/passwd",
    "example.png [output]",
]


@pytest.mark.parametrize("path", SAVE_ATTACKS)
def test_save_result_path_traversal_is_refused_and_nothing_written(comfy, service, escape, path):
    before = files_under(escape)
    with pytest.raises(RequestError) as e:
        submit(service, {**POST_PY_BODY, "save_result_path": path})
    assert e.value.status == 400 and "save_result_path" in e.value.detail
    assert comfy.queue == [] and service.all_tasks() == {} and files_under(escape) == before
    if path.startswith(("../", "/", "link")):
        assert "outside ComfyUI's output folder" in e.value.detail


@pytest.mark.parametrize("path", IMAGE_ATTACKS)
def test_image_path_traversal_is_refused_and_nothing_written(comfy, service, escape, path):
    if path == "/etc/passwd":
        path = str(escape / "etc" / "passwd")  # absolute, outside the input folder
    before = files_under(escape)
    with pytest.raises(RequestError) as e:
        submit(service, {**POST_PY_BODY, "image_path": path})
    assert e.value.status == 400 and "image_path" in e.value.detail
    assert comfy.queue == [] and service.all_tasks() == {} and files_under(escape) == before
    if "://" in path:
        assert "URLs are not accepted" in e.value.detail


def test_i2v_image_that_does_not_exist_is_a_400(comfy, service):
    with pytest.raises(RequestError, match="not found in ComfyUI's input folder") as e:
        submit(service, {"prompt": "x", "image_path": "nope.png"})
    assert e.value.status == 400 and comfy.queue == []
    (open(os.path.join(comfy.inp, "notes.png"), "w")).write("not an image")
    with pytest.raises(RequestError, match="not a readable image"):
        submit(service, {"prompt": "x", "image_path": "notes.png"})


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("seed", "42", "seed must be an integer"),
        ("seed", -1, "seed must be in"),
        ("seed", True, "seed must be an integer"),
        ("infer_steps", 2.5, "infer_steps must be an integer"),
        ("infer_steps", 0, "infer_steps must be in"),
        ("target_video_length", 80, "4n+1"),
        ("target_shape", [480], "target_shape must be [height, width]"),
        ("target_shape", "480x832", "target_shape must be [height, width]"),
        ("target_shape", [481, 832], "multiples of 16"),
        ("prompt", 5, "prompt must be a string"),
        ("negative_prompt", ["a"], "negative_prompt must be a string"),
        ("save_result_path", 1, "save_result_path must be a string"),
        ("image_path", {"url": "x"}, "image_path must be a string"),
        ("lora_strength", "1", "lora_strength must be a number"),
        ("task_id", "../x", "task_id must be"),
    ],
)
def test_wrong_types_are_400_with_a_message(comfy, service, field, value, message):
    with pytest.raises(RequestError) as e:
        submit(service, {"prompt": "x", field: value})
    assert e.value.status == 400 and message in e.value.detail
    assert comfy.queue == []


def test_body_must_be_an_object_and_image_tasks_are_refused(service):
    for body in ([1, 2], "prompt", None):
        with pytest.raises(RequestError, match="JSON object"):
            submit(service, body)
    with pytest.raises(RequestError) as e:
        submit(service, {"prompt": "a cat"}, kind="image")
    assert e.value.status == 400 and e.value.detail == IMAGE_TASKS_REFUSED


def test_unknown_fields_are_ignored_with_a_warning(comfy, service, caplog):
    body = {**POST_PY_BODY, "foo": 1, "use_prompt_enhancer": True, "target_fps": 16, "reuse": False}
    with caplog.at_level("WARNING", logger="wan_fast.tasks_api"):
        out = submit(service, body)
    assert out["warnings"] == ["unknown field 'foo' ignored", "use_prompt_enhancer is not supported by this server and was ignored"]  # fmt: skip
    assert "unknown field 'foo' ignored" in caplog.text and len(comfy.queue) == 1
    assert "warnings" not in submit(service, POST_PY_BODY | {"save_result_path": ""})


def test_base64_images_are_decoded_into_the_input_folder(comfy, service):
    raw = base64.b64encode(png_bytes()).decode()  # LightX2V's post_i2v.py sends this
    req = parse(comfy, {"image_path": raw})
    assert req.task == "i2v" and req.image.name == f"tasks_api/{req.task_id}.png" and req.image.data == png_bytes()
    assert files_under(comfy.inp) == set()  # parsing writes nothing
    out = submit(service, {"prompt": "x", "image_path": "data:image/png;base64," + raw})
    assert files_under(comfy.inp) == {f"tasks_api/{out['task_id']}.png"}
    (_, graph), = comfy.queue  # fmt: skip
    assert by_type(graph, "LoadImage")[0]["image"] == f"tasks_api/{out['task_id']}.png"
    with pytest.raises(RequestError, match="not hold valid base64"):
        parse(comfy, {"image_path": "data:image/png;base64,@@@"})
    with pytest.raises(RequestError, match="not a readable image"):
        parse(comfy, {"image_path": base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 30).decode()})
    # rejected by ComfyUI's validation: the image written for it is removed again
    comfy.rejection = "Prompt outputs failed validation"
    with pytest.raises(RequestError, match="failed validation"):
        submit(service, {"prompt": "x", "image_path": raw})
    assert files_under(comfy.inp) == {f"tasks_api/{out['task_id']}.png"}


def test_templates_from_env_and_their_errors(comfy, monkeypatch, tmp_path):
    api = json.load(open(os.path.join(API_DIR, "wan21_t2v_14b_base.json"), encoding="utf-8"))
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(api))
    monkeypatch.setenv("WAN_TASKS_T2V_TEMPLATE", str(mine))
    assert load_template("t2v") == (str(mine), api)
    ui = os.path.join(REPO, "example_workflows", "wan21_t2v_14b_base.json")
    monkeypatch.setenv("WAN_TASKS_T2V_TEMPLATE", ui)
    with pytest.raises(TemplateError, match="UI workflow"):
        load_template("t2v")
    monkeypatch.setenv("WAN_TASKS_T2V_TEMPLATE", "no_such_template")
    with pytest.raises(TemplateError, match="cannot be read"):
        load_template("t2v")
    two = copy.deepcopy(api)
    two["99"] = copy.deepcopy(next(n for n in api.values() if n["class_type"] == "WanSampler"))
    with pytest.raises(TemplateError, match="exactly one sampler"):
        build_graph(two, parse(comfy, {"prompt": "x"}), "p")
    Image.new("RGB", (8, 8)).save(os.path.join(comfy.inp, "a.png"))
    with pytest.raises(TemplateError, match="exactly one image loader"):
        build_graph(api, parse(comfy, {"image_path": "a.png"}), "p")  # a T2V graph as I2V template


# ---------------------------------------------------------------------------------------------
# Wan2.2: the server runs the model its template names (LightX2V's server: the model_cls it was started with)


def _two_expert_template() -> dict:
    """The distill LoRA T2V template turned into the shape of a Wan2.2 A14B one: two loaders, a LoRA
    each, one sampler taking both models. Its class name stands for whichever `Wan*Sampler` the
    ComfyUI nodes give the two experts; the task API must not depend on the name."""
    g = json.load(open(os.path.join(API_DIR, "wan21_t2v_14b_base.json"), encoding="utf-8"))  # one loader
    loader = next(k for k, n in g.items() if n["class_type"] == "WanModelLoader")
    sampler = next(k for k, n in g.items() if n["class_type"] == "WanSampler")
    g["1h"] = copy.deepcopy(g[loader])
    g["1l"] = copy.deepcopy(g[loader])
    for e in ("h", "l"):
        g[f"2{e}"] = {"class_type": "WanLoraApply", "inputs": {"model": [f"1{e}", 0], "lora": LORA, "strength": 1.0}}
    s = g[sampler]
    s["class_type"] = "WanTwoExpertSampler"
    s["inputs"] = {**{k: v for k, v in s["inputs"].items() if k != "model"}, "model_high": ["2h", 0],
                   "model_low": ["2l", 0], "switch": "step", "switch_value": 2}  # fmt: skip
    return g


def test_a_two_expert_template_serves_tasks(comfy, service, tmp_path, monkeypatch):
    mine = tmp_path / "wan22_t2v.json"
    mine.write_text(json.dumps(_two_expert_template()))
    monkeypatch.setenv("WAN_TASKS_T2V_TEMPLATE", str(mine))
    req = parse(comfy, {**POST_PY_BODY, "infer_steps": 6, "target_video_length": 33, "target_shape": [480, 832]})
    graph, _ = build_graph(load_template("t2v")[1], req, "p")
    (smp,) = by_type(graph, "WanTwoExpertSampler")
    assert (smp["seed"], smp["steps"], smp["num_frames"], smp["height"], smp["width"]) == (42, 6, 33, 480, 832)
    assert (smp["model_high"], smp["model_low"], smp["switch_value"]) == (["2h", 0], ["2l", 0], 2)  # untouched
    with pytest.raises(RequestError, match="one per expert") as e:  # which expert's LoRA? not guessed
        build_graph(load_template("t2v")[1], parse(comfy, {"prompt": "x", "lora_name": "other.safetensors"}), "p")
    assert e.value.status == 400
    tid = submit(service, POST_PY_BODY)["task_id"]
    comfy.start()
    assert by_type(comfy.running[1], "WanTwoExpertSampler")[0]["seed"] == 42
    comfy.finish()
    assert service.status(tid)["status"] == "completed"
    assert files_under(comfy.out) == {"cat_boxing_seed42.mp4"}
    two = _two_expert_template()
    two["99"] = copy.deepcopy(two[next(k for k, n in two.items() if n["class_type"] == "WanTwoExpertSampler")])
    with pytest.raises(TemplateError, match="exactly one sampler"):
        build_graph(two, req, "p")


WAN22_EXAMPLES = sorted(f for f in os.listdir(API_DIR) if f.startswith("wan22"))


@pytest.mark.skipif(not WAN22_EXAMPLES, reason="no Wan2.2 API example workflows in example_workflows/api yet")
@pytest.mark.parametrize("name", WAN22_EXAMPLES)
def test_wan22_example_workflows_serve_tasks(comfy, service, monkeypatch, name):
    """Each Wan2.2 example (API format) as the server's template: a LightX2V request reaches its nodes
    and the task completes with its file where asked."""
    graph = json.load(open(os.path.join(API_DIR, name), encoding="utf-8"))
    task = "i2v" if by_type(graph, "LoadImage") else "t2v"
    monkeypatch.setenv(TEMPLATE_ENV[task], name)
    body = {**POST_PY_BODY, "seed": 7, "target_video_length": 33}
    if task == "i2v":
        Image.new("RGB", (40, 24)).save(os.path.join(comfy.inp, "cat.png"))
        body["image_path"] = "cat.png"
    tid = submit(service, body)["task_id"]
    comfy.start()
    queued = comfy.running[1]
    (sampler,) = [n["inputs"] for n in queued.values() if n["class_type"].startswith("Wan") and "Sampler" in n["class_type"]]
    assert sampler["seed"] == 7 and sampler["num_frames"] == 33
    assert by_type(queued, "WanTextEncode")[0]["prompt"] == POST_PY_BODY["prompt"]
    comfy.finish()
    assert service.status(tid)["status"] == "completed" and "cat_boxing_seed42.mp4" in files_under(comfy.out)


# ---------------------------------------------------------------------------------------------
# status mapping


def history(status_str, *messages):
    return {"outputs": {}, "status": {"status_str": status_str, "completed": status_str == "success", "messages": list(messages)}}  # fmt: skip


def test_status_from_queue_and_history():
    assert observe("a", running={"b"}, queued={"a", "c"}, history=None).status == "pending"
    assert observe("a", running={"a"}, queued={"c"}, history=None).status == "processing"
    assert observe("a", running=set(), queued=set(), history=None) is None
    ok = observe("a", set(), set(), history("success", ["execution_start", {"timestamp": 1000}], ["execution_cached", {"timestamp": 1500}], ["execution_success", {"timestamp": 9000}]))  # fmt: skip
    assert (ok.status, ok.error, ok.start_ms, ok.end_ms) == ("completed", None, 1000, 9000)
    err = {"exception_message": "num_frames must be 4n+1\n", "exception_type": "ValueError", "node_id": "14", "node_type": "WanImageEncode", "timestamp": 5}  # fmt: skip
    bad = observe("a", set(), set(), history("error", ["execution_start", {"timestamp": 1}], ["execution_error", err]))
    assert (bad.status, bad.error, bad.error_type) == ("failed", "num_frames must be 4n+1 (node 14 WanImageEncode)", "ValueError")  # fmt: skip
    stop = history("error", ["execution_start", {"timestamp": 1}], ["execution_interrupted", {"timestamp": 2}])
    assert observe("a", set(), set(), stop, cancel_requested=True).error == "Task cancelled by user"
    ui = observe("a", set(), set(), stop)
    assert (ui.status, ui.error) == ("cancelled", "Interrupted in ComfyUI")
    assert observe("a", set(), set(), {"outputs": {}, "status": None}).status == "failed"
    # a history entry wins over a stale queue snapshot
    assert observe("a", running={"a"}, queued=set(), history=history("success")).status == "completed"


# ---------------------------------------------------------------------------------------------
# the service over the fake ComfyUI


def test_lifecycle_pending_processing_completed_and_the_file_lands_where_asked(comfy, service):
    out = submit(service, POST_PY_BODY)
    tid = out["task_id"]
    assert out == {"task_id": tid, "task_status": "pending", "save_result_path": "./cat_boxing_seed42.mp4"}
    st = service.status(tid)
    assert st["status"] == "pending" and st["end_time"] is None and st["save_result_path"] == "./cat_boxing_seed42.mp4"
    assert set(st) == {"task_id", "status", "start_time", "end_time", "error", "error_type", "save_result_path", "seed"}
    assert service.queue_status() == {"is_processing": False, "current_task": None, "pending_count": 1, "active_count": 1, "queue_size": 10, "queue_available": 9}  # fmt: skip
    with pytest.raises(RequestError, match="Task not completed"):
        service.result_file(tid)
    comfy.start()
    assert service.status(tid)["status"] == "processing"
    assert service.queue_status()["current_task"] == tid and service.service_status()["service_status"] == "busy"
    comfy.finish()
    st = service.status(tid)
    assert st["status"] == "completed" and st["save_result_path"] == "cat_boxing_seed42.mp4" and st["error"] is None
    assert st["start_time"].startswith("2023-11-1") and st["end_time"] > st["start_time"]  # ComfyUI's timestamps
    path = service.result_file(tid)
    assert path == os.path.join(os.path.realpath(comfy.out), "cat_boxing_seed42.mp4")
    assert files_under(comfy.out) == {"cat_boxing_seed42.mp4"}  # the numbered file was moved, not copied
    assert open(path, "rb").read().endswith(tid.encode())
    assert service.all_tasks() == {tid: st}
    assert service.service_status() | {} == {"service_status": "idle", "current_task": None, "active_tasks": [], "pending_tasks": 0, "queue_size": 10, "total_tasks": 1, "completed_tasks": 1, "failed_tasks": 0}  # fmt: skip
    with pytest.raises(RequestError, match="Task not found"):
        service.result_file("nope")


def test_subfolder_target_and_default_name(comfy, service):
    a = submit(service, {"prompt": "x", "save_result_path": "runs/day1/a"})["task_id"]
    b = submit(service, {"prompt": "y"})["task_id"]
    for _ in range(2):
        comfy.start()
        comfy.finish()
    assert service.status(a)["save_result_path"] == "runs/day1/a.mp4"
    assert service.status(b)["save_result_path"] == f"{b}.mp4"
    assert files_under(comfy.out) == {"runs/day1/a.mp4", f"{b}.mp4"}


def test_cancel_pending_and_running(comfy, service):
    a, b = (submit(service, {"prompt": p})["task_id"] for p in ("a", "b"))
    comfy.start()  # a runs, b waits
    assert asyncio.run(service.cancel(b)) == {"stop_status": "success", "reason": "Task stopped successfully."}
    assert comfy.queue == [] and service.status(b)["status"] == "cancelled"
    assert service.status(b)["error"] == "Task cancelled by user" and b not in comfy.hist  # never ran
    assert asyncio.run(service.cancel(a))["stop_status"] == "success"
    assert comfy.interrupted == [a] and service.status(a)["status"] == "cancelled"
    assert service.status(a)["error"] == "Task cancelled by user"
    assert asyncio.run(service.cancel(a))["stop_status"] == "do_nothing"
    assert asyncio.run(service.cancel("unknown")) == {"stop_status": "do_nothing", "reason": "Task not found or already completed."}  # fmt: skip
    assert files_under(comfy.out) == set()


def test_cancel_all_and_a_prompt_deleted_in_the_ui(comfy, service):
    ids = [submit(service, {"prompt": str(i)})["task_id"] for i in range(3)]
    comfy.start()
    comfy.queue.pop()  # the last one deleted from ComfyUI's queue by someone else
    st = service.status(ids[2])
    assert (st["status"], st["error"]) == ("cancelled", "Task removed from ComfyUI's queue")
    assert asyncio.run(service.cancel_all())["stop_status"] == "success"
    assert [service.status(t)["status"] for t in ids] == ["cancelled"] * 3 and comfy.interrupted == [ids[0]]


def test_failed_task_reports_the_error(comfy, service):
    tid = submit(service, {"prompt": "x"})["task_id"]
    comfy.start()
    comfy.finish(error="out of memory")
    st = service.status(tid)
    assert (st["status"], st["error"], st["error_type"]) == ("failed", "out of memory (node 11 WanSampler)", "ValueError")
    assert service.service_status()["failed_tasks"] == 1


def test_queue_limit_and_duplicate_ids_are_503(comfy):
    service = TaskService(comfy, max_queue_size=2)
    submit(service, {"prompt": "1", "task_id": "one"})
    with pytest.raises(RequestError, match="Task ID one already exists") as e:
        submit(service, {"prompt": "1", "task_id": "one"})
    assert e.value.status == 503
    submit(service, {"prompt": "2"})
    with pytest.raises(RequestError, match=r"Task queue is full \(max 2 tasks\)") as e:
        submit(service, {"prompt": "3"})
    assert e.value.status == 503 and len(comfy.queue) == 2


def test_watcher_moves_the_video_without_anyone_polling(comfy, service):
    tid = submit(service, POST_PY_BODY)["task_id"]
    service.start_watcher(interval=0.01)
    comfy.start()
    comfy.finish()
    end = time.time() + 10
    while not os.path.exists(os.path.join(comfy.out, "cat_boxing_seed42.mp4")):
        assert time.time() < end, files_under(comfy.out)
        time.sleep(0.02)
    assert service._tasks[tid].status == "completed"


def test_importing_the_pack_outside_comfyui_adds_nothing(tmp_path):
    """No `server` module (or one without a PromptServer instance): no routes, no aiohttp, no thread."""
    pack = tmp_path / "custom_nodes" / "comfyui-wan-fast"
    pack.parent.mkdir()
    os.symlink(REPO, pack)
    code = (
        "import importlib.util, sys, os, threading, types\n"
        "fake = types.ModuleType('server'); fake.PromptServer = type('PromptServer', (), {'instance': None})\n"
        "sys.modules['server'] = fake\n"
        f"path = {str(pack)!r}\n"
        "spec = importlib.util.spec_from_file_location('pack', os.path.join(path, '__init__.py'))\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)\n"
        "print(sorted(m for m in sys.modules if 'tasks_api' in m or m == 'aiohttp'),\n"
        "      [t.name for t in threading.enumerate() if t.name == 'wan-tasks-api'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] []"


def test_importing_the_pack_inside_comfyui_registers_the_routes_once(tmp_path):
    """With a PromptServer instance (stand-ins for ComfyUI's modules and aiohttp): every route, in an order
    where fixed paths come before `{task_id}` ones, added to ComfyUI's route table, once."""
    pack = tmp_path / "custom_nodes" / "comfyui-wan-fast"
    pack.parent.mkdir()
    os.symlink(REPO, pack)
    code = (
        "import importlib.util, sys, os, types\n"
        "class Table(list):\n"
        "    def route(self, method, path):\n"
        "        return lambda handler: self.append(types.SimpleNamespace(method=method, path=path))\n"
        "class Queue: pass\n"
        "srv = types.SimpleNamespace(routes=Table(), prompt_queue=Queue(), number=0)\n"
        "for name in ('server', 'aiohttp', 'folder_paths', 'execution'):\n"
        "    sys.modules[name] = types.ModuleType(name)\n"
        "sys.modules['server'].PromptServer = type('PromptServer', (), {'instance': srv})\n"
        "sys.modules['aiohttp'].web = types.SimpleNamespace(Request=object, Response=object, StreamResponse=object)\n"
        f"path = {str(pack)!r}\n"
        "for n in ('pack', 'pack_again'):\n"
        "    spec = importlib.util.spec_from_file_location(n, os.path.join(path, '__init__.py'))\n"
        "    mod = importlib.util.module_from_spec(spec); sys.modules[n] = mod; spec.loader.exec_module(mod)\n"
        "print([f'{r.method} {r.path}' for r in srv.routes])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    routes = eval(out.stdout.strip().splitlines()[-1])
    assert len(routes) == len(set(routes)) == 13, routes  # the second import added nothing
    for want in ["POST /v1/tasks/video/", "POST /v1/tasks/image/", "POST /v1/tasks/", "GET /v1/tasks/",
                 "GET /v1/tasks/{task_id}/status", "GET /v1/tasks/{task_id}/result", "DELETE /v1/tasks/{task_id}"]:  # fmt: skip
        assert want in routes
    assert routes.index("GET /v1/tasks/queue/status") < routes.index("GET /v1/tasks/{task_id}/status")
    assert routes.index("DELETE /v1/tasks/all/running") < routes.index("DELETE /v1/tasks/{task_id}")
