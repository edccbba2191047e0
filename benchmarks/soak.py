"""Host memory across repeated whole runs in one process: RSS and pinned memory per run.

A user runs the same graph many times in one ComfyUI process; host RAM must not creep up until
the process is killed. This runs N whole generations in one process and prints, per run, the
resident set size (VmRSS) and the pinned host memory, then the growth of run N over run 2 (run 1
builds the models and warms every cache; run 2 is the steady state to compare with).

Pinned memory is read two ways: PyTorch's caching host allocator (`torch.cuda.memory.
host_memory_stats()`, "allocated_bytes.current": every pinned block it holds, cached ones
included; CUDA only), and the offload package's own count of its live packed host buffers
(`wan_core.layers.offload.packed_host_bytes()`: pinned on CUDA, plain host memory on the CPU).

Modes:
  cpu       `WanPipeline` on the CPU with the tiny model (`python -m wan_core tiny-model`),
            a distill LoRA on it, mp4 saved every run; `--offload block` adds the offload path.
  cuda14b   `WanPipeline` on CUDA, Wan2.1-14B at full size with random weights (as
            bench_e2e.py): 4 distill steps, 480x832, 17 frames, T5 umT5-XXL random on the GPU,
            mp4 saved; `--offload model|block` keeps the DiT in pinned host memory.
  nodes     the ComfyUI node classes headless (as tests/test_workflows.py): the
            distill-LoRA T2V API workflow on tiny models, `--runs` times.
  comfyui   the same API workflow posted `--runs` times to a real ComfyUI process on the CPU
            (COMFYUI_DIR, COMFYUI_PYTHON as for `pytest -m comfyui`); RSS of that process
            (packed / threads columns: not read there, 0).

  python benchmarks/soak.py --mode cpu [--runs 20] [--no-trim] [--json out.json]

The engine itself ends a run with glibc `malloc_trim(0)` (`wan_core.layers.offload.
trim_host_memory`, in `WanPipeline.generate` and `api.decode_video`); `--no-trim` turns that off
to measure what it does. Before each reading: `gc.collect()`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MiB = 2**20


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (this one by default; Linux /proc, 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pinned_bytes() -> tuple[int | None, int]:
    """(bytes held by torch's caching host allocator or None without CUDA, our packed host buffers)."""
    from wan_core.layers.offload import packed_host_bytes

    torch_pinned = None
    if torch.cuda.is_available() and torch.cuda.is_initialized() and hasattr(torch.cuda.memory, "host_memory_stats"):
        stats = torch.cuda.memory.host_memory_stats()  # pinned blocks held, active + cached
        torch_pinned = int(stats.get("allocated_bytes.current", stats.get("allocated_bytes.all.current", 0)))
    return torch_pinned, packed_host_bytes()


def after_run() -> None:
    """gc before reading, so that a reading is not a garbage cycle waiting for collection."""
    gc.collect()


def table(rows: list[dict], title: str) -> str:
    lines = [
        title,
        f"{'run':>4s} {'s':>7s} {'RSS MiB':>10s} {'torch pinned MiB':>17s} {'ours packed MiB':>16s} {'threads':>8s}",
    ]
    for r in rows:
        tp = "-" if r["torch_pinned"] is None else f"{r['torch_pinned'] / MiB:.1f}"
        lines.append(
            f"{r['run']:4d} {r['wall_s']:7.2f} {r['rss'] / MiB:10.1f} {tp:>17s} {r['packed'] / MiB:16.1f} {r['threads']:8d}"
        )
    if len(rows) >= 2:
        base, last = rows[1], rows[-1]
        d = last["rss"] - base["rss"]
        lines.append(
            f"RSS growth run {last['run']} vs run 2: {d / MiB:+.1f} MiB ({100 * d / base['rss']:+.2f} %); "
            f"max over runs 2..{last['run']}: {(max(r['rss'] for r in rows[1:]) - base['rss']) / MiB:+.1f} MiB"
        )
        for key, name in (("torch_pinned", "torch pinned"), ("packed", "ours packed")):
            if base[key] is not None:
                lines.append(f"{name} growth run {last['run']} vs run 2: {(last[key] - base[key]) / MiB:+.1f} MiB")
    return "\n".join(lines)


def soak(run_once, runs: int, trim: bool, log=print) -> list[dict]:
    """Call `run_once(i)` `runs` times; one row of memory readings after each. trim: False turns
    off the engine's malloc_trim after a run (`wan_core.layers.offload.host.TRIM`)."""
    from wan_core.layers.offload import host

    host.TRIM = trim
    rows = []
    for i in range(1, runs + 1):
        t0 = time.perf_counter()
        run_once(i)
        wall = time.perf_counter() - t0
        after_run()
        tp, ours = pinned_bytes()
        rows.append(
            dict(run=i, wall_s=wall, rss=rss_bytes(), torch_pinned=tp, packed=ours, threads=threading.active_count())
        )
        r = rows[-1]
        log(
            f"run {i}: {wall:.2f} s, RSS {r['rss'] / MiB:.1f} MiB, packed {ours / MiB:.1f} MiB"
            + ("" if tp is None else f", torch pinned {tp / MiB:.1f} MiB")
        )
    return rows


# ----------------------------------------------------------------------------- the modes


def cpu_pipeline(out_dir: str, offload: str, lora: bool = True):
    """A `WanPipeline` over the tiny T2V model on the CPU, a random distill-style LoRA on it."""
    from wan_core.loading.lora import random_lora, save_lora
    from wan_core.loading.tiny import tiny_dit_config, tiny_model_dir
    from wan_core.pipeline import WanPipeline

    model = tiny_model_dir("t2v", "wan")
    params = dict(infer_steps=4, denoising_step_list=[1000, 750, 500, 250], sample_guide_scale=1.0,
                  target_video_length=9, target_height=64, target_width=96)  # fmt: skip
    if lora:
        path = os.path.join(out_dir, "soak_lora.safetensors")
        save_lora(random_lora(tiny_dit_config("t2v"), rank=4, seed=0), path)
        params["lora_configs"] = [{"path": path, "strength": 1.0}]
    if offload != "none":
        params.update(cpu_offload=True, offload_granularity=offload)
    pipe = WanPipeline(model_path=model, model_cls="wan2.1_distill", task="t2v", device="cpu")
    with warnings_quiet():
        pipe.create_generator(**params)
    return pipe


@contextlib.contextmanager
def warnings_quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CPU offload on a CPU run saves no memory"
        yield


def mode_cpu(args) -> list[dict]:
    out = tempfile.mkdtemp(prefix="soak-")
    pipe = cpu_pipeline(out, args.offload)

    def run(i):
        with warnings_quiet():
            pipe.generate(seed=i, prompt="a cat surfing a wave", save_result_path=os.path.join(out, "soak.mp4"))

    return soak(run, args.runs, not args.no_trim)


def mode_cuda14b(args) -> list[dict]:
    """The 14B at full size, random weights, built in memory (no files): the lease is patched to
    hand out this DiT, as benchmarks/bench_e2e.py does."""
    from benchmarks.bench_e2e import random_dit, random_t5
    from wan_core import pipeline as wan_pipeline
    from wan_core.models.vae import WanVAE
    from wan_core.options import GenerationConfig
    from wan_core.pipeline import WanPipeline
    from wan_core.spec import ModelSpec

    out = os.environ.get("OUT") or tempfile.mkdtemp(prefix="soak-")
    t0 = time.time()
    t5 = random_t5("cuda")
    with torch.device("cuda"):
        vae = WanVAE()
    vae = vae.to(torch.bfloat16).eval()
    dit = random_dit(args.variant)
    if args.offload != "none":
        from wan_core.layers.offload import enable_offload

        enable_offload(dit, granularity=args.offload, device="cuda", vram_budget_gb=args.vram_budget_gb)
    print(f"models built in {time.time() - t0:.0f} s", flush=True)
    cfg = GenerationConfig(infer_steps=4, denoising_step_list=[1000, 750, 500, 250], sample_guide_scale=1.0,
                           target_video_length=args.frames, target_height=480, target_width=832)  # fmt: skip
    pipe = WanPipeline(dit_path="random", task="t2v", device="cuda")
    pipe.spec, pipe.config = ModelSpec(dit="random", device="cuda"), cfg
    pipe.dit, pipe.text_encoder, pipe.vae, pipe.image_encoder = dit, t5, vae, None
    wan_pipeline.lease = lambda spec, dit=dit: contextlib.nullcontext(dit)

    def run(i):
        pipe.generate(seed=i, prompt="a cat surfing a wave at sunset", save_result_path=os.path.join(out, "soak.mp4"))

    rows = soak(run, args.runs, not args.no_trim)
    if os.path.exists(os.path.join(out, "soak.mp4")):
        os.remove(os.path.join(out, "soak.mp4"))
    return rows


def mode_nodes(args) -> list[dict]:
    from nodes import compat
    from tests.comfyui_helpers import load_api, populate_models, reduce_api, run_api

    root = tempfile.mkdtemp(prefix="soak-comfy-")
    populate_models(os.path.join(root, "models"), os.path.join(root, "scratch"))
    compat.set_models_root(os.path.join(root, "models"))
    os.environ["WAN_OUTPUT_DIR"] = os.path.join(root, "output")
    graph = reduce_api(load_api("wan21_t2v_14b_distill_lora"), prefix="soak/run")

    def run(i):
        g = json.loads(json.dumps(graph))
        for node in g.values():
            if node["class_type"] == "WanSampler":
                node["inputs"]["seed"] = i
        run_api(g, input_dir=os.path.join(root, "input"))

    try:
        return soak(run, args.runs, not args.no_trim)
    finally:
        compat.set_models_root()


def start_comfyui(tmp: str):
    """A real ComfyUI on the CPU with this pack and the tiny models (as tests/test_comfyui_real.py
    starts it): COMFYUI_DIR (copied, untouched) and COMFYUI_PYTHON from the environment."""
    import shutil
    import subprocess
    import urllib.error

    from tests.comfyui_helpers import REPO
    from tests.test_comfyui_real import PACK, Server, _free_port

    src = os.environ.get("COMFYUI_DIR")
    if not src or not os.path.isfile(os.path.join(src, "main.py")):
        raise SystemExit("--mode comfyui: set COMFYUI_DIR to a ComfyUI checkout (and COMFYUI_PYTHON)")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    app, base = os.path.join(tmp, "ComfyUI"), os.path.join(tmp, "base")
    shutil.copytree(src, app, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    os.makedirs(os.path.join(base, "custom_nodes"))
    os.makedirs(os.path.join(base, "user"))
    os.symlink(REPO, os.path.join(base, "custom_nodes", PACK))
    from tests.comfyui_helpers import populate_models

    populate_models(os.path.join(base, "models"), os.path.join(tmp, "scratch"))
    port, log = _free_port(), os.path.join(tmp, "comfyui.log")
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", base,
           "--disable-auto-launch"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=app, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    srv = Server(f"http://127.0.0.1:{port}", base, proc, log, python)
    end = time.time() + 300
    while True:
        try:
            srv.get("/system_stats")
            return srv
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None or time.time() > end:
                proc.terminate()
                raise RuntimeError("ComfyUI did not start:\n" + srv.log()[-4000:]) from None
            time.sleep(1)


def mode_comfyui(args) -> list[dict]:
    """The distill-LoRA T2V API workflow posted `--runs` times to one real ComfyUI process (a new
    seed each time, so the sampler, decode and save run again; loaders and encoders are cached by
    ComfyUI as in real use); RSS is the ComfyUI process's. No malloc_trim switch here: the engine
    in that process trims as it always does."""
    from tests.comfyui_helpers import load_api, reduce_api

    srv = start_comfyui(tempfile.mkdtemp(prefix="soak-comfyui-"))
    graph = reduce_api(load_api("wan21_t2v_14b_distill_lora"), prefix="soak/run")
    rows = []
    try:
        for i in range(1, args.runs + 1):
            g = json.loads(json.dumps(graph))
            for node in g.values():
                if node["class_type"] == "WanSampler":
                    node["inputs"]["seed"] = i
            t0 = time.perf_counter()
            entry = srv.wait_history(srv.queue(g))
            if entry["status"]["status_str"] != "success":
                raise RuntimeError(f"run {i} failed: {json.dumps(entry['status'])[:2000]}")
            wall = time.perf_counter() - t0
            rows.append(dict(run=i, wall_s=wall, rss=rss_bytes(srv.proc.pid), torch_pinned=None, packed=0, threads=0))
            print(f"run {i}: {wall:.2f} s, ComfyUI RSS {rows[-1]['rss'] / MiB:.1f} MiB", flush=True)
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=30)
    return rows


MODES = {"cpu": mode_cpu, "cuda14b": mode_cuda14b, "nodes": mode_nodes, "comfyui": mode_comfyui}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", default="cpu", choices=sorted(MODES))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--no-trim", action="store_true", help="skip malloc_trim after each run")
    ap.add_argument("--offload", default="none", choices=["none", "model", "block"])
    ap.add_argument("--vram-budget-gb", type=float, default=None, help="block offload: resident blocks that fit")
    ap.add_argument("--variant", default="bf16", help="cuda14b: DiT variant of bench_e2e.random_dit (bf16, fp8, fast)")
    ap.add_argument("--frames", type=int, default=17, help="cuda14b: video length")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = MODES[args.mode](args)
    title = (f"soak {args.mode}: {args.runs} runs, offload {args.offload}, "
             f"malloc_trim {'off' if args.no_trim else 'on'}, torch {torch.__version__}")  # fmt: skip
    print(table(rows, title), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(mode=args.mode, args=vars(args), rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
