"""The umT5 tokenizer as Wan2.1 uses it: clean the prompt, add `</s>`, pad/truncate to 512.

Sources a user may have, all turned into the same transformers `T5Tokenizer`:
- the `google/umt5-xxl/` folder of a Wan-AI model (`tokenizer.json` + `spiece.model`): loaded with
  `AutoTokenizer.from_pretrained(folder, local_files_only=True)`, exactly as the official code does;
- a folder or file with only the sentencepiece model (`spiece.model`);
- the raw sentencepiece model bytes that ComfyUI stores inside its umT5 checkpoints as the uint8
  tensor `spiece_model`.
A bare sentencepiece model is converted by transformers itself (`T5TokenizerFast.from_pretrained`
on a folder holding only `spiece.model`; the conversion reads the model with protobuf).

Prompt cleaning follows the official `clean='whitespace'` path: `ftfy.fix_text`, HTML unescape
twice, strip, and collapse whitespace runs into one space.

`write_tiny_tokenizer` trains a small sentencepiece model at run time and writes a folder in the
`google/umt5-xxl` layout, for tests and tiny demo models (no download, no network).
"""

from __future__ import annotations

import html
import io
import logging
import os
import random
import tempfile
import warnings
from collections.abc import Sequence

import ftfy
import regex
import torch

__all__ = [
    "TokenizerError",
    "UMT5Tokenizer",
    "clean_prompt",
    "load_tokenizer",
    "write_tiny_tokenizer",
]

log = logging.getLogger(__name__)

TEXT_LEN = 512  # Wan's text_len: every prompt is padded / truncated to this many tokens


class TokenizerError(ValueError):
    """A tokenizer source is missing or is not a usable umT5 / sentencepiece tokenizer."""


# ----------------------------------------------------------------------------- prompt cleaning

_WHITESPACE_RUN = regex.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: fix text, HTML-unescape twice, collapse whitespace, strip."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip()


# ----------------------------------------------------------------------------- loading


def _from_spiece_bytes(model_proto: bytes):
    """A transformers T5 tokenizer made from a bare sentencepiece model by transformers itself.

    The bytes are written as `spiece.model` into a temporary folder and loaded with
    `T5TokenizerFast.from_pretrained`, whose own conversion (needs protobuf) reads the pieces,
    scores and normalizer table, on transformers 4 and 5 alike. No extra ids are added, as in
    ComfyUI, which tokenizes with plain sentencepiece.
    """
    import sentencepiece
    from transformers import T5TokenizerFast

    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    except Exception as e:
        raise TokenizerError(f"not a sentencepiece model ({type(e).__name__}: {e})") from e
    if sp.pad_id() != 0 or sp.eos_id() != 1 or sp.unk_id() != 2:
        raise TokenizerError(
            "sentencepiece model does not have the T5 special ids (<pad>=0, </s>=1, <unk>=2): "
            f"got pad={sp.pad_id()}, eos={sp.eos_id()}, unk={sp.unk_id()}"
        )
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "spiece.model"), "wb") as f:
            f.write(model_proto)
        try:
            tok = T5TokenizerFast.from_pretrained(
                folder, extra_ids=0, legacy=True, eos_token=sp.id_to_piece(1), unk_token=sp.id_to_piece(2),
                pad_token=sp.id_to_piece(0), local_files_only=True,
            )  # fmt: skip
        except Exception as e:  # e.g. ImportError: transformers' conversion needs protobuf
            raise TokenizerError(f"transformers could not convert this sentencepiece model ({type(e).__name__}: {e})") from e
    if len(tok) != sp.get_piece_size():
        raise TokenizerError(f"converted tokenizer has {len(tok)} tokens, the sentencepiece model {sp.get_piece_size()}")
    return tok


