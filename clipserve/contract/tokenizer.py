"""The tokenizers a bundle names, without torch or open_clip: CLIP byte-level BPE (`ClipTokenizer`)
and Hugging Face `tokenizer.json` files (`HFTextTokenizer`); `load_tokenizer` picks one from the spec.

The CLIP-BPE tokenizer:

It reproduces, id for id, the tokenizer open_clip uses for CLIP-BPE models
(`open_clip.tokenizer.SimpleTokenizer`), so the service can tokenize with only the standard
library, numpy, ftfy and regex. Its steps, in order:

1. Clean the text: ftfy's `fix_text`, HTML unescaped twice, whitespace collapsed, and then, by
   the `clean` mode: lowercased ("lower"), left as is ("whitespace"), or lowercased with
   underscores turned into spaces and ASCII punctuation removed ("canonicalize").
2. Split it into words with CLIP's pattern (contractions, runs of letters, single digits, runs
   of other symbols; the special-token strings themselves are words too, as in open_clip).
3. Map each word's UTF-8 bytes to printable characters, mark its end with `</w>`, and merge
   symbol pairs in the order of the merges file.
4. Wrap in start/end tokens, cut to the context length keeping the end token last, pad with 0.

The cost of a text is bounded by the context length, not by the text (`max_chars`): only as many
characters as can reach the context are cleaned and split (see `bounded_text`), and merging runs
in O(n log n) per word (a heap of pair ranks), not O(n^2), so a word of thousands of letters costs
milliseconds.

One instance is safe to share between threads: after construction everything is read-only,
except the per-word cache, a bounded `functools.lru_cache`, which is thread-safe.
"""

from __future__ import annotations

import functools
import gzip
import heapq
import html
import importlib.util
import itertools
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import ftfy
import numpy as np
import regex

from clipserve.contract.bundle import BundleError, TokenizerSpec

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
CLEAN_MODES = ("lower", "whitespace", "canonicalize")
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
END_OF_WORD = "</w>"
# CLIP's vocabulary: 256 byte symbols, the same with END_OF_WORD, the merges, two special tokens.
_VOCAB_SIZE = 49408
_MERGE_COUNT = _VOCAB_SIZE - 2 * 256 - 2
_DEFAULT_CACHE_WORDS = 1 << 16
# Characters of raw text cleaned per character that can reach the context: cleaning shrinks a text only
# where it collapses whitespace, unescapes entities or drops punctuation, never this much in real text
RAW_CHARS_PER_CLEAN_CHAR = 4

# Texts made only of these characters are left unchanged by ftfy.fix_text and html.unescape
# (no entity, no control or terminal escape, nothing to normalize), so both are skipped for them.
_NEEDS_FIXING = re.compile(r"[^\t\n\x20-\x7e]|&")
_ASCII_PUNCTUATION = str.maketrans("", "", string.punctuation)


class TokenizerError(BundleError):
    """The tokenizer cannot be built: unreadable vocabulary, or a spec that contradicts it."""


class VocabularyNotFoundError(TokenizerError, FileNotFoundError):
    pass


@dataclass(frozen=True, eq=False)
class TokenizedBatch:
    ids: np.ndarray
    """int64 [B, context_length]: start token, text tokens, end token, then padding."""
    lengths: np.ndarray
    """int64 [B]: tokens in each row before the padding, start and end tokens included."""
    truncated: list[bool]
    """True where the text did not fit and was cut (the end token is kept last)."""

    def trimmed(self) -> np.ndarray:
        """The ids padded only to the longest text of the batch."""
        return self.ids[:, : int(self.lengths.max(initial=0))]


