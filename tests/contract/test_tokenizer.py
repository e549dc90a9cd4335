"""The torch-free tokenizer against open_clip's own CLIP-BPE tokenizer, id for id."""

from __future__ import annotations

import gzip
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from clipserve.contract.bundle import BundleError, TokenizerSpec
from clipserve.contract.tokenizer import (
    RAW_CHARS_PER_CLEAN_CHAR,
    VOCAB_FILENAME,
    ClipTokenizer,
    TokenizedBatch,
    TokenizerError,
    VocabularyNotFoundError,
    bounded_text,
    open_clip_vocab_path,
)

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

SEED = 20261128

# fmt: off
WORDS = [
    "a", "photo", "of", "the", "Dog", "CAT", "iPhone", "McDonald's", "GPU", "eBay", "sunset", "over",
    "mountains", "Red", "bicycle", "leaning", "against", "wall", "xXx", "OpenAI", "ViT-B/32", "snake_case",
]
CONTRACTIONS = [
    "don't", "we're", "they've", "I'm", "you'll", "he'd", "it's", "ITS", "CAN'T", "'s", "'S", "'t", "'re",
    "'ve", "'m", "'ll", "'d", "'LL", "'ſ", "''", "'ll've", "rock'n'roll", "o'clock",
]
UNICODE = [
    "東京タワー", "北京烤鸭", "한국어", "ひらがな", "café", "naïve", "Ångström", "straße", "ﬁnancial", "ﬀ",
    "Ｆｕｌｌｗｉｄｔｈ", "עברית", "العربية", "مرحبا بالعالم", "e\u0301", "a\u0308\u0304", "Z̴̡a̷l̸g̶o̵", "ΑΒΓ δέλτα",
    "İstanbul", "ǅemal", "Ⅻ", "½", "x²", "٣٤", "Ελληνικά", "Русский текст", "हिन्दी", "ไทย", "cafÃ©",
    "â€œquotedâ€\x9d", "\ud83d\ude00", "\ud800", "ᴬᴮᶜ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "Ⓐⓑ", "ʼn", "K", "µ", "ﬃ",
]
EMOJI = [
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵", "🇺🇸🇫🇷", "❤️", "👩🏿‍💻", "🤷‍♀️", "1️⃣", "🫠", "🐶🐱", "©️", "™",
]
ENTITIES = [
    "&amp;", "&#39;", "&lt;b&gt;", "&amp;lt;b&amp;gt;", "&amp;amp;amp;", "&quot;", "&nbsp;", "&#x1F600;",
    "&copy;", "&notanentity;", "&", "&#xD800;", "&#0;", "AT&T", "<b>bold</b>", "&amp;#39;",
]
WHITESPACE = [
    " ", "  ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u200b", "\u2009", "\u3000", "\u2028", "\x0b", "\x0c",
    "\ufeff", "\u200d",
]
CONTROLS = ["\x00", "\x1b[31m", "\x1b[0m", "\x7f", "\x85", "\x9d", "\x08"]
PUNCTUATION = [
    "!", "?!", "...", "…", "—", "–", "“", "”", "‘", "’", "«»", "(", ")", "[]", "{}", "#", "@", "$", "%",
    "^", "*", "_", "~", "`", "|", "\\", "/", ":", ";", ",", ".", "'", '"', "<", ">", "+", "=", "-", "¿¡",
]
DIGITS = ["0", "42", "3.14159", "1,000,000", "2026-11-28", "1e-9", "٣", "१२३", "0x1F", "7th", "3D"]
URLS = [
    "https://example.com/path?q=1&x=2#frag", "www.test.org", "user@mail.com", "http://xn--bcher-kva.example/",
    "ftp://files.example.net/a_b-c.tar.gz", "https://例え.jp/パス",
]
LONG_WORDS = [
    "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis", "a" * 60,
    "Donaudampfschifffahrtsgesellschaftskapitän", "ab" * 40, "😀" * 30,
]
SPECIAL_TOKEN_TEXT = ["<start_of_text>", "<end_of_text>", "<END_OF_TEXT>", "<start_of_text>hi"]

