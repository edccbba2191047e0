"""The memory-hook contract on a CUDA GPU (marker gpu; ComfyUI-free): a mid-size DiT leased onto
the GPU, then another model's request for more memory than the card has free while ours is
loaded. A manager that evicts through `model_cache.evict` (what `nodes/memory.py` lets ComfyUI
do) frees our weights for it instead of failing; the next lease rebuilds the DiT and gives the
same output. While the DiT is leased, the request cannot take it (the sampler keeps its weights);
it goes when the lease ends.

  pytest -m gpu tests/test_memory_hooks_gpu.py -s
"""

from __future__ import annotations

import gc

import pytest
import torch

from wan_core import model_cache
from wan_core.loading.dit import save_dit
from wan_core.spec import ModelSpec

from .test_dit import random_state_dict, tiny_cfg

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MID = dict(dim=2048, ffn_dim=8192, num_heads=16, num_layers=12, text_dim=256, freq_dim=256)  # ~0.8 B params
MiB = 1 << 20


class Manager:
    """A host memory manager reduced to the contract: it knows our parts by the hooks and, asked
    for `nbytes` on a device, evicts them until that much is free."""

    def __init__(self):
        self.parts: dict[str, torch.device] = {}

    def on_loaded(self, part, module, device):
        self.parts[part] = torch.device(device)

    def on_released(self, part):
        self.parts.pop(part, None)

    def make_room(self, nbytes: int, device: torch.device) -> bool:
        for part, dev in list(self.parts.items()):
            if torch.cuda.mem_get_info(device)[0] >= nbytes:
                break
            if dev.type == device.type:
                model_cache.evict(part)
                gc.collect()
                torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0] >= nbytes


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    cfg = tiny_cfg("t2v", **MID)
    sd = {k: (v * 0.05).to(torch.bfloat16) for k, v in random_state_dict(cfg, seed=3).items()}
    path = save_dit(sd, str(tmp_path_factory.mktemp("mid") / "dit.safetensors"), "single", cfg)
    return ModelSpec(dit=path, task="t2v", dtype="bf16", device="cuda")


def _forward(model) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 16, 3, 16, 16, device="cuda", generator=g, dtype=torch.bfloat16)
    ctx = torch.randn(1, 32, MID["text_dim"], device="cuda", generator=g, dtype=torch.bfloat16)
    with torch.no_grad():
        return model(x, torch.tensor([500.0], device="cuda"), ctx).float().cpu()


def test_a_request_for_most_of_the_card_evicts_our_dit(spec):
    dev = torch.device("cuda", torch.cuda.current_device())
    model_cache.clear_cache()
    mgr = Manager()
    model_cache.register_memory_hooks(on_loaded=mgr.on_loaded, on_released=mgr.on_released)
    try:
        with model_cache.lease(spec) as dit:
            want = _forward(dit)
            ours = model_cache.memory_report()["dit"][str(dev)]
            assert ours > 1000 * MiB
            # inside the lease a request cannot take the weights from the running sampler
            free = torch.cuda.mem_get_info(dev)[0]
            assert not mgr.make_room(free + ours // 2, dev)
            assert "dit" in model_cache.memory_report()
            assert torch.equal(_forward(dit), want)
            del dit
        gc.collect()
        torch.cuda.empty_cache()  # evicted when that lease ended
        assert "dit" not in model_cache.memory_report() and "dit" not in mgr.parts

        with model_cache.lease(spec) as dit:  # rebuilt on the GPU
            assert torch.equal(_forward(dit), want)
            del dit
        allocated = torch.cuda.memory_allocated(dev)
        free = torch.cuda.mem_get_info(dev)[0]
        ask = free + ours // 2  # more than is free: only evicting our DiT makes it fit
        print(f"\nour DiT {ours / MiB:.0f} MiB, free {free / MiB:.0f} MiB, asked {ask / MiB:.0f} MiB")
        with pytest.raises(torch.OutOfMemoryError):  # without the manager: the other model fails
            torch.empty(ask, dtype=torch.uint8, device=dev)
        assert mgr.make_room(ask, dev)
        assert "dit" not in model_cache.memory_report() and "dit" not in mgr.parts
        assert torch.cuda.memory_allocated(dev) <= allocated - ours
        other = torch.empty(ask - 64 * MiB, dtype=torch.uint8, device=dev)  # the other model's load
        del other
        torch.cuda.empty_cache()

        with model_cache.lease(spec) as dit:  # the next run reloads
            assert torch.equal(_forward(dit), want)
    finally:
        model_cache.register_memory_hooks()
        model_cache.clear_cache()
        torch.cuda.empty_cache()
