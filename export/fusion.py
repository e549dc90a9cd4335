"""Exported graphs that ONNX Runtime runs with its fused CPU kernels.

Traced as they are, the towers' attention layers become a dozen MatMul/Softmax/Transpose/Reshape
nodes that ONNX Runtime's optimizer does not recognise (the torch.export graph of
nn.MultiheadAttention matches none of its attention patterns). So the exporter traces them through a
custom op, `clipserve::multi_head_attention`, that the ONNX translation turns into ONNX Runtime's
contrib `com.microsoft.MultiHeadAttention` (`unidirectional=1` for the causal text tower, which keeps
the dynamic sequence axis exact), and then lets ONNX Runtime's transformer optimizer fuse LayerNorm,
GELU and the residual adds (`SkipLayerNormalization`, `BiasGelu`). The torch model used as the parity
reference is never changed: the attention layers are swapped only while the graph is traced.

Covered: open_clip's self-attention blocks (`nn.MultiheadAttention` in ResidualAttentionBlock, as in
ViT image towers and CLIP / SigLIP / MobileCLIP text towers; the plain open_clip `Attention` of
CustomResidualAttentionBlock) and timm's plain `Attention` (timm image towers such as SigLIP's ViT).
Left as traced: cross-attention and attention pools (ResNet AttentionPool2d, CoCa and SigLIP MAP
poolers), masks other than the causal one (pad masks, class-token masks), Hugging Face text models.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnxscript
import torch
import torch.nn.functional as F
from onnx.defs import OpSchema
from open_clip.transformer import Attention as OpenClipAttention
from torch import nn

from clipserve.export.logs import quiet_logs

MS_DOMAIN = "com.microsoft"
# Op types that stand for a fusion in a saved graph (ONNX Runtime's contrib kernels, and the ONNX
# LayerNormalization that torch's exporter already emits fused).
FUSED_OP_TYPES = (
    "MultiHeadAttention",
    "Attention",
    "QAttention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "QuickGelu",
)
# What ONNX Runtime's transformer optimizer may fuse after export; attention is fused already and its
# own attention patterns are left off.
_OPTIMIZER_FUSIONS = {
    "enable_attention": False,
    "enable_gelu": True,
    "enable_layer_norm": True,
    "enable_skip_layer_norm": True,
    "enable_bias_skip_layer_norm": True,
    "enable_bias_gelu": True,
    "enable_gelu_approximation": False,
    "enable_rotary_embeddings": False,
}


def _register_schema() -> None:
    """The part of ONNX Runtime's MultiHeadAttention schema the exporter uses (ONNX itself does not
    know contrib ops, and the exporter builds nodes only from known schemas)."""
    if onnx.defs.has("MultiHeadAttention", MS_DOMAIN):
        return
    param = OpSchema.FormalParameter
    onnx.defs.register_schema(
        OpSchema(
            "MultiHeadAttention",
            MS_DOMAIN,
            1,
            doc="ONNX Runtime contrib MultiHeadAttention (query, key, value [B,S,D])",
            inputs=[param("query", "T"), param("key", "T"), param("value", "T")],
            outputs=[param("output", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
            attributes=[
                OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "number of heads"),
                OpSchema.Attribute("unidirectional", OpSchema.AttrType.INT, "1: causal mask"),
            ],
        )
    )


_register_schema()
_MS_OPSET = onnxscript.values.Opset(MS_DOMAIN, 1)


@torch.library.custom_op("clipserve::multi_head_attention", mutates_args=())
def multi_head_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int, causal: bool
) -> torch.Tensor:
    """Scaled dot-product attention of projected [B,S,D] query/key/value split into `num_heads`
    heads (scale 1/sqrt(D/num_heads)), causal or not: what MultiHeadAttention computes."""
    batch, length, width = query.shape

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, x.shape[1], num_heads, width // num_heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(query), heads(key), heads(value), is_causal=causal)
    return out.transpose(1, 2).reshape(batch, length, width)


@multi_head_attention.register_fake
def _multi_head_attention_shape(query, key, value, num_heads, causal):
    return torch.empty_like(query)


def _multi_head_attention_onnx(query, key, value, num_heads: int, causal: bool):
    return _MS_OPSET.MultiHeadAttention(query, key, value, num_heads=num_heads, unidirectional=int(causal))


TRANSLATIONS = {torch.ops.clipserve.multi_head_attention.default: _multi_head_attention_onnx}


def _fused(qkv: torch.Tensor, num_heads: int, causal: bool) -> torch.Tensor:
    q, k, v = qkv.chunk(3, dim=-1)
    return torch.ops.clipserve.multi_head_attention(q, k, v, num_heads, causal)


class _FusedTorchMHA(nn.Module):
    """Stands in for a batch-first nn.MultiheadAttention used as self-attention; anything else (cross
    attention, a mask that is not the tower's causal mask) goes to the original module."""

    def __init__(self, inner: nn.MultiheadAttention, causal_mask: bool):
        super().__init__()
        self.inner = inner
        self.causal_mask = causal_mask

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, **kwargs):
        inner = self.inner
        plain = key is query and value is query and key_padding_mask is None and not kwargs
        if not plain or (attn_mask is not None and not self.causal_mask):
            return inner(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                **kwargs,
            )
        qkv = F.linear(query, inner.in_proj_weight, inner.in_proj_bias)
        out = _fused(qkv, inner.num_heads, attn_mask is not None)
        return inner.out_proj(out), None