FRAGMENT_POOLS = [
    WORDS, WORDS, WORDS, CONTRACTIONS, UNICODE, EMOJI, ENTITIES, WHITESPACE, CONTROLS, PUNCTUATION, DIGITS,
    URLS, LONG_WORDS, SPECIAL_TOKEN_TEXT,
]
RANDOM_CODEPOINT_RANGES = [
    (0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x590, 0x6FF),
    (0x2000, 0x206F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xACFF), (0xFF00, 0xFFEF),
    (0x1F300, 0x1FAFF),
]
# fmt: on

HAND_WRITTEN = [
    "",
    " ",
    "\t\n ",
    "a photo of a dog",
    "A PHOTO OF A DOG",
    "a photo of a {}.",
    "itap of a cat.",
    "a bad photo of the plane.",
    "Hello, World!",
    "It's a dog's life, isn't it? We'll see; they'd know, I'm sure, you've heard.",
    "Tom &amp; Jerry &#39;90 &lt;b&gt;bold&lt;/b&gt;",
    "&amp;amp; &amp;lt;three&amp;gt;",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp and\u200bzero\u200bwidth",
    "東京の夜景 at night",
    "emoji family 👨‍👩‍👧‍👦 flag 🇯🇵 skin 👍🏽 zwj 🏳️‍🌈",
    "RTL mixed עברית and العربية text",
    "combining: e\u0301 a\u0308 n\u0303",
    "visit https://example.com/a?b=c&d=e or mail me@example.org",
    "digits 1234567890 and ٣٤ and ½",
    "snake_case and kebab-case and CamelCase",
    "<start_of_text> injected <end_of_text> tokens",
    "a " * 75,
    "a " * 76,
    "a " * 200,
    "x" * 300,
    "word " * 80,
    "😀" * 100,
]


def _random_fragment(rng: random.Random) -> str:
    if rng.random() < 0.1:
        low, high = rng.choice(RANDOM_CODEPOINT_RANGES)
        return "".join(chr(rng.randint(low, high)) for _ in range(rng.randint(1, 6)))
    return rng.choice(rng.choice(FRAGMENT_POOLS))


def _random_text(rng: random.Random, max_fragments: int) -> str:
    parts = []
    for _ in range(rng.randint(1, max_fragments)):
        parts.append(_random_fragment(rng))
        parts.append(rng.choice(["", " ", " ", " ", rng.choice(WHITESPACE)]))
    text = "".join(parts)
    return text.upper() if rng.random() < 0.1 else text


def build_corpus() -> list[str]:
    rng = random.Random(SEED)
    generated = [_random_text(rng, 12) for _ in range(520)]
    generated += [_random_text(rng, 120) for _ in range(40)]
    return HAND_WRITTEN + generated


CORPUS = build_corpus()


@pytest.fixture(scope="module")
def vocab_path() -> Path:
    return open_clip_vocab_path()


@pytest.fixture(scope="module")
def tokenizer(vocab_path: Path) -> ClipTokenizer:
    return ClipTokenizer(vocab_path)


def _reference(texts: list[str], context_length: int, clean: str) -> tuple[np.ndarray, list[int]]:
    """open_clip's ids, and the untruncated token count of each text (start and end included)."""
    ref = open_clip_tokenizer.SimpleTokenizer(context_length=context_length, clean=clean)
    return ref(texts).numpy(), [len(ref.encode(text)) + 2 for text in texts]


def _assert_parity(batch: TokenizedBatch, texts: list[str], context_length: int, clean: str) -> None:
    ref_ids, ref_counts = _reference(texts, context_length, clean)
    assert batch.ids.dtype == np.int64 and batch.lengths.dtype == np.int64
    assert batch.ids.shape == (len(texts), context_length)
    mismatched = [repr(texts[i]) for i in range(len(texts)) if not np.array_equal(batch.ids[i], ref_ids[i])]
    assert not mismatched, f"{len(mismatched)} texts differ from open_clip, e.g. {mismatched[:3]}"
    assert batch.lengths.tolist() == [min(n, context_length) for n in ref_counts]
    assert batch.truncated == [n > context_length for n in ref_counts]


def test_corpus_is_large_and_covers_truncation() -> None:
    assert len(CORPUS) >= 500
    assert len(set(CORPUS)) >= 500
    _, counts = _reference(CORPUS, 77, "lower")
    assert sum(n > 77 for n in counts) >= 10
    assert 77 in counts, "the corpus must hold a text of exactly the context length"
    assert any(n < 10 for n in counts)


