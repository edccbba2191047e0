"""The umT5-XXL text encoder of Wan2.1: prompts -> one `[L_i, 4096]` context tensor per prompt.

The network is transformers' `UMT5EncoderModel`, which computes what Wan's own T5 encoder
computes: RMS norms (fp32 statistics), attention without 1/sqrt(d) scaling plus a per-layer
bidirectional relative position bias (32 buckets, max distance 128), the gated FFN
`wo(gelu_tanh(wi_0 x) * wi_1 x)` (Wan's formula is transformers' "gelu_new"), final norm. We use
the "eager" attention, whose op sequence (bf16 scores + bias, softmax computed in fp32 and
rounded back, masked keys at dtype-min) is the official one; the model weights all stay in the
compute dtype (transformers' `from_pretrained` would keep `wo` in fp32; Wan does not).

`encode` reproduces Wan's `T5EncoderModel.__call__`: clean the prompts, tokenize with `</s>`,
pad/truncate to 512, run the whole batch with the attention mask, and cut each output to its
true token count (the mask sum). The DiT zero-pads the contexts back to 512 itself.

The model is built on the meta device and the memory-mapped tensors are assigned to it, so the
weights are never held twice in RAM; the architecture is read off the tensor shapes, so tiny
test checkpoints load through the same path as the 5.7 B-parameter one. Files (every layout)
and tokenizers are found and read by `wan_core.loading.t5.load_text_encoder`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from .errors import CheckpointError
from .tokenizer import TokenizerError, UMT5Tokenizer

__all__ = ["WanTextEncoder", "umt5_config_from_state_dict", "build_umt5_encoder"]

_REL_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
_Q = "encoder.block.0.layer.0.SelfAttention.q.weight"
_WI_0 = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"


def umt5_config_from_state_dict(sd: dict[str, torch.Tensor]):
    """A transformers `UMT5Config` whose dimensions are read off a transformers-named state dict.

    Not derivable from shapes, and fixed by umT5: max relative distance 128, eps 1e-6, gated GELU.
    """
    from transformers import UMT5Config

    for key in ("shared.weight", _REL_BIAS, _Q, _WI_0):
        if key not in sd:
            raise CheckpointError(f"umT5 checkpoint lacks {key}; cannot infer the architecture")
    vocab_size, d_model = sd["shared.weight"].shape
    num_buckets, num_heads = sd[_REL_BIAS].shape
    inner_dim = sd[_Q].shape[0]  # num_heads * d_kv
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    num_layers = max(blocks) + 1
    return UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner_dim // num_heads,
        d_ff=sd[_WI_0].shape[0],
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )


def build_umt5_encoder(sd: dict[str, torch.Tensor]):
    """`UMT5EncoderModel` built on meta with `sd`'s tensors assigned (their dtype and device kept).

    `sd` is in transformers names with the tied `encoder.embed_tokens.weight` included, as
    `convert_umt5_state_dict` returns it. Missing, extra or misshapen tensors are a CheckpointError.
    """
    from transformers import UMT5EncoderModel

    config = umt5_config_from_state_dict(sd)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(
                "wrong shapes " + ", ".join(f"{k}: {list(sd[k].shape)} != {list(expected[k])}" for k in wrong[:5])
            )
        raise CheckpointError("umT5 encoder weights do not fit the inferred architecture: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # one parameter under both names
    return model.requires_grad_(False).eval()


class WanTextEncoder:
    """umT5-XXL encoder + tokenizer with Wan's exact prompt -> context semantics."""

    def __init__(self, model, tokenizer: UMT5Tokenizer | None = None):
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
            raise TokenizerError(
                f"tokenizer has {len(tokenizer)} tokens but the encoder's embedding only "
                f"{model.config.vocab_size} rows: wrong tokenizer for this checkpoint"
            )

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    def to(self, *args, **kwargs) -> WanTextEncoder:
        self.model.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> list[torch.Tensor]:
        """One context `[L_i, d_model]` per prompt, L_i = its token count with `</s>` (<= 512)."""
        if self.tokenizer is None:
            raise TokenizerError("this text encoder was built without a tokenizer; use encode_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            return []
        ids, mask = self.tokenizer(prompts)
        return self.encode_ids(ids, mask)

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Run the encoder on `[B, L]` ids with their `[B, L]` 0/1 mask; cut each row to its mask sum."""
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, d_model]
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [h[:n] for h, n in zip(hidden, lengths)]
