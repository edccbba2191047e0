"""The LightX2V-compatible task API inside a real ComfyUI (marker `comfyui`; see test_comfyui_real.py).

The ComfyUI of test_comfyui_real's `server` fixture (tiny random models under the workflows' file
names), started with WAN_TASKS_T2V_TEMPLATE / WAN_TASKS_I2V_TEMPLATE pointing at the default
templates cut down to tiny sizes (64x48, 5 frames, 2 steps) so that each task takes seconds.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.request

import pytest

from tasks_api.workflow import TEMPLATE_ENV
from tests.comfyui_helpers import load_api, reduce_api
from tests.test_comfyui_real import server  # noqa: F401  (the module's ComfyUI, a fixture)
from tests.test_tasks_api import POST_PY_BODY

pytestmark = pytest.mark.comfyui


class Api:
    def __init__(self, srv):
        self.srv, self.url = srv, srv.url

    def call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                raw, status, ctype = r.read(), r.status, r.headers.get_content_type()
        except urllib.error.HTTPError as e:
            raw, status, ctype = e.read(), e.code, e.headers.get_content_type()
        return status, (json.loads(raw) if ctype == "application/json" else raw)

    def submit(self, body: dict, path: str = "/v1/tasks/video/") -> str:
        status, out = self.call("POST", path, body)
        assert status == 200, out
        assert out["task_status"] == "pending"
        return out["task_id"]

    def status(self, task_id: str) -> dict:
        code, st = self.call("GET", f"/v1/tasks/{task_id}/status")
        assert code == 200, st
        return st

    def wait(self, task_id: str, until=("completed", "failed", "cancelled"), timeout: float = 300) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            st = self.status(task_id)
            if st["status"] in until:
                return st
            if self.srv.proc.poll() is not None:
                raise RuntimeError("ComfyUI exited:\n" + self.srv.log()[-3000:])
            time.sleep(0.1)
        raise TimeoutError(f"task {task_id} still {st['status']} after {timeout} s:\n" + self.srv.log()[-3000:])

    def completed(self, task_id: str) -> dict:
        st = self.wait(task_id)
        assert st["status"] == "completed", f"{st}\n{self.srv.log()[-3000:]}"
        return st


@pytest.fixture(scope="module")
def api(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("task_templates")
    env = {}
    for task, name in (("t2v", "wan21_t2v_14b_base"), ("i2v", "wan21_i2v_480p_base")):
        path = tmp / f"{task}.json"
        path.write_text(json.dumps(reduce_api(load_api(name))))
        env[TEMPLATE_ENV[task]] = str(path)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by the ComfyUI process the fixture starts
    try:
        srv = request.getfixturevalue("server")
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return Api(srv)


def test_routes_are_on_comfyuis_server(api):
    assert "LightX2V-compatible task API" in api.srv.log()
    for prefix in ("", "/api"):
        code, q = api.call("GET", prefix + "/v1/tasks/queue/status")
        assert code == 200 and set(q) == {"is_processing", "current_task", "pending_count", "active_count", "queue_size", "queue_available"}  # fmt: skip
    assert api.call("GET", "/v1/tasks/NOPE/status") == (404, {"detail": "Task not found"})
    assert api.call("GET", "/v1/service/status")[1]["service_status"] in ("idle", "busy")


def test_post_py_body_produces_a_video(api):
    code, out = api.call("POST", "/v1/tasks/video/", POST_PY_BODY)  # exactly what post.py sends
    assert code == 200 and out["save_result_path"] == "./cat_boxing_seed42.mp4" and out["task_status"] == "pending"
    tid = out["task_id"]
    st = api.completed(tid)
    assert st["save_result_path"] == "cat_boxing_seed42.mp4" and st["seed"] == 42 and st["end_time"]
    path = os.path.join(api.srv.base, "output", "cat_boxing_seed42.mp4")
    data = open(path, "rb").read()
    assert data[4:8] == b"ftyp" and len(data) > 1000
    code, body = api.call("GET", f"/v1/tasks/{tid}/result")
    assert code == 200 and body == data
    hist = api.srv.get(f"/history/{tid}")  # an ordinary ComfyUI prompt under the task's id
    assert hist[tid]["status"]["status_str"] == "success"
    assert tid in api.call("GET", "/v1/tasks/")[1]
    assert not [f for f in os.listdir(os.path.join(api.srv.base, "output")) if f.startswith(tid)]  # moved


def test_status_moves_pending_processing_completed(api):
    first = api.submit({"prompt": "keeps ComfyUI busy", "infer_steps": 8, "seed": 1})  # ~0.5 s a step here
    tid = api.submit({"prompt": "a fox", "infer_steps": 4})
    seen = []
    end = time.time() + 300
    while not seen or seen[-1] not in ("completed", "failed", "cancelled"):
        assert time.time() < end, seen
        st = api.status(tid)["status"]
        if not seen or seen[-1] != st:
            seen.append(st)
            if st == "pending":
                q = api.call("GET", "/v1/tasks/queue/status")[1]
                assert q["pending_count"] >= 1 and q["active_count"] >= 2 and q["is_processing"]
        time.sleep(0.05)
    assert seen == ["pending", "processing", "completed"], seen
    assert api.status(first)["status"] == "completed"
    st = api.status(tid)
    assert st["save_result_path"] == f"{tid}.mp4" and 0 <= st["seed"] < 2**32  # random seed, task-id-named file
    assert os.path.getsize(os.path.join(api.srv.base, "output", f"{tid}.mp4")) > 0


def test_cancel_pending_and_running(api):
    running = api.submit({"prompt": "a very long run", "infer_steps": 1000, "save_result_path": "cancel/run.mp4"})
    waiting = api.submit({"prompt": "never runs", "save_result_path": "cancel/wait.mp4"})
    api.wait(running, until=("processing",), timeout=120)
    assert api.status(waiting)["status"] == "pending"
    assert api.call("DELETE", f"/v1/tasks/{waiting}") == (200, {"stop_status": "success", "reason": "Task stopped successfully."})  # fmt: skip
    assert api.status(waiting)["status"] == "cancelled"
    time.sleep(2)  # well into the sampling loop
    t0 = time.time()
    code, out = api.call("DELETE", f"/v1/tasks/{running}")
    assert code == 200 and out["stop_status"] == "success", out
    st = api.wait(running, timeout=60)
    assert st["status"] == "cancelled" and st["error"] == "Task cancelled by user" and time.time() - t0 < 30
    hist = api.srv.get(f"/history/{running}")[running]
    assert "execution_interrupted" in [m[0] for m in hist["status"]["messages"]]
    assert api.srv.get(f"/history/{waiting}") == {}  # removed from the queue: it never ran
    assert api.call("DELETE", f"/v1/tasks/{running}")[1]["stop_status"] == "do_nothing"
    assert not os.path.exists(os.path.join(api.srv.base, "output", "cancel"))
    assert api.call("GET", f"/v1/tasks/{running}/result") == (404, {"detail": "Task not completed"})


def test_request_fields_reach_the_video(api):
    """target_shape, target_video_length, infer_steps and an added LoRA, seen in ComfyUI's graph and the mp4."""
    av = pytest.importorskip("av")
    lora = "wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors"
    body = {"prompt": "a boat", "target_shape": [32, 48], "target_video_length": 9, "infer_steps": 1,
            "lora_name": lora, "lora_strength": 0.5, "save_result_path": "fields/boat", "seed": 3}  # fmt: skip
    tid = api.submit(body)
    assert api.completed(tid)["save_result_path"] == "fields/boat.mp4"
    graph = api.srv.get(f"/history/{tid}")[tid]["prompt"][2]
    (smp,) = [n["inputs"] for n in graph.values() if n["class_type"] == "WanSampler"]
    (lo,) = [n["inputs"] for n in graph.values() if n["class_type"] == "WanLoraApply"]
    assert (smp["steps"], smp["seed"], lo["lora"], lo["strength"]) == (1, 3, lora, 0.5)
    with av.open(os.path.join(api.srv.base, "output", "fields", "boat.mp4")) as c:
        frames = [f for f in c.decode(video=0)]
    assert len(frames) == 9 and (frames[0].height, frames[0].width) == (32, 48)