@pytest.mark.parametrize("clean", ["lower", "whitespace", "canonicalize"])
def test_parity_with_open_clip_for_each_clean_mode(vocab_path: Path, clean: str) -> None:
    _assert_parity(ClipTokenizer(vocab_path, clean=clean).encode(CORPUS), CORPUS, 77, clean)


@pytest.mark.parametrize("context_length", [2, 5, 16, 64])
def test_parity_with_open_clip_for_other_context_lengths(vocab_path: Path, context_length: int) -> None:
    texts = CORPUS[:200]
    batch = ClipTokenizer(vocab_path, context_length=context_length).encode(texts)
    _assert_parity(batch, texts, context_length, "lower")


def test_parity_matches_the_default_open_clip_model_tokenizer(tokenizer: ClipTokenizer) -> None:
    open_clip = pytest.importorskip("open_clip")
    texts = CORPUS[:100]
    assert np.array_equal(tokenizer.encode(texts).ids, open_clip.get_tokenizer("ViT-B-32")(texts).numpy())


def test_truncation_keeps_the_end_token_last_and_is_reported(tokenizer: ClipTokenizer) -> None:
    at_limit, over_limit = "a " * 75, "a " * 76
    batch = tokenizer.encode([at_limit, over_limit, "short"])
    assert batch.truncated == [False, True, False]
    assert batch.lengths.tolist() == [77, 77, 3]
    assert batch.ids[0, -1] == tokenizer.eot_token_id
    assert batch.ids[1, -1] == tokenizer.eot_token_id
    assert batch.ids[1, 0] == tokenizer.sot_token_id
    assert (batch.ids[1, 1:-1] == batch.ids[0, 1]).all()
    assert tokenizer.count_tokens(over_limit) == 78


def test_trimmed_pads_only_to_the_longest_text(tokenizer: ClipTokenizer) -> None:
    texts = ["a dog", "a photo of a small brown dog", "cat"]
    batch = tokenizer.encode(texts)
    trimmed = batch.trimmed()
    longest = tokenizer.count_tokens(texts[1])
    assert trimmed.shape == (3, longest)
    assert np.array_equal(trimmed, batch.ids[:, :longest])
    assert (batch.ids[:, longest:] == 0).all()
    assert trimmed[1, -1] == tokenizer.eot_token_id
    assert trimmed[0, batch.lengths[0] - 1] == tokenizer.eot_token_id
    assert (trimmed[0, batch.lengths[0] :] == 0).all()


def test_empty_batch(tokenizer: ClipTokenizer) -> None:
    batch = tokenizer.encode([])
    assert batch.ids.shape == (0, 77)
    assert batch.trimmed().shape == (0, 0)
    assert batch.truncated == []


def test_count_tokens_matches_open_clip_without_truncation(tokenizer: ClipTokenizer) -> None:
    texts = CORPUS[:150]
    _, ref_counts = _reference(texts, 77, "lower")
    assert [tokenizer.count_tokens(t) for t in texts] == ref_counts
    assert tokenizer.count_tokens("") == 2
    assert tokenizer.count_tokens("word " * 200) == 202


def test_special_ids_and_spec_round_trip(tokenizer: ClipTokenizer, vocab_path: Path, tmp_path: Path) -> None:
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (49406, 49407)
    shutil.copy(vocab_path, tmp_path / VOCAB_FILENAME)
    spec = ClipTokenizer(vocab_path, context_length=32, clean="whitespace").to_spec()
    assert spec.lowercase is False and spec.vocab_file == VOCAB_FILENAME
    loaded = ClipTokenizer.from_spec(TokenizerSpec.model_validate_json(spec.model_dump_json()), tmp_path)
    assert loaded.context_length == 32
    _assert_parity(loaded.encode(CORPUS[:50]), CORPUS[:50], 32, "whitespace")


def test_spec_contradicting_the_vocabulary_is_refused(tokenizer: ClipTokenizer, vocab_path: Path) -> None:
    spec = tokenizer.to_spec()
    wrong_ids = spec.model_copy(update={"eot_token_id": 3})
    with pytest.raises(TokenizerError, match="start/end token ids 49406/3"):
        ClipTokenizer.from_spec(wrong_ids, vocab_path.parent)
    inconsistent = spec.model_copy(update={"clean": "whitespace"})
    with pytest.raises(TokenizerError, match="inconsistent"):
        ClipTokenizer.from_spec(inconsistent, vocab_path.parent)