def open_clip_vocab_path() -> Path:
    """Where the installed open_clip keeps its BPE vocabulary; open_clip itself is not imported."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise VocabularyNotFoundError(
            f"open_clip is not installed, so its {VOCAB_FILENAME} cannot be found; pass the file's path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / VOCAB_FILENAME
    if not path.is_file():
        raise VocabularyNotFoundError(f"open_clip is installed but has no {VOCAB_FILENAME} at {path}")
    return path


def _byte_symbols() -> tuple[list[int], dict[int, str]]:
    """Bytes in vocabulary order and the printable character standing for each.

    Visible Latin-1 bytes stand for themselves and come first; the others (controls, space,
    NBSP, soft hyphen) are given characters from U+0100 on, in byte order.
    """
    visible = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    hidden = [b for b in range(256) if b not in set(visible)]
    symbol = {b: chr(b) for b in visible}
    symbol.update({b: chr(0x100 + i) for i, b in enumerate(hidden)})
    return visible + hidden, symbol


def _read_merges(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise VocabularyNotFoundError(
            f"CLIP BPE vocabulary file not found: {path} (expected a {VOCAB_FILENAME})"
        )
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"cannot read CLIP BPE vocabulary {path}: {exc}") from exc
    # The first line is a version header; only the first _MERGE_COUNT merges are in the vocabulary.
    rows = [line.split() for line in lines[1 : 1 + _MERGE_COUNT]]
    if len(rows) < _MERGE_COUNT or any(len(row) != 2 for row in rows):
        raise TokenizerError(
            f"{path} is not a CLIP BPE vocabulary: expected {_MERGE_COUNT} merge lines of two symbols "
            f"after the header, found {sum(len(row) == 2 for row in rows)}"
        )
    return [(first, second) for first, second in rows]


def context_chars(context_length: int, longest_token_chars: int) -> int:
    """Characters of cleaned text past which no token reaches the context of `context_length` ids.

    Each token stands for at most `longest_token_chars` characters of one word, and words are apart by
    at most one character (a space) once whitespace is collapsed: n characters give at least
    n / (longest_token_chars + 1) tokens, so a text longer than this has more tokens of its own than
    the context holds, whatever special tokens are added."""
    return context_length * (longest_token_chars + 1)


def bounded_text(text: str, clean: Callable[[str], str], max_chars: int) -> tuple[str, bool]:
    """`text` cleaned, then cut to `max_chars` characters; and whether it was cut.

    Only the first `RAW_CHARS_PER_CLEAN_CHAR * max_chars` raw characters are cleaned, so a text of
    megabytes costs what one of a few kilobytes does. A text that was cut has more tokens than the
    context holds (see `context_chars`), and every token kept is the one the whole text gives, except
    when a single word of dozens of characters runs across the cut."""
    raw_cut = len(text) > RAW_CHARS_PER_CLEAN_CHAR * max_chars
    cleaned = clean(text[: RAW_CHARS_PER_CLEAN_CHAR * max_chars] if raw_cut else text)
    if len(cleaned) > max_chars:
        return cleaned[:max_chars], True
    return cleaned, raw_cut


def _fix_and_unescape(text: str) -> str:
    if _NEEDS_FIXING.search(text) is not None:
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return text.strip()


def _collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


def _clean_lower(text: str) -> str:
    return _collapse_whitespace(_fix_and_unescape(text)).lower()


def _clean_whitespace(text: str) -> str:
    return _collapse_whitespace(_fix_and_unescape(text))


def _clean_canonicalize(text: str) -> str:
    text = _fix_and_unescape(text).replace("_", " ").translate(_ASCII_PUNCTUATION).lower()
    return _collapse_whitespace(text)


_CLEANERS: dict[str, Callable[[str], str]] = {
    "lower": _clean_lower,
    "whitespace": _clean_whitespace,
    "canonicalize": _clean_canonicalize,
}


class ClipTokenizer:
    """Text -> CLIP token ids, identical to open_clip's CLIP-BPE tokenizer."""

    def __init__(
        self,
        vocab_path: str | Path,
        context_length: int = 77,
        clean: str = "lower",
        pad_token_id: int = 0,
        cache_words: int = _DEFAULT_CACHE_WORDS,
    ):
        if clean not in _CLEANERS:
            raise ValueError(f"unknown clean mode {clean!r}; expected one of {', '.join(CLEAN_MODES)}")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end tokens), got {context_length}")
        self.vocab_path = Path(vocab_path)
        self.context_length = context_length
        self.clean = clean
        self.pad_token_id = pad_token_id
        self._clean_text = _CLEANERS[clean]

        merges = _read_merges(self.vocab_path)
        byte_order, byte_symbol = _byte_symbols()
        singles = [byte_symbol[b] for b in byte_order]
        vocab = singles + [s + END_OF_WORD for s in singles] + ["".join(pair) for pair in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self._ids = {token: index for index, token in enumerate(vocab)}
        self._merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self._bytes_to_symbols = str.maketrans({chr(b): s for b, s in byte_symbol.items()})
        self._merged = {rank: first + second for (first, second), rank in self._merge_rank.items()}
        self._pair = {rank: pair for pair, rank in self._merge_rank.items()}
        self.sot_token_id = self._ids[SOT_TOKEN]
        self.eot_token_id = self._ids[EOT_TOKEN]
        self._specials = {SOT_TOKEN: self.sot_token_id, EOT_TOKEN: self.eot_token_id}
        # a vocabulary symbol is one byte, so no token stands for more characters than its symbols
        longest = max(len(token.removesuffix(END_OF_WORD)) for token in self._ids)
        self.max_chars = context_chars(context_length, longest)
        """Characters of a cleaned text that are tokenized; the rest cannot reach the context."""
        self._words = regex.compile(
            "|".join(regex.escape(t) for t in self._specials)
            + r"|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
            regex.IGNORECASE,
        )
        self._word_ids = functools.lru_cache(maxsize=cache_words)(self._word_ids_uncached)

    @classmethod
    def from_spec(cls, spec: TokenizerSpec, bundle_dir: Path) -> ClipTokenizer:
        """The tokenizer a bundle's manifest describes; refuses a spec that contradicts its vocabulary."""
        if spec.lowercase != (spec.clean != "whitespace"):
            raise TokenizerError(
                f"tokenizer spec is inconsistent: clean={spec.clean!r} "
                f"{'does not lowercase' if spec.clean == 'whitespace' else 'lowercases'}, "
                f"but lowercase={spec.lowercase}"
            )
        tokenizer = cls(
            Path(bundle_dir) / spec.vocab_file,
            context_length=spec.context_length,
            clean=spec.clean,
            pad_token_id=spec.pad_token_id,
        )
        expected = (tokenizer.sot_token_id, tokenizer.eot_token_id)
        if (spec.sot_token_id, spec.eot_token_id) != expected:
            raise TokenizerError(
                f"tokenizer spec says start/end token ids {spec.sot_token_id}/{spec.eot_token_id}, "
                f"but {spec.vocab_file} gives {expected[0]}/{expected[1]}"
            )
        return tokenizer

    def to_spec(self, vocab_file: str = VOCAB_FILENAME) -> TokenizerSpec:
        """The manifest entry describing this tokenizer, its vocabulary stored as `vocab_file`."""
        return TokenizerSpec(
            context_length=self.context_length,
            vocab_file=vocab_file,
            lowercase=self.clean != "whitespace",
            clean=self.clean,
            sot_token_id=self.sot_token_id,
            eot_token_id=self.eot_token_id,
            pad_token_id=self.pad_token_id,
        )

    def _merge(self, symbols: list[str]) -> list[str]:
        """Apply merges, lowest rank first, each to all its non-overlapping pairs left to right.

        The pairs wait in a heap by (rank, position) over a linked list of symbols: every pass takes
        all the entries of the lowest rank, left to right, and merges those still standing (a merge
        never makes a new pair of its own rank, so the pass sees exactly the pairs it began with)."""
        count = len(symbols)
        if count < 2:
            return symbols
        rank = self._merge_rank
        following = [*range(1, count), -1]
        preceding = list(range(-1, count - 1))
        current = list(symbols)  # "" where a symbol was merged into the one before it
        heap = [
            (r, i) for i, pair in enumerate(itertools.pairwise(symbols)) if (r := rank.get(pair)) is not None
        ]
        heapq.heapify(heap)
        while heap:
            lowest = heap[0][0]
            positions = []
            while heap and heap[0][0] == lowest:
                positions.append(heapq.heappop(heap)[1])
            first, second = self._pair[lowest]
            merged = self._merged[lowest]
            for i in sorted(positions):
                j = following[i]
                if j < 0 or current[i] != first or current[j] != second:
                    continue  # merged away earlier in this pass, or since the entry was made
                current[i], current[j] = merged, ""
                k = following[i] = following[j]
                if k >= 0:
                    preceding[k] = i
                    if (r := rank.get((merged, current[k]))) is not None:
                        heapq.heappush(heap, (r, i))
                h = preceding[i]
                if h >= 0 and (r := rank.get((current[h], merged))) is not None:
                    heapq.heappush(heap, (r, h))
        out: list[str] = []
        i = 0
        while i >= 0:
            out.append(current[i])
            i = following[i]
        return out

    def _word_ids_uncached(self, word: str) -> tuple[int, ...]:
        special = self._specials.get(word)
        if special is not None:
            return (special,)
        symbols = list(word.encode("utf-8").decode("latin-1").translate(self._bytes_to_symbols))
        symbols[-1] += END_OF_WORD
        return tuple(self._ids[s] for s in self._merge(symbols))

    def _cleaned_ids(self, cleaned: str) -> list[int]:
        ids: list[int] = []
        for word in self._words.findall(cleaned):
            ids.extend(self._word_ids(word))
        return ids

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` without truncation, start and end tokens included."""
        return len(self._cleaned_ids(self._clean_text(text))) + 2

    def encode(self, texts: Sequence[str]) -> TokenizedBatch:
        """Tokenize a batch; rows are padded to `context_length` (see `TokenizedBatch.trimmed`)."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of texts, not a single str; wrap it in a list")
        ids = np.full((len(texts), self.context_length), self.pad_token_id, dtype=np.int64)
        lengths = np.zeros(len(texts), dtype=np.int64)
        truncated: list[bool] = []
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {row} is a {type(text).__name__}, expected str")
            cleaned, shortened = bounded_text(text, self._clean_text, self.max_chars)
            tokens = [self.sot_token_id, *self._cleaned_ids(cleaned), self.eot_token_id]
            cut = shortened or len(tokens) > self.context_length
            if cut:
                tokens = [*tokens[: self.context_length - 1], self.eot_token_id]
            ids[row, : len(tokens)] = tokens
            lengths[row] = len(tokens)
            truncated.append(cut)
        return TokenizedBatch(ids=ids, lengths=lengths, truncated=truncated)


class TextTokenizer(Protocol):
    """What the service asks of a bundle's tokenizer."""

    context_length: int

    def encode(self, texts: Sequence[str]) -> TokenizedBatch: ...


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("encode() takes a sequence of texts, not a single str; wrap it in a list")
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {row} is a {type(text).__name__}, expected str")
    return list(texts)


class HFTextTokenizer:
    """Text -> token ids with a Hugging Face `tokenizer.json`, identical to open_clip's HFTokenizer.

    open_clip cleans each text (`clean` mode, as for CLIP-BPE), then calls the transformers tokenizer
    with `max_length=context_length, padding="max_length", truncation=True`: the file's normalizer,
    pre-tokenizer, model and template, the template's special tokens kept when a text is cut. This
    runs the same `tokenizers` (Rust) pipeline with the same truncation and padding, so rows always
    have `context_length` ids. With `strip_sep_token_id`, that id becomes 0 afterwards (CLIPA).

    As for CLIP-BPE, only `max_chars` characters of a cleaned text are tokenized (`bounded_text`), from
    the longest token of the vocabulary (or WordPiece's longest word, which becomes one unknown token).
    A normalizer that drops characters, or a model that fuses a run of unknown characters into one
    token, can make a cut text end differently: texts far past the context, made for it."""

    def __init__(
        self,
        tokenizer_file: str | Path,
        context_length: int,
        clean: str = "whitespace",
        pad_token_id: int = 0,
        padding_side: str = "right",
        truncation_side: str = "right",
        strip_sep_token_id: int | None = None,
    ):
        from tokenizers import Tokenizer

        if clean not in _CLEANERS:
            raise ValueError(f"unknown clean mode {clean!r}; expected one of {', '.join(CLEAN_MODES)}")
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        path = Path(tokenizer_file)
        if not path.is_file():
            raise VocabularyNotFoundError(f"tokenizer file not found: {path} (expected a tokenizer.json)")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises plain Exceptions for unreadable files
            raise TokenizerError(f"cannot read Hugging Face tokenizer {path}: {exc}") from exc
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        if not 0 <= pad_token_id < self.vocab_size:
            raise TokenizerError(
                f"pad token id {pad_token_id} is outside {path.name}'s {self.vocab_size} ids"
            )
        self.tokenizer_file = path
        self.context_length = context_length
        self.clean = clean
        self.pad_token_id = pad_token_id
        self.strip_sep_token_id = strip_sep_token_id
        self._clean_text = _CLEANERS[clean]
        longest = max(map(len, tokenizer.get_vocab(with_added_tokens=True)), default=1)
        longest = max(longest, getattr(tokenizer.model, "max_input_chars_per_word", 0))
        self.max_chars = context_chars(context_length, longest)
        """Characters of a cleaned text that are tokenized; the rest cannot reach the context."""
        tokenizer.enable_truncation(max_length=context_length, direction=truncation_side)
        tokenizer.enable_padding(
            direction=padding_side,
            pad_id=pad_token_id,
            pad_token=tokenizer.id_to_token(pad_token_id) or "",
            length=context_length,
        )
        self._tokenizer = tokenizer

    @classmethod
    def from_spec(cls, spec: TokenizerSpec, bundle_dir: Path) -> HFTextTokenizer:
        """The tokenizer a bundle's manifest describes; refuses a file whose size contradicts it."""
        tokenizer = cls(
            Path(bundle_dir) / spec.vocab_file,
            context_length=spec.context_length,
            clean=spec.clean,
            pad_token_id=spec.pad_token_id,
            padding_side=spec.padding_side or "right",
            truncation_side=spec.truncation_side or "right",
            strip_sep_token_id=spec.strip_sep_token_id,
        )
        if spec.vocab_size is not None and tokenizer.vocab_size != spec.vocab_size:
            raise TokenizerError(
                f"tokenizer spec says {spec.vocab_size} ids, but {spec.vocab_file} has {tokenizer.vocab_size}"
            )
        return tokenizer

    def to_spec(
        self, vocab_file: str = "tokenizer.json", padding_side: str = "right", truncation_side: str = "right"
    ) -> TokenizerSpec:
        return TokenizerSpec(
            kind="hf",
            context_length=self.context_length,
            vocab_file=vocab_file,
            lowercase=self.clean != "whitespace",
            clean=self.clean,
            pad_token_id=self.pad_token_id,
            padding="max_length",
            padding_side=padding_side,
            truncation_side=truncation_side,
            vocab_size=self.vocab_size,
            strip_sep_token_id=self.strip_sep_token_id,
        )

    def encode(self, texts: Sequence[str]) -> TokenizedBatch:
        """Tokenize a batch: int64 [B, context_length], padded as the tokenizer pads."""
        bounded = [bounded_text(text, self._clean_text, self.max_chars) for text in _check_texts(texts)]
        cleaned = [text for text, _ in bounded]
        encodings = self._tokenizer.encode_batch(cleaned) if cleaned else []
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(cleaned), self.context_length)
        if self.strip_sep_token_id is not None:
            ids[ids == self.strip_sep_token_id] = 0
        lengths = np.array([sum(e.attention_mask) for e in encodings], dtype=np.int64)
        truncated = [bool(e.overflowing) or cut for e, (_, cut) in zip(encodings, bounded, strict=True)]
        return TokenizedBatch(ids=ids, lengths=lengths, truncated=truncated)


def load_tokenizer(spec: TokenizerSpec, bundle_dir: Path) -> ClipTokenizer | HFTextTokenizer:
    """The tokenizer of a bundle, of the kind its manifest names."""
    if spec.kind == "hf":
        return HFTextTokenizer.from_spec(spec, bundle_dir)
    return ClipTokenizer.from_spec(spec, bundle_dir)
