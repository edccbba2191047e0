"""CPU offload on the CPU: the block swap runs with device="cpu" as the "GPU" (a second placement
of the weights, a stand-in copy stream whose copies land only when the compute waits for them),
so the tests check the mechanism itself: outputs bitwise equal to the resident model, at most
resident + 1 blocks pointing at device memory at any time, FP8 bytes moved as FP8, LoRA-style
branch tensors carried, the budget's block count, model/component round trips, the OOM message."""

import pytest
import torch
import torch.nn as nn

from wan_core.layers.fp8 import FP8_DTYPE, quantize_model
from wan_core.layers.offload import (
    BlockOffload,
    GiB,
    ModelOffload,
    OffloadOptions,
    activation_bytes,
    enable_offload,
    explain_oom,
    offload_component,
    offload_handle,
    plan_block_offload,
    tokens_for,
    weight_sizes,
)
from wan_core.loading.dit import build_model

from .test_dit import random_state_dict, tiny_cfg


def _model(layers=5, model_type="t2v", dtype=torch.float32):
    cfg = tiny_cfg(model_type, num_layers=layers)
    return build_model(cfg, random_state_dict(cfg), dtype=dtype), cfg


def _inputs(cfg, seed=1, frames=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, frames, 4, 4, generator=g)
    kw = {}
    if cfg.is_i2v:
        kw = dict(
            clip_fea=torch.randn(1, 257, cfg.image_dim, generator=g), y=torch.randn(1, 20, frames, 4, 4, generator=g)
        )
    ctx = torch.randn(1, 7, cfg.text_dim, generator=g)
    return (x.to(dtype), torch.tensor([500.0]), ctx.to(dtype)), {k: v.to(dtype) for k, v in kw.items()}


def _run(model, cfg, **kw):
    args, extra = _inputs(cfg, **kw)
    with torch.inference_mode():
        return model(*args, **extra)


def _on_device(handle: BlockOffload) -> list[int]:
    """Blocks whose tensors do not point at their host (master) copy right now."""
    return [i for i, g in enumerate(handle.block_groups) if not all(
        t.data_ptr() == h.data_ptr() for t, h in zip(g.tensors, g.host_views))]  # fmt: skip


@pytest.mark.parametrize("resident,prefetch", [(0, 1), (2, 1), (0, 3), (4, 2), (5, 1)])
@pytest.mark.parametrize("defer", [True, False])
def test_block_offload_equals_resident_and_bounds_device_blocks(resident, prefetch, defer):
    model, cfg = _model()
    ref = _run(model, cfg)
    handle = enable_offload(model, "block", resident_blocks=resident, prefetch=prefetch, device="cpu")
    handle.copier.defer = defer
    seen = []
    for blk in model.blocks:  # registered after the offload's hooks: runs once the block is swapped in
        blk.register_forward_pre_hook(lambda m, a: seen.append(_on_device(handle)))
    assert _on_device(handle) == []  # nothing on the "device" before the first forward
    for _ in range(2):  # the second forward reuses slots still holding the right block
        assert torch.equal(_run(model, cfg), ref)
    assert len(seen) == 2 * len(model.blocks)
    assert max(len(s) for s in seen) <= resident + 1
    assert all(set(range(resident)) <= set(s) for s in seen)  # resident blocks stay
    assert _on_device(handle) == list(range(resident))  # streamed blocks went back after the forward
    slots = min(prefetch + 1, len(model.blocks) - resident)
    rest, blocks = weight_sizes(model)
    assert handle.slots == slots and len(handle._ring) == slots
    assert handle.device_bytes() == rest + sum(blocks[:resident]) + slots * max(blocks)
    handle.remove()
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(_run(model, cfg), ref)


def test_missing_wait_is_caught_by_the_deferred_copies(monkeypatch):
    """The stand-in stream really holds copies back: without the wait the output is wrong."""
    model, cfg = _model(layers=3)
    ref = _run(model, cfg)
    handle = enable_offload(model, "block", device="cpu")
    monkeypatch.setattr(handle.copier, "wait_ready", lambda ev: None)
    assert not torch.equal(_run(model, cfg), ref)