def test_missing_vocabulary_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / VOCAB_FILENAME
    with pytest.raises(VocabularyNotFoundError, match="vocabulary file not found") as caught:
        ClipTokenizer(missing)
    assert str(missing) in str(caught.value)
    assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, BundleError)
    spec = TokenizerSpec(vocab_file=VOCAB_FILENAME, sot_token_id=49406, eot_token_id=49407)
    with pytest.raises(VocabularyNotFoundError, match=VOCAB_FILENAME):
        ClipTokenizer.from_spec(spec, tmp_path)


def test_unreadable_or_short_vocabulary_is_a_clear_error(tmp_path: Path) -> None:
    not_gzip = tmp_path / "plain.txt.gz"
    not_gzip.write_text("i n\nt h\n")
    with pytest.raises(TokenizerError, match="cannot read CLIP BPE vocabulary"):
        ClipTokenizer(not_gzip)
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt", encoding="utf-8") as fh:
        fh.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(TokenizerError, match="not a CLIP BPE vocabulary"):
        ClipTokenizer(short)


def test_bad_arguments_are_clear_errors(tokenizer: ClipTokenizer, vocab_path: Path) -> None:
    with pytest.raises(TypeError, match="not a single str"):
        tokenizer.encode("a dog")
    with pytest.raises(TypeError, match="text 1 is a int"):
        tokenizer.encode(["a dog", 3])
    with pytest.raises(ValueError, match="unknown clean mode 'upper'"):
        ClipTokenizer(vocab_path, clean="upper")
    with pytest.raises(ValueError, match="context_length must be >= 2"):
        ClipTokenizer(vocab_path, context_length=1)


def test_shared_between_threads_with_a_small_cache(vocab_path: Path) -> None:
    shared = ClipTokenizer(vocab_path, cache_words=16)
    expected = ClipTokenizer(vocab_path).encode(CORPUS).ids
    chunks = [CORPUS[i::4] for i in range(4)] * 2
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda chunk: shared.encode(chunk).ids, chunks))
    for index, ids in enumerate(results):
        assert np.array_equal(ids, expected[index % 4 :: 4])


def test_texts_far_past_the_context_give_open_clips_ids(tokenizer: ClipTokenizer) -> None:
    rng = random.Random(SEED + 1)
    long_texts = [" ".join(rng.choice(CORPUS) for _ in range(400)) for _ in range(6)]
    long_texts += ["a photo of a {}. " * 3000, "word " * 20_000, "😀 " * 5000]
    assert all(len(text) > tokenizer.max_chars for text in long_texts)
    for clean in ("lower", "canonicalize"):
        ours = ClipTokenizer(tokenizer.vocab_path, clean=clean)
        _assert_parity(ours.encode(long_texts), long_texts, 77, clean)


def test_only_as_much_text_as_can_reach_the_context_is_cleaned(tokenizer: ClipTokenizer) -> None:
    seen: list[int] = []

    def clean(text: str) -> str:
        seen.append(len(text))
        return " ".join(text.split())

    limit = tokenizer.max_chars
    assert bounded_text("x " * 5_000_000, clean, limit) == (("x " * limit)[:limit], True)
    assert seen == [RAW_CHARS_PER_CLEAN_CHAR * limit]
    assert bounded_text("a dog", clean, limit) == ("a dog", False)
    batch = tokenizer.encode(["dog " * 5_000_000])
    assert batch.truncated == [True] and batch.lengths.tolist() == [77]


def test_long_words_merge_as_open_clips_bpe_does(tokenizer: ClipTokenizer) -> None:
    rng = random.Random(SEED + 2)
    alphabets = ["abcdefghijklmnopqrstuvwxyz", "ab", "aab", "éàüß", "あいうえおかきく", "😀👍", "!?.-"]
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(100, 700))) for alphabet in alphabets]
    words += ["a" * 1000, "photograph" * 60]
    reference = open_clip_tokenizer.SimpleTokenizer()
    for word in words:
        assert list(tokenizer._word_ids(word.lower())) == reference.encode(word.lower()), word[:40]


def test_import_pulls_in_neither_torch_nor_open_clip() -> None:
    code = (
        "import sys, clipserve.contract.tokenizer\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'onnx'))\n"
        "print(heavy)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
