"""The torch-free Hugging Face tokenizer (clipserve/contract/tokenizer.py) against open_clip's HFTokenizer, id
for id, for tokenizers of each family's style trained here; and the format-2 manifest entry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipserve.contract.bundle import Manifest, TokenizerSpec
from clipserve.contract.tokenizer import (
    HFTextTokenizer,
    TokenizerError,
    VocabularyNotFoundError,
    load_tokenizer,
)
from tests.fixtures.local_tokenizers import STYLES, build_tokenizer, corpus

EDGE_TEXTS = [
    "",
    " ",
    "   \t\n  ",
    "a photo of a cat",
    "A  Photo_of THE dog!!  (really?)",
    "an emoji 🐶 and an accent: café, naïve &amp; résumé",
    "Ein Foto von einem Hund; une photo d'un chien; una foto de un perro",
    "фотография собаки, 一张狗的照片, 犬の写真, صورة كلب, एक कुत्ते की तस्वीर",
    "ﬁ ligature ① ＦＵＬＬＷＩＤＴＨ e\u0301 \u00a0nbsp \u200bzero-width",
    "<s> </s> <pad> <unk> [CLS] [SEP] <bos> <eos> eng_Latn",
    "x" * 500,
    "word " * 300,
    "1234567890 3.14 1,000,000",
    "\x00control\x07chars\x1b[31m",
    "😀" * 40,
]
TEXTS = EDGE_TEXTS + corpus(200, seed=7)


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-tokenizers")
    return {style: build_tokenizer(root / style, style, vocab_size=1000) for style in STYLES}


def _open_clip(folder: Path, context_length: int, clean: str, strip_sep: bool = False):
    from open_clip.tokenizer import HFTokenizer

    return HFTokenizer(str(folder), context_length=context_length, clean=clean, strip_sep_token=strip_sep)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("clean", ["whitespace", "lower", "canonicalize"])
@pytest.mark.parametrize("context_length", [8, 64])
def test_ids_equal_open_clips_hf_tokenizer(
    tokenizer_dirs, style: str, clean: str, context_length: int
) -> None:
    folder = tokenizer_dirs[style]
    strip = style == "bert"  # CLIPA's tokenizer_kwargs
    theirs = _open_clip(folder, context_length, clean, strip)
    ours = HFTextTokenizer(
        folder / "tokenizer.json",
        context_length,
        clean=clean,
        pad_token_id=theirs.tokenizer.pad_token_id,
        strip_sep_token_id=theirs.tokenizer.sep_token_id if strip else None,
    )
    expected = theirs(TEXTS).numpy()
    batch = ours.encode(TEXTS)
    assert batch.ids.dtype == np.int64 and batch.ids.shape == (len(TEXTS), context_length)
    mismatched = [
        text for text, a, b in zip(TEXTS, batch.ids, expected, strict=True) if not np.array_equal(a, b)
    ]
    assert not mismatched, f"{len(mismatched)} texts differ, first {mismatched[0]!r}"
    # one text at a time gives the same rows as the batch
    for text, row in zip(EDGE_TEXTS, batch.ids, strict=False):
        np.testing.assert_array_equal(ours.encode([text]).ids[0], row)


@pytest.mark.parametrize("style", STYLES)
def test_texts_far_past_the_context_give_open_clips_ids(tokenizer_dirs, style: str) -> None:
    folder = tokenizer_dirs[style]
    theirs = _open_clip(folder, 64, "whitespace")
    ours = HFTextTokenizer(folder / "tokenizer.json", 64, pad_token_id=theirs.tokenizer.pad_token_id)
    long_texts = [" ".join(corpus(300, seed=seed)) for seed in range(3)] + ["a photo of a {}. " * 2000]
    assert all(len(text) > ours.max_chars for text in long_texts)
    batch = ours.encode(long_texts)
    np.testing.assert_array_equal(batch.ids, theirs(long_texts).numpy())
    assert batch.truncated == [True] * len(long_texts)


def test_lengths_and_truncation_flags(tokenizer_dirs) -> None:
    folder = tokenizer_dirs["t5"]
    ours = HFTextTokenizer(folder / "tokenizer.json", 8, clean="canonicalize")
    batch = ours.encode(["", "dog", "word " * 50])
    assert batch.truncated == [False, False, True]
    assert batch.lengths[0] == 1  # only the end token </s>
    assert batch.lengths[2] == 8 and batch.ids[2, -1] == 1  # cut to the context, </s> kept last
    assert (batch.ids[0, 1:] == 0).all()  # padded with <pad> = 0 to the full context
    assert ours.encode([]).ids.shape == (0, 8)
    with pytest.raises(TypeError, match="not a single str"):
        ours.encode("a photo")
    with pytest.raises(TypeError, match="text 1 is a int"):
        ours.encode(["ok", 3])


def test_spec_round_trip_and_refusals(tokenizer_dirs, tmp_path: Path) -> None:
    folder = tokenizer_dirs["xlm-roberta"]
    ours = HFTextTokenizer(folder / "tokenizer.json", 24, clean="whitespace", pad_token_id=1)
    spec = ours.to_spec()
    assert spec.kind == "hf" and spec.padding == "max_length" and spec.vocab_size == 1000
    assert spec.lowercase is False and spec.sot_token_id is None
    again = load_tokenizer(spec, folder)
    assert isinstance(again, HFTextTokenizer)
    np.testing.assert_array_equal(again.encode(TEXTS).ids, ours.encode(TEXTS).ids)

    with pytest.raises(TokenizerError, match=r"says 999 ids, but tokenizer\.json has 1000"):
        load_tokenizer(spec.model_copy(update={"vocab_size": 999}), folder)
    with pytest.raises(VocabularyNotFoundError, match="tokenizer file not found"):
        load_tokenizer(spec, tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read Hugging Face tokenizer"):
        load_tokenizer(spec, tmp_path)
    with pytest.raises(TokenizerError, match="pad token id 5000 is outside"):
        HFTextTokenizer(folder / "tokenizer.json", 24, pad_token_id=5000)
    with pytest.raises(ValueError, match="an hf tokenizer needs padding"):
        TokenizerSpec(kind="hf", vocab_file="tokenizer.json", context_length=16)
    with pytest.raises(ValueError, match="needs sot_token_id"):
        TokenizerSpec(vocab_file="bpe.txt.gz")


def test_format_1_manifest_loads_with_its_content_hash() -> None:
    """A manifest written before format 2 keeps its identity (cache keys, served space)."""
    manifest = {
        "format_version": 1,
        "name": "old",
        "version": 3,
        "created_at": "2026-01-01T00:00:00+00:00",
        "embed_dim": 32,
        "logit_scale": 100.0,
        "image": {
            "size": [32, 32],
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
            "fill_color": 0,
        },
        "tokenizer": {
            "kind": "clip-bpe",
            "context_length": 77,
            "vocab_file": "bpe_simple_vocab_16e6.txt.gz",
            "lowercase": True,
            "clean": "lower",
            "sot_token_id": 49406,
            "eot_token_id": 49407,
            "pad_token_id": 0,
        },
        "text": {"dynamic_length": True, "pooling": "argmax"},
        "files": [
            {"path": "image.onnx", "sha256": "a" * 64, "size": 10, "role": "image", "precision": "fp32"},
            {"path": "text.onnx", "sha256": "b" * 64, "size": 10, "role": "text", "precision": "fp32"},
        ],
        "source": {"architecture": "tiny-clip", "pretrained": "none"},
        "parity": [],
    }
    loaded = Manifest.model_validate_json(json.dumps(manifest))
    assert loaded.format_version == 1 and loaded.scoring == "softmax"
    # the hash format 1 computed for this manifest
    assert loaded.content_hash == "4335a4afdac721135c31c49cf29fd1ac736c3112af730560665a58ae83cafa83"


def test_service_side_tokenizing_needs_no_torch(tokenizer_dirs) -> None:
    code = (
        "import sys\n"
        "from clipserve.contract.tokenizer import HFTextTokenizer\n"
        f"t = HFTextTokenizer({str(tokenizer_dirs['gemma'] / 'tokenizer.json')!r}, 16, clean='canonicalize')\n"
        "assert t.encode(['a photo of a dog']).ids.shape == (1, 16)\n"
        "bad = sorted(m for m in ('torch', 'open_clip', 'transformers') if m in sys.modules)\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
