"""Host memory across runs (issue 24): repeated runs in one process do not grow RSS, an unloaded
offloaded model gives its packed host buffers back, and LoRA changes neither re-read the DiT
checkpoint nor keep another copy of its weights."""

from __future__ import annotations

import gc
import os
import threading
import warnings
import weakref

import pytest
import torch

from benchmarks.soak import after_run, cpu_pipeline, rss_bytes
from wan_core import model_cache
from wan_core.layers.offload import dit_loaded, packed_host_bytes
from wan_core.loading.lora import random_lora, save_lora
from wan_core.loading.tiny import tiny_dit_config, tiny_model_dir
from wan_core.spec import ModelSpec, OffloadOptions

MiB = 2**20
# Runs 3..6 may grow RSS by at most this much over run 2. One run of the soak below makes a
# 17x128x192 video: its frames alone are 17*128*192*3*4 B = 4.8 MiB (float32), the VAE's
# activations tens of MiB. Anything a run leaves behind (frames, latents, a cache keyed by run,
# a writer thread's buffers) is at least one frames tensor per run: 4 runs x 4.8 MiB = 19 MiB.
# The RSS noise of a steady run after gc + malloc_trim is below 1 MiB (benchmarks/RESULTS.md,
# issue 24), so 6 MiB leaves room for noise and still catches a leak of 1.5 frames tensors in 4 runs.
GROWTH_BOUND = 6 * MiB


@pytest.fixture(autouse=True)
def _fresh_cache():
    model_cache.clear_cache()
    yield
    model_cache.clear_cache()


def test_repeated_pipeline_runs_do_not_grow_rss(tmp_path):
    pipe = cpu_pipeline(str(tmp_path), "none")
    pipe.config = pipe.config.updated(dict(target_video_length=17, target_height=128, target_width=192))
    rss, threads = [], []
    for i in range(6):
        res = pipe.generate(seed=i, prompt="a cat surfing", save_result_path=str(tmp_path / f"soak{i}.mp4"))
        assert res.frames.shape == (17, 128, 192, 3)
        del res
        after_run()
        rss.append(rss_bytes())
        threads.append(threading.active_count())
    assert threads[5] == threads[1], f"threads left behind by runs (video writers?): {threads}"
    if not rss[0]:
        pytest.skip("no /proc/self/status here")
    growth = max(rss[2:]) - rss[1]
    assert growth < GROWTH_BOUND, f"RSS grew {growth / MiB:.1f} MiB over runs 3..6 (per run: {[r // MiB for r in rss]})"


def _offload_spec(**kw) -> ModelSpec:
    model = tiny_model_dir("t2v", "wan")
    return ModelSpec(
        dit=os.path.join(model, "diffusion_pytorch_model.safetensors"), task="t2v", device="cpu", dtype="float32",
        offload=OffloadOptions(granularity="block"), **kw,
    )  # fmt: skip


def test_unloading_an_offloaded_model_frees_its_packed_host_buffers(tmp_path):
    lora = save_lora(random_lora(tiny_dit_config("t2v"), rank=4, seed=1), str(tmp_path / "a.safetensors"))
    assert packed_host_bytes() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CPU offload on a CPU run saves nothing: only the mechanism is tested
        with model_cache.lease(_offload_spec()) as dit:
            ref = weakref.ref(dit)
            weights = sum(t.nbytes for t in dit.state_dict().values())
        packed = packed_host_bytes()
        assert weights <= packed < 2 * weights  # every weight packed once (alignment padding only)
        # LoRA strength changes and swaps repack only changed blocks: the packed total stays bounded
        for s in (1.0, 0.5, 0.0, 1.0):
            with model_cache.lease(_offload_spec(loras=((lora, s),))):
                pass
            gc.collect()
            assert packed_host_bytes() <= packed + weights // 10 + MiB
    del dit
    model_cache.clear_cache()  # collects the model's reference cycles (offload hooks) itself
    assert ref() is None, "the cache let go of the model, but something still holds it"
    assert packed_host_bytes() == 0


def _held_bytes(model) -> int:
    """Bytes of every distinct storage the model holds: weights, buffers, LoRA branches and the
    originals the LoRA layer keeps."""
    from wan_core.layers.lora import _ATTR

    seen, total = set(), 0
    tensors = list(model.state_dict(keep_vars=True).values())
    st = model.__dict__.get(_ATTR)
    if st is not None:
        tensors += list(st.originals.values())
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def test_lora_changes_do_not_reread_the_checkpoint_or_keep_copies(tmp_path, monkeypatch):
    import safetensors

    cfg = tiny_dit_config("t2v")
    a = save_lora(random_lora(cfg, rank=4, seed=1), str(tmp_path / "a.safetensors"))
    b = save_lora(random_lora(cfg, rank=8, seed=2), str(tmp_path / "b.safetensors"))
    model = tiny_model_dir("t2v", "wan")
    dit_file = os.path.realpath(os.path.join(model, "diffusion_pytorch_model.safetensors"))
    opened: list[str] = []
    real_open = safetensors.safe_open

    def counting_open(path, *args, **kwargs):
        opened.append(os.path.realpath(os.fspath(path)))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", counting_open)
    spec = ModelSpec(dit=dit_file, task="t2v", device="cpu", dtype="float32")
    with model_cache.lease(spec.replace(loras=((a, 1.0),))) as dit:
        held_a = _held_bytes(dit)
        base = sum(t.nbytes for t in dit.state_dict().values())
    assert opened.count(dit_file) >= 1  # the build read it
    opened.clear()
    sizes = {}
    for loras in [((a, 0.5),), ((a, 0.0),), ((b, 1.0),), ((a, 1.0), (b, 0.3)), ((b, 0.7),), (), ((a, 1.0),)]:
        with model_cache.lease(spec.replace(loras=loras)) as leased:
            assert leased is dit  # the same model object, brought to the new LoRAs
            sizes[loras] = _held_bytes(leased)
    assert dit_file not in opened, f"a LoRA change re-read the DiT file ({opened.count(dit_file)} opens)"
    assert sizes[((a, 1.0),)] == held_a  # back to the first set: exactly what it held then
    assert sizes[()] == base  # no LoRA: only the base weights, no kept copy
    # merged weights: at most one kept original per touched weight beside the merged one
    assert max(sizes.values()) <= 2 * base
    # parsed LoRA files kept for switching back are bounded (LoraSync.weights), not one per change
    from wan_core.layers.stack import layer_state

    assert len(layer_state(dit).lora.weights) <= 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_evicting_an_offloaded_dit_returns_its_pinned_memory():
    """On CUDA the packed copy is pinned and comes from PyTorch's caching host allocator: after
    `clear_cache()` the buffers are gone and the allocator holds no more pinned bytes than before
    (its cached blocks were handed back to the OS, not kept for a model that is not coming back)."""
    spec = _offload_spec().replace(device="cuda", dtype="bfloat16")
    torch.cuda.init()
    stats = getattr(torch.cuda.memory, "host_memory_stats", None)
    if stats is None:
        pytest.skip("this torch has no host allocator statistics")

    def held() -> int:
        s = stats()
        return int(s.get("allocated_bytes.current", s.get("allocated_bytes.all.current", 0)))

    before = held()
    for _ in range(3):  # lease, load, evict, three times: nothing accumulates
        with model_cache.lease(spec) as dit, dit_loaded(dit):  # packed into pinned memory, on the GPU and back
            pass
        assert packed_host_bytes(pinned=True) > 0 and held() > before
        del dit
        model_cache.clear_cache()
        assert packed_host_bytes() == 0
        assert held() <= before, f"pinned bytes held after eviction: {held() - before}"