def _files_outside_output(root: str) -> set[str]:
    skip = {"output", "user", "temp", "ComfyUI", "__pycache__"}
    out = set()
    for d, dirs, fs in os.walk(root):
        dirs[:] = [x for x in dirs if x not in skip]
        out |= {os.path.relpath(os.path.join(d, f), root) for f in fs if not f.endswith(".log")}
    return out


def test_traversal_is_refused_and_nothing_is_written(api):
    tmp = os.path.dirname(api.srv.base)  # holds base/ (input, output, models) and the ComfyUI copy
    os.makedirs(os.path.join(tmp, "etc"), exist_ok=True)
    with open(os.path.join(tmp, "etc", "passwd"), "w") as f:  # what ../../etc/passwd reaches from output/ or input/
        f.write("root:x:0:0:root:/root:/bin/bash\n")
    outside = os.path.join(tmp, "outside", "x.mp4")
    before_files, before_tasks = _files_outside_output(tmp), api.call("GET", "/v1/tasks/")[1]
    before_hist = len(api.srv.get("/history"))
    for field, value in [
        ("save_result_path", "../../etc/passwd"),
        ("save_result_path", outside),
        ("save_result_path", "a/../../../etc/passwd"),
        ("image_path", "../../etc/passwd"),
        ("image_path", os.path.join(tmp, "etc", "passwd")),
        ("image_path", "http://127.0.0.1:1/cat.png"),
    ]:
        code, out = api.call("POST", "/v1/tasks/video/", {**POST_PY_BODY, field: value})
        assert code == 400 and field in out["detail"], (field, value, out)
    assert _files_outside_output(tmp) == before_files
    assert api.call("GET", "/v1/tasks/")[1] == before_tasks and len(api.srv.get("/history")) == before_hist
    q = api.srv.get("/queue")
    assert q["queue_pending"] == [] and q["queue_running"] == []
    assert open(os.path.join(tmp, "etc", "passwd")).read().startswith("root:x:0:0")


