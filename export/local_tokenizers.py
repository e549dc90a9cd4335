"""Small Hugging Face tokenizers built on this machine, shaped like those of open_clip's families.

No hub is needed: a tokenizer is trained with the `tokenizers` library on a few hundred generated
sentences in several scripts, then padded with filler pieces to exactly the vocabulary size the
architecture expects, and saved as a directory that `transformers.AutoTokenizer` (and so
open_clip's `HFTokenizer`) loads by path. Tests, benchmarks and offline trials of an architecture
(`clip-export --tokenizer DIR`) use them; the ids mean nothing, but every rule a real tokenizer of
the family applies (special tokens, templates, normalization, padding id) is there.

Styles:
- `t5`: SentencePiece Unigram, `</s>` appended, `<pad>` = 0 (SigLIP's English tokenizer);
- `gemma`: byte-level BPE, `<bos>` ... `<eos>`, `<pad>` = 0 (SigLIP2's);
- `xlm-roberta`: Unigram, `<s>` ... `</s>`, `<pad>` = 1 (xlm-roberta, xlm-v, mt5-like);
- `nllb`: Unigram, a language code first, `</s>` last, `<pad>` = 1 (NLLB-CLIP);
- `bert`: lowercasing WordPiece, `[CLS]` ... `[SEP]`, `[PAD]` = 0 (CLIPA).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

STYLES = ("t5", "gemma", "xlm-roberta", "nllb", "bert")
_WORDS = {
    "en": "a photo of the dog cat bird car tree house red blue green small large running sitting on in "
    "with near two three people street city night diagram water cycle ocean cloud bicycle rain",
    "de": "ein Foto von dem Hund Katze Vogel Auto Baum Haus rot blau grün klein groß auf mit Straße",
    "fr": "une photo du chien chat oiseau voiture arbre maison rouge bleu vert petit grand avec rue",
    "es": "una foto del perro gato pájaro coche árbol casa rojo azul verde pequeño grande con calle",
    "ru": "фотография собаки кошки птицы машины дерева дома красный синий зелёный маленький",
    "zh": "一张 狗 猫 鸟 汽车 树 房子 红色 蓝色 绿色 的 照片 城市 夜晚",
    "ja": "犬 猫 鳥 車 木 家 赤い 青い 写真 の 街 夜",
    "ar": "صورة كلب قطة طائر سيارة شجرة منزل أحمر أزرق",
    "hi": "एक कुत्ते की बिल्ली पक्षी कार पेड़ घर लाल नीला तस्वीर",
}


def corpus(sentences: int = 600, seed: int = 0) -> list[str]:
    """Generated sentences in several scripts, with digits and punctuation."""
    rng = random.Random(seed)
    out = []
    for i in range(sentences):
        words = _WORDS[list(_WORDS)[i % len(_WORDS)]].split()
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        if rng.random() < 0.3:
            text += f" {rng.randint(0, 2026)}"
        if rng.random() < 0.3:
            text = text.capitalize() + rng.choice([".", "!", "?", ", ok", " (yes)"])
        out.append(text)
    return out


@dataclass(frozen=True)
class _Style:
    specials: tuple[str, ...]
    pad: str
    template: str
    extra: dict[str, str]


_STYLE = {
    "t5": _Style(("<pad>", "</s>", "<unk>"), "<pad>", "$A </s>", {"eos_token": "</s>", "unk_token": "<unk>"}),
    "gemma": _Style(
        ("<pad>", "<eos>", "<bos>", "<unk>"),
        "<pad>",
        "<bos> $A <eos>",
        {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"},
    ),
    "xlm-roberta": _Style(
        ("<s>", "<pad>", "</s>", "<unk>"),
        "<pad>",
        "<s> $A </s>",
        {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "cls_token": "<s>",
            "sep_token": "</s>",
        },
    ),
    "nllb": _Style(
        ("<s>", "<pad>", "</s>", "<unk>", "eng_Latn"),
        "<pad>",
        "eng_Latn $A </s>",
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>"},
    ),
    "bert": _Style(
        ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
        "[PAD]",
        "[CLS] $A [SEP]",
        {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"},
    ),
}


def _trained(style: str, base_vocab: int, sentences: list[str]) -> Tokenizer:
    spec = _STYLE[style]
    specials = list(spec.specials)
    if style == "gemma":
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=base_vocab,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif style == "bert":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=base_vocab, special_tokens=specials, show_progress=False
        )
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=base_vocab,
            special_tokens=specials,
            unk_token=specials[spec.specials.index("<unk>")],
            show_progress=False,
        )
    tokenizer.train_from_iterator(sentences, trainer=trainer)
    return tokenizer


def _padded(tokenizer: Tokenizer, vocab_size: int, style: str) -> Tokenizer:
    """The same tokenizer with filler pieces appended until it has exactly `vocab_size` ids; fillers
    contain a character no text here carries, so they never match and the ids stay the same."""
    document = json.loads(tokenizer.to_str())
    model = document["model"]
    have = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size < have:
        raise ValueError(f"a {style} tokenizer needs at least {have} ids; asked for {vocab_size}")
    fillers = [f"\ue000{i}" for i in range(vocab_size - have)]
    if model["type"] == "Unigram":
        model["vocab"] += [[piece, -99.0] for piece in fillers]
    else:
        start = len(model["vocab"])
        model["vocab"].update({piece: start + i for i, piece in enumerate(fillers)})
    padded = Tokenizer.from_str(json.dumps(document))
    if padded.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise ValueError(
            f"padding the {style} vocabulary gave {padded.get_vocab_size()} ids, not {vocab_size}"
        )
    return padded


def build_tokenizer(
    directory: Path | str,
    style: str = "t5",
    vocab_size: int | None = None,
    base_vocab: int = 600,
    model_max_length: int = 512,
    seed: int = 0,
) -> Path:
    """Train a `style` tokenizer and save it to `directory` (tokenizer.json + tokenizer_config.json),
    padded to `vocab_size` ids when given. Returns the directory."""
    if style not in _STYLE:
        raise ValueError(f"unknown tokenizer style {style!r}; expected one of {', '.join(STYLES)}")
    spec = _STYLE[style]
    tokenizer = _trained(style, base_vocab, corpus(seed=seed))
    if vocab_size is not None:
        tokenizer = _padded(tokenizer, vocab_size, style)
    template_ids = [(token, tokenizer.token_to_id(token)) for token in spec.specials]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=spec.template,
        special_tokens=[(t, i) for t, i in template_ids if t in spec.template.split()],
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "pad_token": spec.pad,
        "padding_side": "right",
        "truncation_side": "right",
        **spec.extra,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
