"""The two exportable towers of an open_clip model, each ending in an L2-normalized embedding.

The text tower is rebuilt from the model's own parts (never copied weights) so that it slices the
positional embedding and the causal mask to the length of the input: with a causal mask and
end-token pooling, the vectors do not depend on padding, and the exported graph can keep its
sequence axis dynamic. Models without a causal mask (e.g. MobileCLIP and SigLIP text towers), with
a pad mask or class token, or with a Hugging Face text model (xlm-roberta, mt5, NLLB) do see the
padding, so they are wrapped as they are, at the full length their tokenizer pads to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip import CLIP, CustomTextCLIP
from open_clip.hf_model import ClsLastHiddenStatePooler, ClsPooler, HFTextEncoder, MaxPooler, MeanPooler
from open_clip.transformer import TextTransformer
from torch import nn

from clipserve.export.errors import ExportError
from clipserve.export.fusion import is_causal_mask

CLIP_BPE_VOCAB_SIZE = 49408
SUPPORTED_POOLING = ("argmax", "last", "first", "eos")
_HF_POOLING = {MeanPooler: "mean", MaxPooler: "max", ClsPooler: "cls", ClsLastHiddenStatePooler: "cls"}


class ImageTower(nn.Module):
    """pixel_values [B,3,H,W] -> image_embeds [B,D], L2-normalized."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixel_values), dim=-1)


class WholeTextTower(nn.Module):
    """input_ids [B,L] -> text_embeds [B,D] through the model's own encode_text (fixed length)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(input_ids), dim=-1)


class CausalTextTower(nn.Module):
    """input_ids [B,L<=context] -> text_embeds [B,D], pooled at the end token; the same vectors for any
    padding length."""

    def __init__(self, text: nn.Module):
        super().__init__()
        self.text = text

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        text = self.text
        x = text.token_embedding(input_ids) + text.positional_embedding[:length]
        x = text.transformer(x, attn_mask=text.attn_mask[:length, :length])
        x = text.ln_final(x)
        # The end token has the highest id of the vocabulary: argmax finds it.
        pooled = x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]
        projection = text.text_projection
        if isinstance(projection, nn.Linear):
            pooled = projection(pooled)
        elif projection is not None:
            pooled = pooled @ projection
        return F.normalize(pooled, dim=-1)


@dataclass(frozen=True)
class TextTowerPlan:
    module: nn.Module
    context_length: int
    pooling: str
    # True when padding cannot change the vectors, so the graph may take any length <= context.
    length_free: bool
    vocab_size: int = CLIP_BPE_VOCAB_SIZE
    # True when the only attention mask the tower passes is its causal mask (then fused attention is
    # unidirectional attention; other masked layers stay as traced).
    causal_mask: bool = False


def _text_parts(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding token_embedding/transformer/ln_final, and its pooling type."""
    if isinstance(model, CLIP):
        return model, model.text_pool_type
    if isinstance(model, CustomTextCLIP):
        if not isinstance(model.text, TextTransformer):
            raise ExportError(
                f"the text tower is a {type(model.text).__name__}, which clipserve bundles do not export "
                "(supported: open_clip's TextTransformer and Hugging Face text models)"
            )
        return model.text, model.text.pool_type
    raise ExportError(
        f"cannot export a {type(model).__name__}: expected an open_clip CLIP or CustomTextCLIP model"
    )


def text_vocab_size(model: nn.Module) -> int:
    """Rows of the text tower's token embedding table: the ids its tokenizer may produce."""
    text = getattr(model, "text", None)
    if isinstance(text, HFTextEncoder):
        return int(text.transformer.get_input_embeddings().num_embeddings)
    parts, _ = _text_parts(model)
    return int(parts.token_embedding.num_embeddings)


def plan_text_tower(model: nn.Module, context_length: int | None = None) -> TextTowerPlan:
    """How to export the text tower. `context_length`: the length the model's tokenizer pads to, for
    a Hugging Face text model (its own limit, max_position_embeddings, is usually far longer)."""
    text = getattr(model, "text", None)
    if isinstance(model, CustomTextCLIP) and isinstance(text, HFTextEncoder):
        pooling = _HF_POOLING.get(type(text.pooler))
        if pooling is None:
            raise ExportError(f"Hugging Face text pooler {type(text.pooler).__name__} is not supported")
        length = context_length or 77
        if text.context_length and length > text.context_length:
            raise ExportError(
                f"the tokenizer pads to {length} tokens but the text model takes at most {text.context_length}"
            )
        return TextTowerPlan(WholeTextTower(model), length, pooling, False, text_vocab_size(model))
    text, pool_type = _text_parts(model)
    vocab_size = text.token_embedding.num_embeddings
    if pool_type not in SUPPORTED_POOLING:
        raise ExportError(
            f"text pooling {pool_type!r} is not supported (supported: {', '.join(SUPPORTED_POOLING)})"
        )
    context_length = int(text.positional_embedding.shape[0])
    causal = getattr(text, "attn_mask", None) is not None
    plain = getattr(text, "cls_emb", None) is None and not getattr(text, "use_pad_mask", False)
    causal_mask = causal and plain and is_causal_mask(text.attn_mask)
    # Only argmax pooling of CLIP's BPE ids (the end token has the highest id) reads a position that
    # does not move with the padding.
    if causal and plain and pool_type == "argmax" and vocab_size == CLIP_BPE_VOCAB_SIZE:
        return TextTowerPlan(CausalTextTower(text), context_length, pool_type, True, vocab_size, causal_mask)
    return TextTowerPlan(WholeTextTower(model), context_length, pool_type, False, vocab_size, causal_mask)