class _FusedOpenClipAttention(nn.Module):
    """Stands in for open_clip's plain Attention (no cosine scale, head scale or inner norms)."""

    def __init__(self, inner: OpenClipAttention, causal_mask: bool):
        super().__init__()
        self.inner = inner
        self.causal_mask = causal_mask

    def forward(self, x, attn_mask=None):
        inner = self.inner
        if attn_mask is not None and not self.causal_mask:
            return inner(x, attn_mask=attn_mask)
        qkv = F.linear(x, inner.in_proj_weight, inner.in_proj_bias)
        return inner.out_proj(_fused(qkv, inner.num_heads, attn_mask is not None))


class _FusedTimmAttention(nn.Module):
    """Stands in for timm's plain Attention (no q/k norms, gate or inner norm), unmasked."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, attn_mask=None, is_causal=False):
        inner = self.inner
        if attn_mask is not None:
            return inner(x, attn_mask=attn_mask, is_causal=is_causal)
        return inner.proj(_fused(inner.qkv(x), inner.num_heads, bool(is_causal)))


_STAND_INS = (_FusedTorchMHA, _FusedOpenClipAttention, _FusedTimmAttention)


def _timm_attention_type() -> type | None:
    try:
        from timm.layers import Attention
    except ImportError:  # pragma: no cover - timm comes with open_clip's timm models
        return None
    return Attention


def _identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _stand_in(module: nn.Module, causal_mask: bool) -> nn.Module | None:
    if isinstance(module, nn.MultiheadAttention):
        if (
            module.batch_first
            and module._qkv_same_embed_dim
            and module.bias_k is None
            and not module.add_zero_attn
        ):
            return _FusedTorchMHA(module, causal_mask)
        return None
    if isinstance(module, OpenClipAttention):
        plain = (
            module.logit_scale is None
            and module.head_scale is None
            and all(_identity(getattr(module, n, None)) for n in ("ln_q", "ln_k", "ln_inner"))
        )
        return _FusedOpenClipAttention(module, causal_mask) if plain else None
    timm_attention = _timm_attention_type()
    if timm_attention is not None and isinstance(module, timm_attention):
        plain = getattr(module, "gate", None) is None and all(
            _identity(getattr(module, n, None)) for n in ("q_norm", "k_norm", "norm")
        )
        qkv = getattr(module, "qkv", None)
        if plain and isinstance(qkv, nn.Linear) and module.num_heads * module.head_dim == qkv.in_features:
            return _FusedTimmAttention(module)
    return None


@contextlib.contextmanager
def fused_attention(tower: nn.Module, causal_mask: bool = False) -> Iterator[int]:
    """While inside, the tower's self-attention layers trace as MultiHeadAttention; yields how many
    were swapped. `causal_mask`: every attention mask the tower passes is its causal mask (checked
    by the caller), so a masked layer becomes unidirectional attention."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in list(tower.modules()):
            if isinstance(parent, _STAND_INS):
                continue
            for name, child in list(parent.named_children()):
                stand_in = _stand_in(child, causal_mask)
                if stand_in is not None:
                    setattr(parent, name, stand_in)
                    swapped.append((parent, name, child))
        yield len(swapped)
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


def is_causal_mask(mask: torch.Tensor | None) -> bool:
    """True for open_clip's additive causal mask: 0 on and below the diagonal, -inf above."""
    if mask is None or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    expected = torch.full(mask.shape, float("-inf"), dtype=mask.dtype, device=mask.device).triu(1)
    return bool(torch.equal(mask, expected))


def optimize_fused(path: Path) -> None:
    """Fuse LayerNorm, GELU and residual adds in the saved graph (ONNX Runtime's transformer
    optimizer, graph patterns only: the result runs on any CPU), in place."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    for key, value in _OPTIMIZER_FUSIONS.items():
        setattr(options, key, value)
    # The optimizer prints what its shape inference could not type (the contrib op) on stdout.
    with quiet_logs(), contextlib.redirect_stdout(io.StringIO()):
        optimized = optimize_model(
            str(path),
            model_type="bert",
            num_heads=0,
            hidden_size=0,
            optimization_options=options,
            opt_level=0,
        )
        optimized.save_model_to_file(str(path))


def graph_fusions(path: Path) -> dict[str, int]:
    """How many nodes of each fused op type the saved graph holds."""
    graph = onnx.load(str(path), load_external_data=False).graph
    counts = Counter(node.op_type for node in graph.node if node.op_type in FUSED_OP_TYPES)
    return dict(sorted(counts.items()))