def test_i2v_and_exception_midway_recovers():
    model, cfg = _model(layers=4, model_type="i2v")
    ref = _run(model, cfg)
    handle = enable_offload(model, "block", prefetch=1, device="cpu")
    boom = model.blocks[2].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("oom")))
    with pytest.raises(RuntimeError, match="oom"):
        _run(model, cfg)
    assert _on_device(handle) == [2]  # left attached by the failed forward
    boom.remove()
    assert torch.equal(_run(model, cfg), ref)
    assert _on_device(handle) == []


class _LowRank(nn.Module):
    """A LoRA-style branch: extra tensors inside a block, added to a linear's output by a hook."""

    def __init__(self, lin: nn.Linear, rank=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.down = nn.Parameter(torch.randn(rank, lin.in_features, generator=g) * 0.1, requires_grad=False)
        self.register_buffer("up", torch.randn(lin.out_features, rank, generator=g) * 0.1, persistent=False)
        lin.register_forward_hook(lambda m, a, out: out + a[0] @ self.down.T @ self.up.T)


def _add_branches(model):
    for i, blk in enumerate(model.blocks):
        blk.ffn[0].add_module("lora_branch", _LowRank(blk.ffn[0], seed=i))


def test_lora_branch_tensors_travel_with_their_block():
    model, cfg = _model(layers=4)
    _add_branches(model)
    ref = _run(model, cfg)
    handle = enable_offload(model, "block", device="cpu")
    down = model.blocks[3].ffn[0].lora_branch.down
    assert any(down.data_ptr() == h.data_ptr() for h in handle.block_groups[3].host_views)
    assert torch.equal(_run(model, cfg), ref)


def test_weights_changed_while_unloaded_are_picked_up():
    """A LoRA merge (new .data of the same shape), a branch added, a dtype change: all seen at the next load."""
    model, cfg = _model(layers=4)
    twin, _ = _model(layers=4)
    handle = enable_offload(model, "block", resident_blocks=1, device="cpu")
    with handle.loaded():
        _run(model, cfg)
    for m in (model, twin):
        with torch.no_grad():
            for blk in (m.blocks[0], m.blocks[2]):
                blk.self_attn.q.weight.data = blk.self_attn.q.weight.data * 1.5  # replaced, as a merge does
            m.blocks[3].ffn[2].weight.mul_(0.5)  # in place, into the host master
        _add_branches_one = _LowRank(m.blocks[1].ffn[0], seed=7)
        m.blocks[1].ffn[0].add_module("lora_branch", _add_branches_one)
    assert torch.equal(_run(model, cfg), _run(twin, cfg))
    handle.unload()
    assert _on_device(handle) == []
    assert torch.equal(_run(model, cfg), _run(twin, cfg))


def test_fp8_weights_are_moved_as_fp8():
    model, cfg = _model(layers=3, dtype=torch.bfloat16)
    quantize_model(model, kernel="dequant")
    ref = _run(model, cfg, dtype=torch.bfloat16)
    fp8 = [p for p in model.blocks[0].parameters() if p.dtype == FP8_DTYPE]
    assert fp8
    fp8_bytes = sum(p.numel() for p in model.blocks[0].parameters() if p.dtype == FP8_DTYPE)
    handle = enable_offload(model, "block", device="cpu")
    block_bytes = handle.block_groups[0].nbytes
    other = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters() if p.dtype != FP8_DTYPE)
    assert fp8_bytes + other <= block_bytes < fp8_bytes + other + 512 * 40  # one byte per FP8 weight (+ alignment)
    during = []
    model.blocks[0].ffn[0].register_forward_pre_hook(
        lambda m, a: during.append((m.weight.dtype, m.weight.untyped_storage().data_ptr()))
    )
    assert torch.equal(_run(model, cfg, dtype=torch.bfloat16), ref)
    ring_ptrs = {r.untyped_storage().data_ptr() for r in handle._ring}
    assert during[0][0] == FP8_DTYPE and during[0][1] in ring_ptrs
    assert all(p.dtype == FP8_DTYPE for p in fp8)


