"""umT5 text encoder: loading every layout, tokenizing, and Wan's prompt -> context semantics.

The reference outputs come from (a) transformers' `UMT5EncoderModel` run directly on the same
random weights and token ids, and (b) a small functional re-statement of Wan's own T5 encoder
math applied to the Wan-named state dict, which checks the key map's meaning (e.g. which FFN
branch carries the GELU) rather than only its round trip.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import sentencepiece
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from wan_core.loading.io import CheckpointError
from wan_core.loading.t5 import (
    convert_umt5_state_dict,
    detect_layout,
    load_text_encoder,
    transformers_key_to_wan,
    transformers_to_wan,
    wan_key_to_transformers,
    wan_to_transformers,
)
from wan_core.models.text_encoder import build_umt5_encoder, umt5_config_from_state_dict
from wan_core.models.tokenizer import TokenizerError, clean_prompt, load_tokenizer, write_tiny_tokenizer

LAYOUTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference", "checkpoint_layouts")

HEADS = 4
PROMPTS = [
    "a red fox runs through the snow",
    "東京 夜 雨, cinematic close up shot",
    "",
    "  kari   tomona\n sevi &amp;amp; \u201cquoted\u201d  ",
    " ".join(["forest river mountain karito"] * 200),  # > 512 tokens: truncated
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "umt5-xxl")


@pytest.fixture(scope="module")
def hf_model(tok_dir):
    """A tiny random transformers UMT5 encoder, fp32, with non-trivial norms and position biases."""
    from transformers import UMT5Config, UMT5EncoderModel

    vocab = len(load_tokenizer(tok_dir)) + 16  # embedding padded past the tokenizer, as 256384 > 256300
    cfg = UMT5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=HEADS,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = UMT5EncoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)  # distinct norms: a norm1/norm2 mix-up must show
            elif "relative_attention_bias" in name:
                p.normal_(0.0, 1.0)
            elif name.endswith(("q.weight", "k.weight")):
                p.mul_(2.0)  # more peaked attention, so the position bias and mask matter
    return model


@pytest.fixture(scope="module")
def hf_sd(hf_model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in hf_model.state_dict().items()}


@pytest.fixture(scope="module")
def wan_pth(tmp_path_factory, hf_sd) -> str:
    path = str(tmp_path_factory.mktemp("wan") / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save(transformers_to_wan(hf_sd), path)
    return path


def reference_outputs(hf_model, tok_dir, prompts) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """transformers run directly: official tokenizer call on cleaned prompts, model, trim."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    enc = tok([clean_prompt(p) for p in prompts], padding="max_length", truncation=True, max_length=512,
              add_special_tokens=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        out = hf_model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    lengths = enc.attention_mask.sum(1).tolist()
    return [o[:n] for o, n in zip(out, lengths)], enc.input_ids, enc.attention_mask


def _bucket(rel: torch.Tensor, num_buckets: int, max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 bucket of (key - query): half the buckets per sign, exact then log-spaced."""
    half = num_buckets // 2
    exact = half // 2
    dist = rel.abs()
    log_part = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
    far = (exact + log_part.long()).clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(dist < exact, dist, far)


def wan_math(sd: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Wan's T5 encoder forward, written out on Wan-named fp32 weights: [B, L] -> [B, L, C]."""

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    x = sd["token_embedding.weight"][ids]  # [B, L, C]
    b, n = ids.shape
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # [Lq, Lk]: key - query
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}."
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = (h @ sd[p + f"attn.{c}.weight"].T for c in "qkv")
        q, k, v = (t.view(b, n, heads, -1) for t in (q, k, v))  # [B, L, H, D]
        table = sd[p + "pos_embedding.embedding.weight"]  # [buckets, H]
        bias = table[_bucket(rel, table.shape[0])].permute(2, 0, 1)  # [H, Lq, Lk]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) + bias  # no 1/sqrt(d)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        att = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, n, -1)
        x = x + att @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        gated = F.gelu(h @ sd[p + "ffn.gate.0.weight"].T, approximate="tanh") * (h @ sd[p + "ffn.fc1.weight"].T)
        x = x + gated @ sd[p + "ffn.fc2.weight"].T
        i += 1
    return rms(x, sd["norm.weight"])


