"""The model cache under a host's memory manager (`model_cache.register_memory_hooks`), with a
stand-in for ComfyUI's model management: it is asked before each part is built and told when one
is built or dropped; its "unload everything" empties the cache and frees the weights; the next run
rebuilds them and gives the same latent; a DiT leased by a running sampler is never taken from
under it (dropped when the lease ends, from this thread or another)."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

from wan_core import api, model_cache
from wan_core.loading.discover import find_model_files
from wan_core.loading.tiny import write_tiny_model
from wan_core.spec import ModelSpec


class FakeModelManagement:
    """What a host memory manager keeps: the parts it was told about (weakly, as ComfyUI does)."""

    def __init__(self):
        self.loaded: dict[str, tuple[weakref.ref, torch.device]] = {}
        self.asked: list[tuple[str, str, int]] = []  # before_load calls, in order
        self.events: list[tuple[str, str]] = []

    def before_load(self, part, device, nbytes):
        self.asked.append((part, str(device), nbytes))
        self.events.append(("before", part))

    def on_loaded(self, part, module, device):
        assert isinstance(module, torch.nn.Module)
        self.loaded[part] = (weakref.ref(module), device)
        self.events.append(("loaded", part))

    def on_released(self, part):
        self.loaded.pop(part, None)
        self.events.append(("released", part))

    def tracked_bytes(self) -> int:
        total = 0
        for ref, _ in self.loaded.values():
            if ref() is not None:
                total += sum(model_cache.part_bytes(ref()).values())
        return total

    def unload_all(self) -> list[str]:
        return [part for part in list(self.loaded) if model_cache.evict(part)]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = write_tiny_model(tmp_path_factory.mktemp("mem") / "t2v", "t2v", "wan", seed=5)
    f = find_model_files(root, "t2v")
    return ModelSpec(dit=f.dit, t5=f.t5, tokenizer=f.tokenizer, vae=f.vae, task="t2v", dtype="fp32", device="cpu")


@pytest.fixture
def mm():
    model_cache.clear_cache()
    fake = FakeModelManagement()
    model_cache.register_memory_hooks(before_load=fake.before_load, on_loaded=fake.on_loaded,
                                      on_released=fake.on_released)  # fmt: skip
    yield fake
    model_cache.register_memory_hooks()
    model_cache.clear_cache()


def _run(spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole run through the doors the nodes use: encode, sample, decode."""
    pos, neg = api.encode_prompts(spec, "a cat", "")
    res = api.run_sampler(spec, api.SamplerSettings(steps=2, guidance=3.0, seed=3), pos, neg, (5, 32, 48))
    frames = api.decode_video(spec, res.latent)
    return res.latent, frames


def test_unload_request_frees_our_parts_and_the_next_run_reloads(spec, mm):
    latent, frames = _run(spec)
    assert set(mm.loaded) == {"dit", "t5", "vae"}
    # asked before each build, with the files' size, and told after
    assert [p for p, _, _ in mm.asked] == ["t5", "dit", "vae"]
    assert all(n > 0 and dev == "cpu" for _, dev, n in mm.asked)
    for part in ("t5", "dit", "vae"):
        assert mm.events.index(("before", part)) < mm.events.index(("loaded", part))
    assert mm.tracked_bytes() > 0
    assert set(model_cache.memory_report()) == {"dit", "t5", "vae"}
    assert model_cache.memory_report()["dit"]["cpu"] > 0
    refs = [ref for ref, _ in mm.loaded.values()]

    assert sorted(mm.unload_all()) == ["dit", "t5", "vae"]
    gc.collect()
    assert model_cache.memory_report() == {}  # the cache is empty
    assert mm.loaded == {} and mm.tracked_bytes() == 0
    assert all(ref() is None for ref in refs)  # and the weights are really gone
    assert sorted(p for e, p in mm.events if e == "released") == ["dit", "t5", "vae"]

    again, frames_again = _run(spec)  # rebuilt from the files: the same run
    assert set(mm.loaded) == {"dit", "t5", "vae"}
    assert torch.equal(again, latent) and torch.equal(frames_again, frames)


def test_clear_cache_and_replacement_report_releases(spec, mm):
    api.encode_prompts(spec, "a", "")
    model_cache.clear_cache()
    assert ("released", "t5") in mm.events and mm.loaded == {}
    with model_cache.lease(spec):
        pass
    with model_cache.lease(spec.replace(attention="sdpa_math")):  # another key: the old DiT goes first
        pass
    assert mm.events[-3:] == [("released", "dit"), ("before", "dit"), ("loaded", "dit")]


def test_a_leased_dit_is_dropped_when_its_lease_ends(spec, mm):
    """An eviction asked while a sampler holds the DiT (from inside the run, e.g. another node's
    memory request, or from another thread) leaves its weights alone until the lease ends."""
    with model_cache.lease(spec) as dit:
        ref = weakref.ref(dit)
        before = {k: v.clone() for k, v in dit.state_dict().items()}
        assert model_cache.evict("dit") is False  # this thread's own lease
        answer = []
        t = threading.Thread(target=lambda: answer.append(model_cache.evict("dit")))
        t.start()
        t.join()
        assert answer == [False]  # another thread's request does not wait for the run either
        assert "dit" in model_cache.memory_report() and "dit" in mm.loaded
        assert all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())
        del dit
    gc.collect()
    assert "dit" not in model_cache.memory_report() and "dit" not in mm.loaded
    assert ref() is None
    with model_cache.lease(spec) as dit:  # the next lease rebuilds it
        assert all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())
    assert model_cache.evict("dit") is True and model_cache.memory_report() == {}


def test_hook_errors_do_not_fail_a_run(spec):
    def broken(*args):
        raise RuntimeError("manager down")

    model_cache.clear_cache()
    model_cache.register_memory_hooks(before_load=broken, on_loaded=broken, on_released=broken)
    try:
        with model_cache.lease(spec):
            pass
        assert model_cache.evict("dit") is True
    finally:
        model_cache.register_memory_hooks()
        model_cache.clear_cache()