def test_budget_picks_the_most_resident_blocks_that_fit():
    model, cfg = _model(layers=6)
    rest, blocks = weight_sizes(model)
    tokens = 2 * 4 * 4 // 4 * 1000  # a made-up run size; the estimate is linear in tokens
    act = activation_bytes(model, tokens)
    assert act == 32 * tokens * cfg.dim + 256 * 2**20
    for r in range(0, 7):
        for extra in (0, 1, blocks[0] - 1):
            w = rest + sum(blocks[:r]) + (min(2, 6 - r) * max(blocks) if r < 6 else 0)
            budget = (w + act + extra) / GiB
            plan = plan_block_offload(model, budget, tokens)
            assert plan.fits and plan.total_bytes <= budget * GiB
            assert plan.resident_blocks >= r
            if plan.resident_blocks < 6:  # one more resident block would not fit
                w_next = rest + sum(blocks[: plan.resident_blocks + 1]) + min(2, 5 - plan.resident_blocks) * max(blocks)
                assert w_next + act > budget * GiB
    low = plan_block_offload(model, (rest + 2 * max(blocks) + act - 1) / GiB, tokens)
    assert not low.fits and low.min_bytes == rest + 2 * max(blocks) + act
    with pytest.raises(ValueError, match="too small for block offload"):
        enable_offload(model, vram_budget_gb=low.budget_bytes / GiB, tokens=tokens, device="cpu")


def test_budget_handle_follows_the_input_size():
    model, cfg = _model(layers=6)
    ref2, ref4 = _run(model, cfg, frames=2), _run(model, cfg, frames=4)
    rest, blocks = weight_sizes(model)
    t2, t4 = 2 * 2 * 2, 4 * 2 * 2  # tokens of the two inputs (patch 1x2x2)
    budget = (rest + 3 * max(blocks) + sum(blocks[:3]) + activation_bytes(model, t2)) / GiB
    handle = enable_offload(model, "block", vram_budget_gb=budget, device="cpu")
    assert torch.equal(_run(model, cfg, frames=2), ref2)
    assert handle.plan.tokens == t2 and handle.resident_blocks == plan_block_offload(model, budget, t2).resident_blocks
    assert handle.device_bytes() + activation_bytes(model, t2) <= budget * GiB
    assert torch.equal(_run(model, cfg, frames=4), ref4)  # more tokens: fewer resident blocks
    r4 = handle.resident_blocks
    assert handle.plan.tokens == t4 and r4 < plan_block_offload(model, budget, t2).resident_blocks
    assert handle.device_bytes() + activation_bytes(model, t4) <= budget * GiB
    loads = handle.stats["loads"]
    assert torch.equal(_run(model, cfg, frames=2), ref2)  # smaller while loaded: same plan, no reload
    assert (handle.resident_blocks, handle.stats["loads"]) == (r4, loads)
    handle.unload()
    assert torch.equal(_run(model, cfg, frames=2), ref2)  # next load: planned for this size again
    assert handle.plan.tokens == t2 and handle.resident_blocks > r4