# ----------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_folder_and_every_source_agree(tok_dir):
    from transformers import AutoTokenizer

    assert {"spiece.model", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tok_dir))
    auto = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)  # offline, from tokenizer.json
    assert 256 <= len(auto) <= 1000
    with open(os.path.join(tok_dir, "spiece.model"), "rb") as f:
        proto = f.read()
    sources = [tok_dir, os.path.join(tok_dir, "spiece.model"), proto, torch.tensor(list(proto), dtype=torch.uint8)]
    toks = [load_tokenizer(s) for s in sources]
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    ids0, mask0 = toks[0](PROMPTS)
    assert ids0.shape == mask0.shape == (len(PROMPTS), 512) and ids0.dtype == torch.int64
    for t in toks[1:]:
        ids, mask = t(PROMPTS)
        assert torch.equal(ids, ids0) and torch.equal(mask, mask0)
    for i, p in enumerate(PROMPTS):
        want = sp.encode(clean_prompt(p))[:511] + [1]  # plain sentencepiece + </s>, truncated keeping </s>
        n = int(mask0[i].sum())
        assert ids0[i, :n].tolist() == want
        assert ids0[i, n - 1] == 1 and (ids0[i, n:] == 0).all() and (mask0[i, n:] == 0).all()
    assert mask0.sum(1).tolist()[2] == 1  # the empty prompt is just </s>
    assert mask0.sum(1).tolist()[4] == 512  # the long prompt is truncated


def test_clean_prompt_follows_wan_whitespace_clean():
    assert clean_prompt("  a \n\t b  ") == "a b"
    assert clean_prompt("fish &amp;amp; chips") == "fish & chips"  # unescaped twice
    assert clean_prompt("\u201cquoted\u201d \u2018x\u2019") == "\"quoted\" 'x'"  # ftfy uncurls quotes
    assert clean_prompt("a\x00b\ufeff c") == "ab c"
    assert clean_prompt("e\u0301") == "\u00e9"  # NFC


# ----------------------------------------------------------------------------- equality with references


def test_wan_pth_equals_transformers_and_wan_math(hf_model, hf_sd, tok_dir, wan_pth):
    enc = load_text_encoder(wan_pth, tokenizer=tok_dir, dtype=torch.float32)
    ours = enc.encode(PROMPTS)
    ref, ids, mask = reference_outputs(hf_model, tok_dir, PROMPTS)
    math_out = wan_math(torch.load(wan_pth, weights_only=True), ids, mask, HEADS)
    assert len(ours) == len(PROMPTS)
    for i, (o, r) in enumerate(zip(ours, ref)):
        n = int(mask[i].sum())
        assert o.shape == (n, 32) and o.dtype == torch.float32
        assert rel_err(o, r) <= 1e-5
        assert rel_err(o, math_out[i, :n]) <= 1e-5
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(tok_dir, "spiece.model"))
    assert [o.shape[0] for o in ours] == [min(len(sp.encode(clean_prompt(p))) + 1, 512) for p in PROMPTS]
    # a single string is one prompt
    assert torch.allclose(enc.encode(PROMPTS[0])[0], ours[0], rtol=0, atol=1e-6)


def test_bf16_equals_transformers_bf16(hf_model, tok_dir, wan_pth):
    import copy

    enc = load_text_encoder(wan_pth, tokenizer=tok_dir, dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in enc.model.parameters())
    ref16, _, _ = reference_outputs(copy.deepcopy(hf_model).to(torch.bfloat16), tok_dir, PROMPTS[:2])
    ref32, _, _ = reference_outputs(hf_model, tok_dir, PROMPTS[:2])
    for o, r16, r32 in zip(enc.encode(PROMPTS[:2]), ref16, ref32):
        assert o.dtype == torch.bfloat16 and torch.equal(o, r16)  # same weights, same ops: bitwise
        # bf16 vs fp32 (measured ~1.7%): bf16 rounding of the deliberately large attention logits
        assert rel_err(o, r32) <= 5e-2


