"""CPU offload of both Wan2.2 A14B experts, on the CPU (device="cpu" as the "GPU", as in
tests/test_offload.py): each expert has its own offload handle; `denoise` brings an expert in for
its own steps only and lets the first go before the second is loaded, so their device copies
(the whole model, or the block ring) are never held together. The run equals the resident one
bitwise, for block offload, model offload and a mix."""

import pytest
import torch

from wan_core.layers.offload import BlockOffload, enable_offload, offload_handle
from wan_core.loading.dit import build_model
from wan_core.sampling.denoise import denoise
from wan_core.sampling.experts import Experts, ExpertSwitch
from wan_core.sampling.loop import Cond, make_noise
from wan_core.sampling.schedulers import make_scheduler

from .test_dit import random_state_dict, tiny_cfg


def _on_device(handle) -> int:
    """Tensors of an offloaded model not pointing at their host (master) copy right now."""
    return sum(t.data_ptr() != h.data_ptr() for g in handle.groups for t, h in zip(g.tensors, g.host_views))


def _run(experts):
    g = torch.Generator().manual_seed(2)
    cfg = experts.cfg
    cond, uncond = Cond([torch.randn(6, cfg.text_dim, generator=g)]), Cond([torch.randn(3, cfg.text_dim, generator=g)])
    noise = make_noise((1, 16, 2, 4, 6), seed=3)
    with torch.inference_mode():
        return denoise(experts, noise, make_scheduler("unipc", 5, 5.0), cond, uncond, 99.0)[0]


@pytest.mark.parametrize("kinds", [("block", "block"), ("model", "model"), ("model", "block")])
def test_two_offloaded_experts_equal_resident_and_are_never_loaded_together(kinds):
    cfg = tiny_cfg(num_layers=3)
    high = build_model(cfg, random_state_dict(cfg, seed=1), dtype=torch.float32)
    low = build_model(cfg, random_state_dict(cfg, seed=2), dtype=torch.float32)
    experts = Experts(high, low, ExpertSwitch(step=2), guidance_high=4.0, guidance_low=3.0)
    ref = _run(experts)
    assert not torch.equal(ref, _run(Experts(high, high, ExpertSwitch(step=2), 4.0, 3.0)))  # both experts count

    handles = [enable_offload(m, kind, prefetch=1, device="cpu") for m, kind in zip(experts.models, kinds)]
    assert [isinstance(h, BlockOffload) for h in handles] == [k == "block" for k in kinds]
    seen = []  # per DiT call: (expert, its handle loaded, the other's loaded, the other's tensors on the device)
    for name, mine, other in (("high", *handles), ("low", *handles[::-1])):
        # registered after the offload's own hooks: sees the state the forward runs in
        mine.module.register_forward_pre_hook(
            lambda m, a, name=name, mine=mine, other=other: seen.append(
                (name, mine.is_loaded, other.is_loaded, _on_device(other))
            )
        )
    got = _run(experts)
    assert torch.equal(got, ref)
    assert [s[0] for s in seen] == ["high"] * 4 + ["low"] * 6  # 2 + 3 steps, cond and uncond each
    # each call: its own expert loaded, the other's weights back in host memory (none on the device)
    assert all(s[1] and not s[2] and s[3] == 0 for s in seen), seen
    for h in handles:
        assert h.stats["loads"] == 1 and not h.is_loaded and _on_device(h) == 0  # one swap-in each; released after
    for m in experts.models:
        offload_handle(m).remove()
    assert torch.equal(_run(experts), ref)
