"""Core text conditioning into our sampler, inside a real ComfyUI (marker `comfyui`; COMFYUI_DIR as
tests/test_comfyui_real.py).

One graph posted to /prompt: ComfyUI's own `CLIPTextEncode` (real tokenizer from the file's
`spiece_model`, real umT5, its 512-token padding and mask) feeds our WanSampler's positive /
negative CONDITIONING inputs (so ComfyUI's link validation accepts the socket too), beside our
WanTextEncode -> WanSampler on the same weights; core `SaveLatent` writes both latents.

The one stand-in: core `CLIPLoader` (type wan) always builds the full umT5-XXL (its config file
fixes 4096 wide, 24 layers, a 256k vocabulary: 5.7B parameters) and detects the file by block 23,
so a tiny umT5 cannot go through it. A one-file test custom node, `TinyWanCLIPLoader`, builds the
CLIP object the way `comfy.sd.load_text_encoder_state_dicts` does for CLIPType.WAN (same model
class, tokenizer class and `spiece_model` tokenizer data), passing the tiny dimensions through
ComfyUI's own `umt5xxl_model_config` model option. Everything downstream is core code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error

import pytest
import torch

from tests.comfyui_helpers import REPO
from tests.test_comfyui_real import PACK, Server, _free_port

pytestmark = pytest.mark.comfyui

PROMPT = "A red fox trotting through fresh snow, soft golden light."
SIZE = dict(width=64, height=48, num_frames=5, steps=3, guidance=5.0, shift=5.0, scheduler="unipc", seed=7)
TOL = 1e-4  # fp32 on both sides; ComfyUI's umT5 runs its masked 512-token pass, ours the prompt's tokens only

TINY_LOADER = '''
"""Test-only: ComfyUI's CLIPType.WAN text encoder at the width of the file (see the test's docstring)."""
import types

import comfy.sd
import comfy.text_encoders.wan
import comfy.utils
import folder_paths


class TinyWanCLIPLoader:
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("text_encoders"),)}}

    def load(self, clip_name):
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("text_encoders", clip_name), safe_load=True)
        blocks = {k.split(".")[2] for k in sd if k.startswith("encoder.block.")}
        heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
        config = {
            "vocab_size": sd["shared.weight"].shape[0],
            "d_model": sd["shared.weight"].shape[1],
            "d_ff": sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
            "num_layers": len(blocks),
            "num_heads": heads,
            "d_kv": sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        }
        target = types.SimpleNamespace(params={})
        target.clip = comfy.text_encoders.wan.te(**comfy.sd.t5xxl_detect([sd]))
        target.tokenizer = comfy.text_encoders.wan.WanT5Tokenizer
        clip = comfy.sd.CLIP(target, tokenizer_data={"spiece_model": sd["spiece_model"]},
                             model_options={"umt5xxl_model_config": config})
        missing, unexpected = clip.load_sd(sd)
        if missing or set(unexpected) - {"spiece_model"}:
            raise RuntimeError(f"tiny umT5 does not fit: missing {missing}, unexpected {unexpected}")
        return (clip,)


NODE_CLASS_MAPPINGS = {"TinyWanCLIPLoader": TinyWanCLIPLoader}
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    src = os.environ.get("COMFYUI_DIR")
    if not src or not os.path.isfile(os.path.join(src, "main.py")):
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    tmp = tmp_path_factory.mktemp("comfyui_core_cond")
    app = str(tmp / "ComfyUI")
    shutil.copytree(src, app, ignore=shutil.ignore_patterns(".git", "__pycache__"))  # the checkout stays untouched
    base = tmp / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "user").mkdir()
    os.symlink(REPO, base / "custom_nodes" / PACK)
    (base / "custom_nodes" / "tiny_wan_clip_loader.py").write_text(TINY_LOADER)
    from wan_core.loading.tiny import write_tiny_model

    write_tiny_model(base / "models", "t2v", "comfyui")
    log = str(tmp / "comfyui.log")
    port = _free_port()
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
           "--disable-auto-launch"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=app, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    srv = Server(f"http://127.0.0.1:{port}", str(base), proc, log, python)
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


def _graph(negative: str) -> dict:
    from wan_core.loading.tiny import COMFY_NAMES

    dit, t5, vae = (os.path.basename(COMFY_NAMES[k]) for k in ("t2v", "t5", "vae"))
    model = ["model", 0]
    g = {
        "model": {
            "class_type": "WanModelLoader",
            "inputs": {
                "dit": dit,
                "text_encoder": t5,
                "vae": vae,
                "clip_vision": "(none)",
                "task": "auto",
                "dtype": "auto",
                "attention": "auto",
            },
        },  # fmt: skip
        "clip": {"class_type": "TinyWanCLIPLoader", "inputs": {"clip_name": t5}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["clip", 0]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["clip", 0]}},
        "ours": {
            "class_type": "WanTextEncode",
            "inputs": {"model": model, "prompt": PROMPT, "negative_prompt": negative},
        },
    }
    samplers = {  # name: the sampler's text inputs
        "core": {"positive": ["pos", 0], "negative": ["neg", 0]},
        "wan": {"text_embeds": ["ours", 0]},
        "swapped": {"positive": ["neg", 0], "negative": ["pos", 0]},  # how far another conditioning lands
    }
    for name, text in samplers.items():
        g[f"sample_{name}"] = {"class_type": "WanSampler", "inputs": {"model": model, **SIZE, **text,
                               "denoising_step_list": "1000,750,500,250"}}  # fmt: skip
        g[f"save_{name}"] = {"class_type": "SaveLatent",
                             "inputs": {"samples": [f"sample_{name}", 0], "filename_prefix": f"core_cond/{name}"}}  # fmt: skip
    return g


def _latents(server, entry) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for nid, result in entry["outputs"].items():
        if nid.startswith("save_"):
            (f,) = result["latents"]
            path = os.path.join(server.base, "output", f["subfolder"], f["filename"])
            out[nid.removeprefix("save_")] = load_file(path)["latent_tensor"]
    return out


@pytest.mark.parametrize("negative", ["blurry, static, low quality", "default"])
def test_core_clip_text_encode_drives_our_sampler_to_our_latent(server, negative):
    from nodes.types import DEFAULT_NEGATIVE_PROMPT

    negative = DEFAULT_NEGATIVE_PROMPT if negative == "default" else negative  # Wan's own (Chinese) negative prompt
    entry = server.wait_history(server.queue(_graph(negative)))
    status = entry["status"]
    assert status["status_str"] == "success", status["messages"][-1:]
    lat = _latents(server, entry)
    assert lat["core"].shape == lat["wan"].shape == (1, 16, 2, 6, 8)
    torch.testing.assert_close(lat["core"], lat["wan"], rtol=TOL, atol=TOL)
    assert (lat["swapped"] - lat["wan"]).abs().max() > 100 * TOL  # the tolerance is far below a real difference