@pytest.mark.parametrize("prefix", ["", "umt5xxl.transformer."])
@pytest.mark.parametrize("with_tied_copy", [False, True])
def test_comfyui_layout_round_trips(tmp_path, hf_model, hf_sd, tok_dir, prefix, with_tied_copy):
    sd = {prefix + k: v for k, v in hf_sd.items() if with_tied_copy or k != "encoder.embed_tokens.weight"}
    with open(os.path.join(tok_dir, "spiece.model"), "rb") as f:
        sd["spiece_model"] = torch.tensor(list(f.read()), dtype=torch.uint8)
    path = str(tmp_path / "umt5_xxl_fp16.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    assert detect_layout(sd) == ("transformers", prefix)
    enc = load_text_encoder(path, dtype=torch.float32)  # tokenizer from the embedded spiece_model
    ref, _, _ = reference_outputs(hf_model, tok_dir, PROMPTS)
    for o, r in zip(enc.encode(PROMPTS), ref):
        assert o.shape == r.shape and rel_err(o, r) <= 1e-5


def _fp8_per_tensor(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """ComfyUI 'fp8_scaled': every linear as float8_e4m3fn with a per-tensor fp32 scale_weight."""
    out = {}
    for k, v in sd.items():
        if k.endswith(("q.weight", "k.weight", "v.weight", "o.weight", "wi_0.weight", "wi_1.weight", "wo.weight")):
            scale = v.abs().max() / 448.0
            out[prefix + k] = (v / scale).to(torch.float8_e4m3fn)
            out[prefix + k[: -len("weight")] + "scale_weight"] = scale.float().reshape(())
            out[prefix + k[: -len("weight")] + "scale_input"] = torch.ones(())
        elif k != "encoder.embed_tokens.weight":
            out[prefix + k] = v
    out[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def test_comfyui_fp8_scaled_dequantizes(tmp_path, hf_model, hf_sd, tok_dir):
    from transformers import UMT5EncoderModel

    sd = _fp8_per_tensor(hf_sd, prefix="umt5xxl.transformer.")
    path = str(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    save_file(sd, path)
    enc = load_text_encoder(path, tokenizer=tok_dir, dtype=torch.float32)
    # the loaded weights are exactly fp8 * scale
    name = "encoder.block.1.layer.1.DenseReluDense.wi_0.weight"
    p = "umt5xxl.transformer."
    want = sd[p + name].float() * sd[p + name.replace("weight", "scale_weight")]
    assert torch.equal(enc.model.state_dict()[name], want)
    assert sd[p + name.replace("weight", "scale_weight")] < 0.01  # a forgotten scale would be far off
    # equal to transformers on the dequantized weights ...
    deq = convert_umt5_state_dict(sd, torch.float32).state_dict
    ref_model = UMT5EncoderModel(hf_model.config).eval()
    ref_model.load_state_dict(deq)
    ref_q, _, _ = reference_outputs(ref_model, tok_dir, PROMPTS)
    ref, _, _ = reference_outputs(hf_model, tok_dir, PROMPTS)
    worst = 0.0
    for o, rq, r in zip(enc.encode(PROMPTS), ref_q, ref):
        assert rel_err(o, rq) <= 1e-5
        worst = max(worst, rel_err(o, r))
    # ... and within fp8 rounding of the unquantized model. e4m3 keeps 3 mantissa bits: each weight
    # moves by <= 2^-4 of itself, ~3% RMS over a tensor (checked here). This tiny model's large
    # attention logits amplify weight noise (the 32x finer bf16 rounding already moves its output
    # by ~1.7%), so fp8 moves it by ~11%; a lost scale or a swapped tensor moves it by O(1).
    weight_err = rel_err(want, hf_sd[name])
    assert 0.01 < weight_err < 0.05
    assert 1e-3 < worst <= 0.3


def test_quantized_wan_layout_with_per_channel_scales():
    """lightx2v-style Wan names with int8 weights and `weight_scale` [out, 1]."""
    w = torch.randint(-127, 128, (6, 4), dtype=torch.int8)
    s = torch.rand(6, 1) * 0.01
    sd = {"blocks.0.ffn.fc1.weight": w, "blocks.0.ffn.fc1.weight_scale": s, "token_embedding.weight": torch.randn(8, 4),
          "blocks.0.ffn.gate.0.weight": torch.randn(6, 4, dtype=torch.bfloat16)}  # fmt: skip
    ck = convert_umt5_state_dict(sd, torch.float32)
    assert ck.layout == "wan" and ck.quantized
    assert torch.equal(ck.state_dict["encoder.block.0.layer.1.DenseReluDense.wi_1.weight"], w.float() * s)
    assert ck.state_dict["encoder.embed_tokens.weight"] is ck.state_dict["shared.weight"]
    bad = dict(sd, **{"blocks.0.ffn.fc1.weight_scale": torch.rand(3)})
    with pytest.raises(CheckpointError, match="does not fit"):
        convert_umt5_state_dict(bad, torch.float32)


def test_no_second_copy_when_dtype_matches(wan_pth, tok_dir):
    raw = torch.load(wan_pth, weights_only=True, mmap=True)
    ck = convert_umt5_state_dict(raw, torch.float32)
    assert ck.state_dict["shared.weight"] is raw["token_embedding.weight"]
    model = build_umt5_encoder(ck.state_dict)
    assert model.shared.weight.data_ptr() == raw["token_embedding.weight"].data_ptr()
    assert model.encoder.embed_tokens.weight is model.shared.weight
    q = model.encoder.block[1].layer[0].SelfAttention.q.weight
    assert q.data_ptr() == raw["blocks.1.attn.q.weight"].data_ptr()


def test_wan_folder_finds_its_tokenizer(tmp_path, hf_model, hf_sd, tok_dir):
    import shutil

    shutil.copytree(tok_dir, tmp_path / "google" / "umt5-xxl")
    path = str(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save(transformers_to_wan(hf_sd), path)
    enc = load_text_encoder(path, dtype=torch.float32)
    ref, _, _ = reference_outputs(hf_model, tok_dir, PROMPTS[:2])
    for o, r in zip(enc.encode(PROMPTS[:2]), ref):
        assert rel_err(o, r) <= 1e-5


# ----------------------------------------------------------------------------- key maps at full size


def _layout(name: str) -> dict[str, tuple[int, ...]]:
    with open(os.path.join(LAYOUTS, name)) as f:
        return {k: tuple(v) for k, v in json.load(f)["tensors"].items()}


def test_key_maps_cover_the_real_lists_both_ways():
    wan = _layout("umt5_xxl_encoder_wan.json")
    hf = _layout("umt5_xxl_encoder_transformers.json")
    assert len(wan) == 242 and len(hf) == 243
    mapped = {wan_key_to_transformers(k): s for k, s in wan.items()}
    assert None not in mapped
    assert mapped == {k: s for k, s in hf.items() if k != "encoder.embed_tokens.weight"}
    back = {transformers_key_to_wan(k): s for k, s in hf.items() if k != "encoder.embed_tokens.weight"}
    assert back == wan
    assert transformers_key_to_wan("encoder.embed_tokens.weight") is None
    metas = {k: torch.empty(s, device="meta") for k, s in wan.items()}
    assert {k: tuple(v.shape) for k, v in wan_to_transformers(metas).items()} == hf


def test_full_size_config_and_meta_model_match_transformers_list():
    wan = _layout("umt5_xxl_encoder_wan.json")
    hf = _layout("umt5_xxl_encoder_transformers.json")
    ck = convert_umt5_state_dict({k: torch.empty(s, device="meta", dtype=torch.bfloat16) for k, s in wan.items()})
    cfg = umt5_config_from_state_dict(ck.state_dict)
    assert (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.d_ff, cfg.num_layers) == (
        256384, 4096, 64, 64, 10240, 24,
    )  # fmt: skip
    assert (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance) == (32, 128)
    assert cfg.dense_act_fn == "gelu_new" and cfg.is_gated_act
    model = build_umt5_encoder(ck.state_dict)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == hf
    assert sum(p.numel() for p in model.parameters()) == 5680910336  # the Wan file's parameter count


# ----------------------------------------------------------------------------- bad inputs


def test_not_a_t5_file(tmp_path):
    path = str(tmp_path / "dit.safetensors")
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4), "head.head.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(CheckpointError, match="not a umT5 text encoder checkpoint"):
        load_text_encoder(path, tokenizer=None)


def test_missing_or_wrong_tokenizer(tmp_path, hf_sd, tok_dir, wan_pth):
    with pytest.raises(TokenizerError, match="no tokenizer given"):
        load_text_encoder(wan_pth)
    with pytest.raises(TokenizerError, match="tokenizer not found"):
        load_text_encoder(wan_pth, tokenizer=str(tmp_path / "google" / "umt5-xxl"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json or spiece.model"):
        load_tokenizer(str(empty))
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        load_tokenizer(b"definitely not a model")
    big = write_tiny_tokenizer(tmp_path / "big", vocab_size=500)
    with pytest.raises(TokenizerError, match="wrong tokenizer for this checkpoint"):
        load_text_encoder(wan_pth, tokenizer=big)


def test_incomplete_checkpoint(tmp_path, hf_sd):
    wan = transformers_to_wan(hf_sd)
    del wan["blocks.1.ffn.fc2.weight"]
    with pytest.raises(CheckpointError, match=r"missing \['encoder.block.1.layer.1.DenseReluDense.wo.weight'\]"):
        build_umt5_encoder(convert_umt5_state_dict(wan).state_dict)
    odd = dict(transformers_to_wan(hf_sd), **{"blocks.0.attn.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected key"):
        convert_umt5_state_dict(odd)