def test_model_offload_round_trip():
    model, cfg = _model(layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _run(model, cfg)
    handle = enable_offload(model, "model", device="cpu")
    assert isinstance(handle, ModelOffload) and not handle.is_loaded
    host = {n: p.data_ptr() for n, p in model.named_parameters()}
    with handle.loaded():
        assert all(p.data_ptr() != host[n] for n, p in model.named_parameters())  # all on the "device"
        assert torch.equal(_run(model, cfg), ref)
    assert all(p.data_ptr() == host[n] for n, p in model.named_parameters())
    assert torch.equal(_run(model, cfg), ref)  # a bare forward loads
    assert handle.is_loaded
    handle.remove()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # enabling again adopts the packed host buffers: no copy, no new memory
    again = enable_offload(model, "block", device="cpu")
    assert again.host_bytes_allocated == 0
    assert all(p.data_ptr() == host[n] for n, p in model.named_parameters())


def test_offload_component_moves_and_releases():
    enc = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    ref = enc(x)
    host = None
    for _ in range(2):
        with offload_component(enc, device="cpu") as m:
            assert m is enc
            handle = offload_handle(enc)
            host = [h.data_ptr() for g in handle.groups for h in g.host_views]
            assert all(p.data_ptr() not in host for p in enc.parameters())
            assert torch.equal(enc(x), ref)
        assert all(p.data_ptr() in host for p in enc.parameters())
    assert handle.stats["loads"] == 2
    with offload_component(None) as nothing:
        assert nothing is None
    wrapper = type("Wrapper", (), {})()  # like WanTextEncoder: holds its module as .model
    wrapper.model = enc
    with offload_component(wrapper, device="cpu") as w:
        assert w is wrapper and all(p.data_ptr() not in host for p in enc.parameters())
    with pytest.raises(TypeError, match="nn.Module"):
        with offload_component(object(), device="cpu"):
            pass


def test_hooks_coexist_with_compiled_blocks():
    """module.compile() compiles __call__ with its hooks; ours are excluded, so one graph serves every block."""
    torch._dynamo.reset()
    model, cfg = _model(layers=3)
    ref = _run(model, cfg)
    handle = enable_offload(model, "block", resident_blocks=1, device="cpu")
    for blk in model.blocks:
        blk.compile(backend="aot_eager", dynamic=False)
    from torch._dynamo.utils import counters

    counters.clear()
    for _ in range(2):
        assert torch.equal(_run(model, cfg), ref)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    handle.remove()
    torch._dynamo.reset()


def test_explain_oom_names_the_option_and_a_budget_that_fits():
    from wan_core.models.config import PRESETS

    model = build_model(PRESETS["t2v-14b"], None, dtype=torch.bfloat16, device="meta")
    tokens = tokens_for(81, 480, 832)
    assert tokens == 32760
    err = explain_oom(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.2 GiB"), model, tokens, total_gb=24
    )
    msg = str(err)
    assert isinstance(err, torch.OutOfMemoryError)
    assert "cpu_offload=true" in msg and "offload_granularity='block'" in msg and "vram_budget_gb=22.5" in msg
    plan = plan_block_offload(model, 22.5, tokens)
    assert plan.fits and 0 < plan.resident_blocks < 40 and f"keeps {plan.resident_blocks} of 40" in msg
    assert "Tried to allocate 1.2 GiB" in msg
    small = str(explain_oom(RuntimeError("CUDA out of memory"), model, 4 * tokens, total_gb=8))
    assert "lower the resolution" in small and "vram_budget_gb=" not in small


def test_lightx2v_keys():
    o = OffloadOptions.from_config({"cpu_offload": True, "offload_granularity": "phase", "vae_cpu_offload": False})
    assert (o.cpu_offload, o.granularity, o.text_encoder, o.image_encoder, o.vae) == (True, "block", True, True, False)
    o = OffloadOptions.from_config({"cpu_offload": True, "offload_granularity": "model", "t5_cpu_offload": False})
    assert (o.granularity, o.text_encoder) == ("model", False)
    assert OffloadOptions.from_config({}).apply(nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match="offload_granularity"):
        OffloadOptions.from_config({"cpu_offload": True, "offload_granularity": "layer"})
    model, cfg = _model(layers=2)
    h = OffloadOptions.from_config({"cpu_offload": True, "offload_resident_blocks": 1}).apply(model, device="cpu")
    assert isinstance(h, BlockOffload) and h.resident_blocks == 1
    with pytest.raises(RuntimeError, match="already offloaded"):
        enable_offload(model, device="cpu")
