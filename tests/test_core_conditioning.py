"""ComfyUI's core Wan conditioning (CLIPLoader type wan + CLIPTextEncode) into our samplers, without ComfyUI.

ComfyUI's umT5 path tokenizes to at least 512 tokens (prompt, </s>, then pad id 0), masks the
pads out of the encoder's attention and zeroes their output rows: CONDITIONING is
[[tensor [1, 512, 4096], {"pooled_output": None}]]. Our encoder returns the prompt's rows only and
the DiT zero-pads to 512 itself. These tests build that core format (from our own features, and
independently from transformers' UMT5 run the way ComfyUI runs it) and check that the sampler
given it produces the latent of our own WanTextEncode path. The same through a real ComfyUI:
tests/test_comfyui_core_conditioning.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from nodes import NODE_CLASS_MAPPINGS, compat
from wan_core.api import context_from_conditioning
from wan_core.loading.tiny import COMFY_NAMES, write_tiny_model

TEXT_LEN = 512
SIZE = dict(width=64, height=48, num_frames=5, steps=2, shift=5.0, scheduler="unipc", seed=3)


def core(features: torch.Tensor, **extra) -> list:
    """Our features [L, D] as ComfyUI's CLIPTextEncode returns them: zero rows up to 512, batch of one."""
    padded = torch.cat([features, features.new_zeros(TEXT_LEN - features.shape[0], features.shape[1])])
    return [[padded[None], {"pooled_output": None, **extra}]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = write_tiny_model(tmp_path_factory.mktemp("core_cond") / "models", "t2v", "comfyui")
    compat.set_models_root(root)
    yield root
    compat.set_models_root()


def _model():
    names = [os.path.basename(COMFY_NAMES[k]) for k in ("t2v", "t5", "vae")]
    return NODE_CLASS_MAPPINGS["WanModelLoader"]().load(names[0], names[1], names[2], "(none)")[0]


def _embeds(model, prompt="a fox in the snow", negative="blurry, static"):
    return NODE_CLASS_MAPPINGS["WanTextEncode"]().encode(model, prompt, negative)["result"][0]


def _sample(cls="WanSampler", guidance=5.0, **inputs):
    out = NODE_CLASS_MAPPINGS[cls]().sample(guidance=guidance, **SIZE, **inputs)
    return out["result"][0]["samples"]


def test_padded_core_conditioning_is_our_features_exactly(tiny):
    text = _embeds(_model())
    for feats in (text.positive, text.negative):
        got = context_from_conditioning(core(feats))
        assert got.dtype == torch.float32 and torch.equal(got, feats.float())
    # ComfyUI may hand a half tensor (fp16 text encoder output kept as is): widened, not refused
    half = context_from_conditioning(core(text.positive.half()))
    assert torch.equal(half, text.positive.half().float())


def test_sampler_given_core_conditioning_makes_the_same_latent(tiny):
    model = _model()
    text = _embeds(model)
    ours = _sample(model=model, text_embeds=text)
    theirs = _sample(model=model, positive=core(text.positive), negative=core(text.negative))
    assert torch.equal(ours, theirs)
    # the negative matters (guards against it being dropped on the way)
    other = _sample(model=model, positive=core(text.positive), negative=core(text.positive))
    assert not torch.allclose(ours, other)
    # guidance 1 runs without a negative
    no_cfg = _sample(model=model, guidance=1.0, positive=core(text.positive))
    assert torch.equal(no_cfg, _sample(model=model, guidance=1.0, text_embeds=text))


def test_multigpu_sampler_takes_core_conditioning(tiny):
    model = _model()
    text = _embeds(model)
    par = dict(num_gpus=1, ulysses_degree=1, ring_degree=1, cfg_parallel=False)
    ours = _sample("WanMultiGPUSampler", model=model, text_embeds=text, **par)
    theirs = _sample(
        "WanMultiGPUSampler", model=model, positive=core(text.positive), negative=core(text.negative), **par
    )
    assert torch.equal(ours, theirs)


def test_comfyui_style_masked_encoding_matches_our_encoder(tiny):
    """The padding claim itself, independently of our encoder: transformers' UMT5 on 512 tokens
    (pad id 0 after </s>, attention mask, masked rows zeroed, as ComfyUI's SDClipModel does),
    trimmed by `context_from_conditioning`, equals our encoder's features of the prompt."""
    sentencepiece = pytest.importorskip("sentencepiece")
    from safetensors.torch import load_file

    from wan_core.loading.tiny import tiny_t5

    sd = load_file(os.path.join(tiny, COMFY_NAMES["t5"]))
    sp = sentencepiece.SentencePieceProcessor(model_proto=sd["spiece_model"].numpy().tobytes(), add_eos=True)
    prompt = "a fox in the snow"
    ids = sp.encode(prompt)  # the prompt's pieces and </s> (ComfyUI's SPieceTokenizer, add_eos)
    tokens = torch.tensor([ids + [0] * (TEXT_LEN - len(ids))])
    mask = (torch.arange(TEXT_LEN) < len(ids)).long()[None]
    t5 = tiny_t5(sp.get_piece_size(), seed=0)  # the weights write_tiny_model stored (seed 0)
    with torch.no_grad():
        hidden = t5(input_ids=tokens, attention_mask=mask).last_hidden_state * mask[..., None]  # [1, 512, D]
    got = context_from_conditioning([[hidden, {"pooled_output": None}]])
    ours = _embeds(_model(), prompt).positive.float()
    assert got.shape == ours.shape == (len(ids), ours.shape[1])
    torch.testing.assert_close(got, ours, rtol=1e-5, atol=1e-5)


def test_what_cannot_be_honoured_is_an_error(tiny):
    feats = torch.randn(7, 32)
    with pytest.raises(ValueError, match="2 entries"):
        context_from_conditioning(core(feats) + core(feats))  # ConditioningCombine
    with pytest.raises(ValueError, match="concat_latent_image"):
        context_from_conditioning(core(feats, concat_latent_image=torch.zeros(1, 16, 2, 4, 4)))  # core I2V
    with pytest.raises(ValueError, match="start_percent"):
        context_from_conditioning(core(feats, start_percent=0.5))
    long = torch.randn(1, 600, 32)
    with pytest.warns(UserWarning, match="600 tokens is cut"):  # as our encoder cuts a long prompt
        assert torch.equal(context_from_conditioning([[long, {}]]), long[0, :TEXT_LEN])
    with pytest.raises(ValueError, match=r"\[1, tokens, features\]"):
        context_from_conditioning([[torch.randn(2, 512, 32), {}]])
    with pytest.raises(ValueError, match="CONDITIONING"):
        context_from_conditioning(feats)
    # ConditioningZeroOut: one zero row, which the DiT pads to the same all-zero context
    zero = context_from_conditioning([[torch.zeros(1, 512, 32), {"pooled_output": None}]])
    assert zero.shape == (1, 32) and not zero.any()


def test_sampler_input_errors(tiny):
    model = _model()
    text = _embeds(model)
    with pytest.raises(ValueError, match="not both"):
        _sample(model=model, text_embeds=text, positive=core(text.positive))
    with pytest.raises(ValueError, match="no prompt"):
        _sample(model=model)
    with pytest.raises(ValueError, match="needs a negative"):
        _sample(model=model, positive=core(text.positive))
    clip_l = [[torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 768)}]]  # an SD CLIPTextEncode
    with pytest.raises(ValueError, match="768 wide"):
        _sample(model=model, guidance=1.0, positive=clip_l)
