"""The model cache's lease and the layer stack: two specs with different LoRAs alternating over one
cached DiT each get the weights of a fresh build; a lease held in one thread keeps another spec out
until it ends; the layers are applied in the declared order and recorded in one typed record."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from wan_core.layers.offload import OffloadOptions, offload_handle
from wan_core.layers.stack import ORDER, LayerState, apply_layers, layer_state
from wan_core.loading.tiny import write_tiny_model
from wan_core.model_cache import clear_cache, lease
from wan_core.spec import ModelSpec


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("lease") / "t2v", "t2v", "wan", seed=11)


def _out(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 2, 4, 6, generator=g), [torch.randn(7, 32, generator=g)]
    with torch.no_grad():
        return model(x, torch.tensor([700.0]), ctx)


def _fresh(spec: ModelSpec) -> torch.Tensor:
    """The output of a DiT built from nothing for `spec` (the cache emptied before and after)."""
    clear_cache()
    with lease(spec) as model:
        out = _out(model)
    clear_cache()
    return out


@pytest.mark.parametrize("offload", [None, "block"])
def test_alternating_leases_give_fresh_weights(model_dir, loras, offload):
    """Two graphs with different LoRAs in one process (the ComfyUI case): alternating leases of the one
    cached base give bitwise what a fresh model built with each spec gives, and the base is shared."""
    import warnings

    warnings.filterwarnings("ignore", message=".*saves no memory")
    a, b = loras
    base = ModelSpec(dit=model_dir, dtype="fp32", device="cpu", offload=offload)
    one, two = base.replace(loras=((a, 0.8),)), base.replace(loras=((b, 1.0), (a, -0.4)))
    want = {one: _fresh(one), two: _fresh(two)}
    assert not torch.equal(want[one], want[two])
    seen = set()
    for spec in (one, two, one, one, two, one):
        with lease(spec) as model:
            seen.add(id(model))
            assert torch.equal(_out(model), want[spec])
            assert (offload_handle(model) is not None) == (offload is not None)
    assert len(seen) == 1  # one cached base served both specs
    clear_cache()


def test_a_held_lease_keeps_another_spec_out(model_dir, loras):
    """Another thread's lease for other LoRAs waits until the held one ends (it never sees its weights
    change mid-run); a nested lease in the same thread that would change the model is an error."""
    a, _ = loras
    plain = ModelSpec(dit=model_dir, dtype="fp32", device="cpu")
    lora = plain.replace(loras=((a, 1.0),))
    want_plain, want_lora = _fresh(plain), _fresh(lora)
    events: list[str] = []
    other_out = {}

    def other():
        with lease(lora) as model:
            events.append("other in")
            other_out["x"] = _out(model)

    with lease(plain) as model:
        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.3)  # the other thread is now waiting on the lock (it would have run by now)
        assert events == []
        assert torch.equal(_out(model), want_plain)  # our weights, unchanged under us
        with lease(plain) as again:  # the same state nested: fine
            assert again is model
        with pytest.raises(RuntimeError, match="held by this thread"):
            with lease(lora):
                pass
        events.append("held out")
    t.join(timeout=60)
    assert events == ["held out", "other in"]
    assert torch.equal(other_out["x"], want_lora)
    clear_cache()


def test_layers_are_recorded_in_one_typed_record_in_order(model_dir, loras):
    """The declared order is one list; the lease's layers land in `LayerState`'s typed fields (no private
    attributes); a LoRA change under an attached offload detaches and re-attaches it."""
    assert ORDER == ("fp8_kernel", "compile", "lora", "offload", "sequence_parallel", "cache")
    assert tuple(f for f in LayerState.__dataclass_fields__) == ORDER
    a, _ = loras
    spec = ModelSpec(dit=model_dir, dtype="fp32", device="cpu", fp8="dequant", loras=((a, 1.0),),
                     offload=OffloadOptions("block", prefetch=2))  # fmt: skip
    clear_cache()
    import warnings

    warnings.filterwarnings("ignore", message=".*saves no memory")
    with lease(spec) as model:
        st = layer_state(model)
        assert st.fp8_kernel == "dequant" and st.compile is False
        assert st.lora.strengths == (1.0,) and st.offload is offload_handle(model) and st.offload.prefetch == 2
        assert st.sequence_parallel is None and st.cache is None
        first = st.offload
    with lease(spec.replace(loras=((a, 0.5),))) as model:
        assert layer_state(model).lora.strengths == (0.5,)
        assert layer_state(model).offload is not None and layer_state(model).offload is not first
    with lease(spec) as model, pytest.raises(ValueError, match="needs the offload layer"):
        from wan_core.layers.lora_sync import LoraLayer

        apply_layers(model, [LoraLayer(())])  # a weight change under the offload without it
    clear_cache()


@pytest.mark.parametrize(
    "dtype,fp8,residual,want",
    [("bf16", "dequant", "auto", torch.bfloat16), ("bf16", None, "auto", torch.float32),
     ("fp32", "dequant", "auto", torch.float32), ("bf16", "dequant", "fp32", torch.float32),
     ("bf16", None, "bf16", torch.bfloat16)],
)  # fmt: skip
def test_residual_dtype_auto_is_bf16_with_fp8_linears_on_a_bf16_model(model_dir, dtype, fp8, residual, want):
    """ModelSpec.residual_dtype reaches the leased DiT: 'auto' is bf16 for FP8 block linears on a
    bf16 model (fast mode, as ComfyUI and LightX2V run it), float32 otherwise; a named one is kept.
    The stream between the blocks really has that dtype, and a change rebuilds (part of the key)."""
    spec = ModelSpec(dit=model_dir, dtype=dtype, device="cpu", fp8=fp8, residual_dtype=residual)
    clear_cache()
    seen = []
    with lease(spec) as model:
        assert model.residual_dtype == want
        hook = model.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
        _out(model)
        hook.remove()
    assert seen == [want]
    other = torch.float32 if want == torch.bfloat16 else torch.bfloat16
    with lease(spec.replace(residual_dtype="float32" if other == torch.float32 else "bfloat16")) as model:
        assert model.residual_dtype == other
    clear_cache()


def test_residual_dtype_spellings_and_a_bad_one():
    spec = ModelSpec(dit="x", residual_dtype="bf16")
    assert spec.residual_dtype == "bfloat16" and spec.replace(residual_dtype="fp32").residual_dtype == "float32"
    assert ModelSpec(dit="x").residual_dtype == "auto"
    with pytest.raises(ValueError, match="residual_dtype must be one of"):
        ModelSpec(dit="x", residual_dtype="float16")
    with pytest.raises(ValueError, match="residual_dtype must be one of"):
        ModelSpec(dit="x", residual_dtype=None)
