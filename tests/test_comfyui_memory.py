"""nodes/memory.py against ComfyUI's own `comfy.model_management`, in one process (marker
`comfyui`; needs COMFYUI_DIR, and COMFYUI_PYTHON for an environment with ComfyUI's requirements).

What the server test (tests/test_comfyui_real.py) cannot reach from outside: a model used again
is re-entered by `load_models_gpu` without a second entry; a memory request while our sampler
holds the DiT takes ComfyUI's entry but leaves the weights until the lease ends (then they go,
with no "memory leak" warning from ComfyUI's dead-model check); the next lease reloads it and is
listed again. The checkout is only read (no bytecode written into it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.comfyui_helpers import REPO
from wan_core.loading.tiny import write_tiny_model

pytestmark = pytest.mark.comfyui

SCRIPT = r"""
import gc, json, logging, sys
import torch
sys.path.append(sys.argv[1])  # ComfyUI after the repository: its `nodes` module must not shadow ours
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_management as mm
from nodes import memory
from wan_core import model_cache
from wan_core.loading.discover import find_model_files
from wan_core.spec import ModelSpec

assert memory.install(mm)
f = find_model_files(sys.argv[2], "t2v")
spec = ModelSpec(dit=f.dit, t5=f.t5, tokenizer=f.tokenizer, vae=f.vae, task="t2v", dtype="fp32", device="cpu")

def forward(dit):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 2, 4, 6, generator=g), [torch.randn(7, 32, generator=g)]
    with torch.no_grad():
        return dit(x, torch.tensor([700.0]), ctx)

out = {}
with model_cache.lease(spec) as dit:
    want = forward(dit)
model_cache.build_vae(spec)
out["tracked"] = memory.tracked_parts()
out["sizes"] = {m.model.part: m.model_memory() for m in mm.current_loaded_models}
mm.load_models_gpu([memory._PATCHERS["dit"]])  # the DiT used again
out["entries_after_reentry"] = [m.model.part for m in mm.current_loaded_models]
with model_cache.lease(spec) as dit:
    ref = __import__("weakref").ref(dit)
    mm.free_memory(1e30, mm.get_torch_device())  # another model asks for everything mid-run
    out["during_cached"] = sorted(model_cache.memory_report())
    out["during_tracked"] = memory.tracked_parts()
    out["during_same"] = bool(torch.equal(forward(dit), want))
    del dit
gc.collect()
out["after_cached"] = sorted(model_cache.memory_report())
out["after_entries"] = len(mm.current_loaded_models)
out["freed"] = ref() is None
mm.cleanup_models_gc()
with model_cache.lease(spec) as dit:
    out["reloaded_same"] = bool(torch.equal(forward(dit), want))
out["reloaded_tracked"] = memory.tracked_parts()
del dit  # nothing holds our parts now: evicting them frees them at once, inside ComfyUI's unload loop
model_cache.build_vae(spec)
gc.collect()
mm.unload_all_models()
out["final"] = [sorted(model_cache.memory_report()), memory.tracked_parts(), len(mm.current_loaded_models)]
print("RESULT " + json.dumps(out))
"""


def test_our_parts_under_comfyui_model_management(tmp_path):
    src = os.environ.get("COMFYUI_DIR")
    if not src or not os.path.isfile(os.path.join(src, "comfy", "model_management.py")):
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    root = write_tiny_model(tmp_path / "tiny", "t2v", "wan", seed=5)  # here: the tiny T5 is built with transformers
    run = subprocess.run([python, "-c", SCRIPT, src, root], capture_output=True, text=True,
                         timeout=600, cwd=str(tmp_path), env=env)  # fmt: skip
    log = run.stdout[-3000:] + run.stderr[-3000:]
    assert run.returncode == 0, log
    out = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["tracked"] == ["dit", "vae"], out
    assert out["sizes"]["dit"] > 0 and out["sizes"]["vae"] > 0
    assert sorted(out["entries_after_reentry"]) == ["dit", "vae"], out  # no second entry
    assert out["entries_after_reentry"][0] == "dit"  # and it moved to the front (most recently used)
    # mid-run: ComfyUI's entry goes, the sampler's weights stay and still give the same output
    assert out["during_cached"] == ["dit"] and out["during_tracked"] == [] and out["during_same"], out
    assert out["after_cached"] == [] and out["after_entries"] == 0 and out["freed"], out
    assert out["reloaded_same"] and out["reloaded_tracked"] == ["dit"], out
    assert out["final"] == [[], [], 0], out
    assert "memory leak" not in run.stderr, log
