"""Which kernel computes the megatron learner's core attention, softmax(QK^T / sqrt(d)) V.

  sdpa   torch's `scaled_dot_product_attention` with `is_causal`: the flash or
         memory-efficient kernel on a GPU (no [b, heads, s, s] score tensor is ever
         stored), torch's fused path on CPU
  local  megatron-core's DotProductAttention: explicit scores, a masked softmax; the
         reference the others are tested against
  te     Transformer Engine's TEDotProductAttention, when TE is installed
  auto   te when it imports and a GPU is in use, else sdpa

The learner's batches are right-padded, so causal attention needs no padding mask:
a query only sees keys at or before it, and every pad sits after the last real token
(the log-probs of pad positions are masked out of every loss).
"""
from __future__ import annotations

import importlib

import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from rlloop.learner.policy import ATTENTIONS


class SDPAttention(MegatronModule):
    """Megatron's core-attention interface over `F.scaled_dot_product_attention`:
    query [s, b, heads, d], key/value [s, b, groups, d] -> [s, b, heads * d]."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPAttention computes causal self-attention only, got {attn_mask_type}")
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not split sequences (context_parallel_size must be 1)")
        self.softmax_scale = softmax_scale  # None: 1/sqrt(head_dim), as megatron's default
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention takes neither packed sequences nor an attention bias")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        if k.shape[1] != q.shape[1]:  # grouped-query attention: each group serves heads/groups queries
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                             dropout_p=self.dropout if self.training else 0.0)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def resolve(name: str, on_gpu: bool) -> str:
    """The attention `name` selects here ("auto" decided); a clear error if it cannot run."""
    if name not in ATTENTIONS:
        raise ValueError(f"learner.attention must be one of {ATTENTIONS}, got {name!r}")
    if name in ("auto", "te"):
        try:  # megatron's TE module imports without TE (its classes are then stand-ins)
            importlib.import_module("transformer_engine")
            from megatron.core.extensions.transformer_engine import HAVE_TE
            has_te = on_gpu and HAVE_TE
        except Exception:  # TE missing or built for another torch/CUDA
            has_te = False
        if name == "te" and not has_te:
            raise ValueError("learner.attention=te needs Transformer Engine importable and a GPU; "
                             "use sdpa (torch's fused kernels) instead")
        return "te" if has_te else "sdpa"
    return name


def layer_spec(attention: str, qk_norm: bool):
    """megatron's local GPT layer (its linear layers, norms and names, which the
    HF conversion relies on) with the core attention swapped for `attention`."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_norm)
    if attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    elif attention == "te":
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        spec.submodules.self_attention.submodules.core_attention = TEDotProductAttention
    return spec


def needs_mask(attention: str) -> bool:
    """Only megatron's local attention takes the causal mask as a tensor."""
    return attention == "local"