def test_bad_requests_are_400(api):
    code, out = api.call("POST", "/v1/tasks/video/", {"prompt": "a cat", "image_path": "no_such_image.png"})
    assert code == 400 and "not found in ComfyUI's input folder" in out["detail"]
    code, out = api.call("POST", "/v1/tasks/video/", {"prompt": "a cat", "seed": "forty-two"})
    assert code == 400 and out["detail"].startswith("seed must be an integer")
    code, out = api.call("POST", "/v1/tasks/image/", {"prompt": "a cat", "aspect_ratio": "16:9"})
    assert code == 400 and "image tasks are not supported" in out["detail"]
    req = urllib.request.Request(api.url + "/v1/tasks/video/", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400


def test_i2v_base64_image_through_the_deprecated_alias(api):
    """LightX2V's post_i2v.py: POST /v1/tasks/ with the image base64-encoded."""
    with open(os.path.join(api.srv.base, "input", "example.png"), "rb") as f:
        image = base64.b64encode(f.read()).decode()
    tid = api.submit({"prompt": "the scene comes alive", "negative_prompt": "", "image_path": image}, "/v1/tasks/")
    api.completed(tid)
    assert os.path.isfile(os.path.join(api.srv.base, "input", "tasks_api", f"{tid}.png"))
    assert os.path.getsize(os.path.join(api.srv.base, "output", f"{tid}.mp4")) > 0
    graph = api.srv.get(f"/history/{tid}")[tid]["prompt"][2]
    assert [n["inputs"]["image"] for n in graph.values() if n["class_type"] == "LoadImage"] == [f"tasks_api/{tid}.png"]


# LightX2V's own client scripts, unchanged: only their fixed http://localhost:8000 is redirected
# to this server, and loguru (absent here) is stood in for by logging.
CLIENT_RUNNER = r"""
import logging, runpy, sys, types
import requests
base, script = sys.argv[1], sys.argv[2]
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
loguru = types.ModuleType("loguru")
loguru.logger = logging.getLogger("client")
sys.modules.setdefault("loguru", loguru)
_request = requests.Session.request
def request(self, method, url, *args, **kwargs):
    return _request(self, method, url.replace("http://localhost:8000", base), *args, **kwargs)
requests.Session.request = request
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.skipif(not os.environ.get("LIGHTX2V_DIR"), reason="set LIGHTX2V_DIR to a LightX2V checkout")
def test_lightx2v_client_scripts_run_unchanged(api, tmp_path):
    import re
    import subprocess
    import sys

    pytest.importorskip("requests")
    root = os.environ["LIGHTX2V_DIR"]
    runner = tmp_path / "run_client.py"
    runner.write_text(CLIENT_RUNNER)

    def run(script: str) -> str:
        out = subprocess.run([sys.executable, str(runner), api.url, os.path.join(root, "scripts", "server", script)],
                             cwd=root, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        return out.stdout

    for script, name in (("post.py", "cat_boxing_seed42.mp4"), ("post_i2v.py", None)):
        log = run(script)
        (tid,) = re.findall(r"response: \{'task_id': '([\w-]+)', 'task_status': 'pending'", log)
        st = api.completed(tid)
        assert st["save_result_path"] == (name or f"{tid}.mp4")
        assert os.path.getsize(os.path.join(api.srv.base, "output", st["save_result_path"])) > 0
    log = run("check_status.py")
    assert "'service_status': 'idle'" in log and "'detail': 'Task not found'" in log
