"""CPU offload on a CUDA GPU (marker gpu): the real side stream, events and pinned memory.

  pytest -m gpu tests/test_offload_gpu.py -s     (-s prints the measured peaks)

- block offload with prefetch gives bitwise the resident model's output (eager and with the
  blocks compiled), over several forwards so copies really are in flight while blocks compute;
- the host copies are pinned and the ring is the only per-block device memory: the peak of a
  block-offloaded forward stays under `device_bytes() + activation_bytes(tokens)`, and a
  budget's peak stays under the budget;
- model offload and `offload_component` give the memory back after the stage.
"""

import pytest
import torch

from wan_core.layers.offload import GiB, activation_bytes, enable_offload, offload_component, weight_sizes
from wan_core.loading.dit import build_model

from .test_dit import random_state_dict, tiny_cfg

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Blocks big enough that a forward takes a few ms per block and a copy is in flight meanwhile.
MID = dict(dim=1024, ffn_dim=4096, num_heads=8, num_layers=8, text_dim=256, freq_dim=256)


def _sd(cfg, seed=0):
    return {k: v * 0.1 for k, v in random_state_dict(cfg, seed).items()}


def _inputs(cfg, grid=(5, 32, 32), dtype=torch.bfloat16, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(1, 16, *grid, device="cuda", generator=g).to(dtype)
    ctx = torch.randn(1, 64, cfg.text_dim, device="cuda", generator=g).to(dtype)
    return x, torch.tensor([500.0], device="cuda"), ctx


def _tokens(grid):
    f, h, w = grid
    return f * (h // 2) * (w // 2)


@pytest.mark.parametrize("resident,prefetch", [(0, 1), (3, 1), (0, 3)])
def test_block_offload_equals_resident_on_cuda(resident, prefetch):
    cfg = tiny_cfg(**MID)
    sd = _sd(cfg)
    ref_model = build_model(cfg, sd, dtype=torch.bfloat16, device="cuda")
    ref_model.set_attention("auto", device="cuda")
    args = _inputs(cfg)
    with torch.inference_mode():
        ref = ref_model(*args)
    del ref_model
    model = build_model(cfg, sd, dtype=torch.bfloat16, device="cpu")
    model.set_attention("auto", device="cuda")
    handle = enable_offload(model, "block", resident_blocks=resident, prefetch=prefetch, device="cuda")
    assert all(g.host.is_pinned() for g in handle.groups)
    with torch.inference_mode():
        outs = [model(*args) for _ in range(3)]  # no sync in between: the CPU runs ahead of the copies
    torch.cuda.synchronize()
    for out in outs:
        assert torch.equal(out, ref)
    assert handle.stats["block_copies"] >= 3 * (cfg.num_layers - resident - handle.slots)
    handle.remove()
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_block_offload_with_compiled_blocks_equals_compiled_resident():
    from wan_core.layers.compile import compile_blocks

    cfg = tiny_cfg(**MID)
    sd = _sd(cfg)
    args = _inputs(cfg)
    ref_model = build_model(cfg, sd, dtype=torch.bfloat16, device="cuda")
    ref_model.set_attention("auto", device="cuda")
    ref_model.set_block_ops("auto", device="cuda")  # the fused ops, as a CUDA build runs them
    compile_blocks(ref_model)
    with torch.inference_mode():
        ref = ref_model(*args)
    del ref_model
    model = build_model(cfg, sd, dtype=torch.bfloat16, device="cpu")
    model.set_attention("auto", device="cuda")
    model.set_block_ops("auto", device="cuda")  # the fused ops, as a CUDA build runs them
    compile_blocks(model)
    enable_offload(model, "block", resident_blocks=2, device="cuda")
    with torch.inference_mode():
        outs = [model(*args) for _ in range(2)]
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def _peak(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        out = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), base, out


def test_peak_memory_block_offload_and_budget():
    cfg = tiny_cfg(dim=1536, ffn_dim=8960, num_heads=12, num_layers=12, text_dim=512, freq_dim=256)
    sd = _sd(cfg)
    grid = (9, 48, 64)  # 9 x 24 x 32 = 6,912 tokens
    tokens = _tokens(grid)
    model = build_model(cfg, sd, dtype=torch.bfloat16, device="cpu")
    model.set_attention("auto", device="cuda")
    rest, blocks = weight_sizes(model)
    args = _inputs(cfg, grid)
    handle = enable_offload(model, "block", device="cuda")
    peak, base, out = _peak(lambda: model(*args))
    bound = handle.device_bytes() + activation_bytes(model, tokens)
    print(
        f"\nblock offload, 0 resident: peak {(peak - base) / GiB:.3f} GiB over {base / GiB:.3f}, bound {bound / GiB:.3f}"
    )
    assert peak - base <= bound  # base: what earlier tests left allocated, and the inputs
    assert peak - base < rest + 4 * max(blocks) + activation_bytes(model, tokens)  # far below the 12-block model
    handle.remove()
    budget = (rest + 7 * max(blocks) + activation_bytes(model, tokens)) / GiB
    handle = enable_offload(model, "block", vram_budget_gb=budget, device="cuda")
    peak2, base2, out2 = _peak(lambda: model(*args))
    print(f"budget {budget:.3f} GiB: {handle.resident_blocks} resident blocks, peak {(peak2 - base2) / GiB:.3f} GiB")
    assert handle.resident_blocks == 5 and peak2 - base2 <= budget * GiB
    assert torch.equal(out, out2)
    handle.remove()


def test_model_offload_and_component_release_memory():
    cfg = tiny_cfg(**MID)
    sd = _sd(cfg)
    args = _inputs(cfg)
    model = build_model(cfg, sd, dtype=torch.bfloat16, device="cuda")
    model.set_attention("auto", device="cuda")
    with torch.inference_mode():
        ref = model(*args)
    handle = enable_offload(model, "model", device="cuda")  # moves the weights to pinned host memory
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    with handle.loaded(), torch.inference_mode():
        assert torch.cuda.memory_allocated() - base >= handle.host_bytes
        assert torch.equal(model(*args), ref)
    assert torch.cuda.memory_allocated() == base
    enc = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512))
    x = torch.randn(4, 512, device="cuda")
    enc_ref = enc.cuda()(x)
    enc.cpu()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    for _ in range(2):
        with offload_component(enc, "cuda"), torch.inference_mode():
            assert torch.equal(enc(x), enc_ref)
        assert torch.cuda.memory_allocated() == base