def _from_folder(folder: str):
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as e:
            if not os.path.isfile(os.path.join(folder, "spiece.model")):
                raise TokenizerError(f"{folder}: transformers could not load this tokenizer ({e})") from e
            log.warning("%s: AutoTokenizer failed (%s); building the tokenizer from spiece.model", folder, e)
    spiece = os.path.join(folder, "spiece.model")
    if os.path.isfile(spiece):
        with open(spiece, "rb") as f:
            return _from_spiece_bytes(f.read())
    raise TokenizerError(f"{folder}: no tokenizer.json or spiece.model (expected a google/umt5-xxl folder)")


class UMT5Tokenizer:
    """Prompts -> (ids, mask), each `[B, text_len]` int64, with Wan's cleaning and padding.

    `hf` is the underlying transformers tokenizer (for callers that need the vocabulary).
    """

    def __init__(self, hf_tokenizer, text_len: int = TEXT_LEN, clean: bool = True):
        self.hf = hf_tokenizer
        self.text_len = text_len
        self.clean = clean

    def __len__(self) -> int:
        return len(self.hf)

    def __call__(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.clean:
            prompts = [clean_prompt(p) for p in prompts]
        lengths = [len(ids) for ids in self.hf(list(prompts), add_special_tokens=True).input_ids]
        if max(lengths, default=0) > self.text_len:
            warnings.warn(
                f"a prompt of {max(lengths)} tokens is cut to the text encoder's {self.text_len} "
                f"(text_len): the words after about token {self.text_len} have no effect", stacklevel=2,
            )  # fmt: skip
        out = self.hf(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return out.input_ids, out.attention_mask


def load_tokenizer(source, text_len: int = TEXT_LEN) -> UMT5Tokenizer:
    """A `UMT5Tokenizer` from a `google/umt5-xxl` folder, a `spiece.model` file, or model bytes.

    `source` may also be the uint8 tensor `spiece_model` of a ComfyUI checkpoint. Nothing is
    ever fetched from the network: a path that does not exist is an error.
    """
    if isinstance(source, UMT5Tokenizer):
        return source
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    if isinstance(source, (bytes, bytearray)):
        return UMT5Tokenizer(_from_spiece_bytes(bytes(source)), text_len)
    path = os.fspath(source)
    if os.path.isdir(path):
        return UMT5Tokenizer(_from_folder(path), text_len)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return UMT5Tokenizer(_from_spiece_bytes(f.read()), text_len)
    raise TokenizerError(f"tokenizer not found: {path} (expected the google/umt5-xxl folder or a spiece.model file)")


# ----------------------------------------------------------------------------- tiny tokenizer

_SYLLABLES = (
    "ka ri to mo na se lu vi da pe zo gu ha ne so bi fa ju ke lo mi ru ta wo ya "
    "an en in on un ar er or st th ch sh qu"
).split()
_WORDS = (
    "a the red fox cat dog bird city night rain snow ocean river forest mountain sky sun light "
    "camera slowly moves forward close up shot wide angle cinematic realistic anime painting "
    "girl boy woman man walking running dancing smiling flying golden hour sunset clouds street "
    "café naïve 東京 夜 雨 你好 世界 über straße"
).split()


def _tiny_corpus(num_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    made_up = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(2000)]
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(_WORDS) if rng.random() < 0.5 else rng.choice(made_up) for _ in range(rng.randint(4, 18))]
        lines.append(" ".join(words) + rng.choice([".", ",", "!", "?", ""]))
    return lines


def write_tiny_tokenizer(folder: str | os.PathLike, vocab_size: int = 384, seed: int = 0) -> str:
    """Train a small umT5-style sentencepiece model and write it as a `google/umt5-xxl` folder.

    The model has the T5 special ids (<pad>=0, </s>=1, <unk>=2, no <s>) and the default
    `nmt_nfkc` normalizer of the real one. The folder gets `spiece.model` plus the files
    `AutoTokenizer` reads offline (`tokenizer.json`, `tokenizer_config.json`). Deterministic for
    a given seed. Returns the folder path.
    """
    import sentencepiece

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_tiny_corpus(1500, seed)),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        minloglevel=2,
    )
    model_proto = buf.getvalue()
    _from_spiece_bytes(model_proto).save_pretrained(folder)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(model_proto)
    return folder
