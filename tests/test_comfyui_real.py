"""The pack inside a real ComfyUI (marker `comfyui`; opt in with `python -m pytest -m comfyui`).

Needs COMFYUI_DIR: a ComfyUI checkout (left untouched: it is copied to a temporary folder), and
COMFYUI_PYTHON: the Python of an environment with ComfyUI's requirements (default: this one).
comfy-cli is used when COMFY_CLI (or `comfy` beside COMFYUI_PYTHON) exists.

ComfyUI runs on the CPU on loopback with `--base-directory` pointing at a temporary folder whose
models/ holds tiny random models under the example workflows' file names and whose
custom_nodes/ links this repository. The tests: the pack imports without errors, /object_info
lists every node, the templates and the front-end extension are served, each API workflow
(sizes reduced) posted to /prompt finishes with its mp4 in /history, /interrupt stops a long
run, `comfy run --workflow <api json> --wait` finishes against the same server, and our models
live under ComfyUI's model management (`POST /free` releases them; a core node that loads a model
after our sampler runs in the same graph). Wan2.2 specifics (UI workflows read through /object_info,
the two experts in ComfyUI's accounting): tests/test_comfyui_wan22.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

from nodes import NODE_CLASS_MAPPINGS
from tests.comfyui_helpers import (
    REPO,
    SAMPLERS,
    WORKFLOW_NAMES,
    load_api,
    populate_models,
    reduce_api,
    write_core_wan_vae,
)

pytestmark = pytest.mark.comfyui
PACK = "comfyui-wan-fast"
NOT_YET = "not available yet"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, base: str, proc: subprocess.Popen, log: str, python: str):
        self.url, self.base, self.proc, self.log_path, self.python = url, base, proc, log, python
        self.missing: dict[str, str] = {}

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            body = r.read()
            return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def post(self, path: str, data: dict | None = None):
        req = urllib.request.Request(self.url + path, data=json.dumps(data or {}).encode(), method="POST")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_history(self, prompt_id: str, timeout: float = 300) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                raise RuntimeError("ComfyUI exited:\n" + self.log()[-3000:])
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n" + self.log()[-3000:])

    def queue(self, graph: dict) -> str:
        status, body = self.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
        assert status == 200, f"/prompt refused the workflow: {json.dumps(body)[:2000]}"
        return body["prompt_id"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    src = os.environ.get("COMFYUI_DIR")
    if not src or not os.path.isfile(os.path.join(src, "main.py")):
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    tmp = tmp_path_factory.mktemp("comfyui_real")
    app = str(tmp / "ComfyUI")
    shutil.copytree(src, app, ignore=shutil.ignore_patterns(".git", "__pycache__"))  # the checkout stays untouched
    base = tmp / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "user").mkdir()
    os.symlink(REPO, base / "custom_nodes" / PACK)
    _, missing = populate_models(str(base / "models"), str(tmp / "scratch"))
    port = _free_port()
    log = str(tmp / "comfyui.log")
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
           "--disable-auto-launch", "--preview-method", "auto"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=app, stdout=out, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"http://127.0.0.1:{port}", str(base), proc, log, python)
    srv.missing = missing
    try:
        end = time.time() + 300
        while True:
            try:
                srv.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.time() > end:
                    raise RuntimeError("ComfyUI did not start:\n" + srv.log()[-4000:]) from None
                time.sleep(1)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(f"\n--- ComfyUI log tail ({log}) ---\n" + srv.log()[-1500:])


def test_pack_imports_without_errors(server):
    log = server.log()
    assert f"custom_nodes/{PACK}" in log, "ComfyUI did not load the pack"
    lines = [line for line in log.splitlines() if PACK in line]
    assert not any("IMPORT FAILED" in line or "Cannot import" in line for line in lines), "\n".join(lines)


def test_object_info_lists_every_node(server):
    info = server.get("/object_info")
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert name in info, f"/object_info lacks {name}"
        want = cls.INPUT_TYPES()
        assert list(info[name]["input"]["required"]) == list(want["required"])
        assert list(info[name]["output"]) == list(cls.RETURN_TYPES)
        assert info[name]["python_module"].endswith(PACK)
    # the model folders are ComfyUI's: the loader lists the files put there
    dits = info["WanModelLoader"]["input"]["required"]["dit"][0]
    assert "wan2.1_t2v_14B_bf16.safetensors" in dits and "wan2.1_i2v_720p_14B_bf16.safetensors" in dits
    assert (
        "wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors" in info["WanLoraApply"]["input"]["required"]["lora"][0]
    )


def test_templates_and_extension_are_served(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates[PACK]) == WORKFLOW_NAMES  # the UI workflows only, not the api/ twins
    ui = server.get(f"/api/workflow_templates/{PACK}/{WORKFLOW_NAMES[0]}.json")
    ui = json.loads(ui) if isinstance(ui, bytes) else ui
    assert ui["nodes"] and ui["links"]
    extensions = server.get("/extensions")
    js = f"/extensions/{PACK}/wan_fast.js"
    assert js in extensions and f"/extensions/{PACK}/wan_presets.js" in extensions
    assert b"registerExtension" in server.get(js)


def _queue_reduced(server, name: str):
    graph = reduce_api(load_api(name), prefix=f"real/{name}")
    files = {
        v for n in graph.values() for v in n["inputs"].values() if isinstance(v, str) and v.endswith(".safetensors")
    }
    if files & set(server.missing):
        pytest.skip(f"{name}: tiny file not made: {server.missing[sorted(files & set(server.missing))[0]]}")
    return graph, server.queue(graph)


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_api_workflow_runs_in_comfyui(server, name):
    graph, prompt_id = _queue_reduced(server, name)
    entry = server.wait_history(prompt_id)
    status = entry["status"]
    if status["status_str"] == "error":
        err = next((m[1] for m in status["messages"] if m[0] == "execution_error"), {})
        if NOT_YET in err.get("exception_message", ""):
            pytest.skip(f"{name}: {err['exception_message'].strip()}")
        pytest.fail(f"{name} failed in ComfyUI: {json.dumps(err)[:3000]}")
    save = next(k for k, n in graph.items() if n["class_type"] == "WanSaveVideo")
    (video,) = entry["outputs"][save]["images"]
    path = os.path.join(server.base, "output", video["subfolder"], video["filename"])
    assert video["filename"].endswith(".mp4") and os.path.getsize(path) > 0
    sampler = next(k for k, n in graph.items() if n["class_type"] in SAMPLERS)
    stages = [r["stage"] for r in entry["outputs"][sampler]["wan_timing"]]
    assert stages == (["multi-GPU sample"] if "multigpu" in name else ["load DiT", "sample"])


def test_interrupt_stops_a_long_run(server):
    graph = reduce_api(load_api("wan21_t2v_14b_base"), prefix="real/interrupted")
    sampler = next(k for k, n in graph.items() if n["class_type"] == "WanSampler")
    graph[sampler]["inputs"].update(steps=1000, seed=12345)  # minutes of work if not stopped
    prompt_id = server.queue(graph)
    end = time.time() + 120
    while not any(p[1] == prompt_id for p in server.get("/queue")["queue_running"]):
        assert time.time() < end, "the long run never started"
        time.sleep(0.2)
    time.sleep(3)  # let it get into the sampling loop
    t0 = time.time()
    assert server.post("/interrupt")[0] == 200
    entry = server.wait_history(prompt_id, timeout=60)
    assert time.time() - t0 < 30, "the run did not stop between two steps"
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in kinds, kinds


def test_comfy_cli_run_wait(server, tmp_path):
    cli = os.environ.get("COMFY_CLI") or os.path.join(os.path.dirname(server.python), "comfy")
    if not os.path.isfile(cli):
        pytest.skip("comfy-cli not installed (pip install comfy-cli beside ComfyUI, or set COMFY_CLI)")
    graph = reduce_api(load_api("wan21_t2v_14b_distill_merged"), prefix="real/comfy_cli")
    wf = tmp_path / "workflow_api.json"
    wf.write_text(json.dumps(graph))
    host, port = server.url.removeprefix("http://").split(":")
    env = {**os.environ, "COMFY_NO_WATCH": "1", "DO_NOT_TRACK": "1", "HOME": str(tmp_path)}
    cmd = [
        cli,
        "--skip-prompt",
        "run",
        "--workflow",
        str(wf),
        "--wait",
        "--host",
        host,
        "--port",
        port,
        "--timeout",
        "300",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    saved = [
        f for _, _, fs in os.walk(os.path.join(server.base, "output", "real")) for f in fs if f.startswith("comfy_cli")
    ]
    assert saved, out.stdout[-2000:]


def _memory(server) -> dict:
    return server.get("/wan_fast/memory")


def _ok(server, graph: dict) -> dict:
    entry = server.wait_history(server.queue(graph))
    status = entry["status"]
    if status["status_str"] == "error":
        err = next((m[1] for m in status["messages"] if m[0] == "execution_error"), {})
        pytest.fail(f"run failed in ComfyUI: {json.dumps(err)[:3000]}")
    return entry


def test_free_releases_our_models_and_a_core_node_follows_our_sampler(server):
    """Our parts are in ComfyUI's `current_loaded_models`; POST /free {"unload_models": true}
    empties our cache and ComfyUI's list of them; the next run reloads them, and a core VAE decode
    (core VAELoader + VAEDecode: `load_models_gpu` with our models listed) after our sampler in
    the same graph completes."""
    graph = reduce_api(load_api("wan21_t2v_14b_distill_merged"), prefix="real/memory")
    _ok(server, graph)
    mem = _memory(server)
    assert {"dit", "t5", "vae"} <= set(mem["parts"]) and mem["parts"]["dit"]["cpu"] > 0, mem
    assert {"dit", "t5", "vae"} <= set(mem["tracked"]), mem  # ComfyUI's accounting lists them
    assert {m["part"] for m in mem["comfyui"]} >= {"dit", "t5", "vae"}

    assert server.post("/free", {"unload_models": True})[0] == 200
    end = time.time() + 60
    while _memory(server)["parts"]:  # handled by ComfyUI's worker loop between prompts
        assert time.time() < end, f"/free left our models loaded: {_memory(server)}"
        time.sleep(0.5)
    mem = _memory(server)
    assert mem["tracked"] == [] and not any(m["part"] for m in mem["comfyui"]), mem

    write_core_wan_vae(os.path.join(server.base, "models", "vae", "core_wan_2.1_vae.safetensors"))
    sampler = next(k for k, n in graph.items() if n["class_type"] == "WanSampler")
    graph[sampler]["inputs"]["seed"] += 1  # a new run of the sampler (its cached output is not reused)
    graph["90"] = {"class_type": "VAELoader", "inputs": {"vae_name": "core_wan_2.1_vae.safetensors"}}
    graph["91"] = {"class_type": "VAEDecode", "inputs": {"samples": [sampler, 0], "vae": ["90", 0]}}
    graph["92"] = {"class_type": "PreviewImage", "inputs": {"images": ["91", 0]}}
    entry = _ok(server, graph)
    assert entry["outputs"]["92"]["images"], "the core VAE decode after our sampler gave no image"
    mem = _memory(server)
    assert "dit" in mem["parts"] and "dit" in mem["tracked"], mem  # reloaded by the second run
    assert any(m["part"] is None for m in mem["comfyui"]), mem  # the core VAE is listed beside ours
