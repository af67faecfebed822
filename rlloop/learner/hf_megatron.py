"""HF <-> Megatron conversion for the Qwen2 / Qwen2.5 / Qwen3 / Llama families.

An `Arch` is what the conversion needs from an HF config. `units(arch)` lists every
Megatron parameter with the HF tensors it holds and how it is laid out:

  replicated  norms: the same on every TP rank
  vocab       embedding / output layer: rows padded to `padded_vocab`, split by rows
  row         o_proj, down_proj: split by input columns
  qkv         q/k/v weights or biases fused per query group
              ([q heads of the group; k; v] for each group), groups split over TP
  gate_up     gate/up fused as [gate shard; up shard] on each TP rank

`to_megatron` cuts one TP rank's shard from HF tensors; `to_hf` rebuilds the HF
tensors from the shards of every TP rank. Both are pure tensor code (no process
group), so the round trip is checked without one; the learner gathers the shards.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

VOCAB_MULTIPLE = 128  # per TP rank, as Megatron-LM pads (make_vocab_size_divisible_by)


class UnsupportedModel(ValueError):
    pass


@dataclass(frozen=True)
class Arch:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    rms_eps: float
    rope_theta: float
    max_positions: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool

    def padded_vocab(self, tp_size: int) -> int:
        m = VOCAB_MULTIPLE * tp_size
        return (self.vocab_size + m - 1) // m * m


def arch_from_hf(config) -> Arch:
    """The conversion's view of an HF config; anything it cannot represent is refused."""
    family = config.model_type
    if family not in ("qwen2", "qwen3", "llama"):
        raise UnsupportedModel(f"model_type {family!r}: supported are qwen2, qwen3, llama")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UnsupportedModel(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModel("MLP biases are not supported")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act {config.hidden_act!r}: only silu (SwiGLU) is supported")
    heads = config.num_attention_heads
    return Arch(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        ffn_hidden_size=config.intermediate_size, vocab_size=config.vocab_size,
        rms_eps=config.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        max_positions=config.max_position_embeddings, tied=bool(config.tie_word_embeddings),
        qkv_bias=family == "qwen2" or bool(getattr(config, "attention_bias", False)),
        qk_norm=family == "qwen3",
    )


@dataclass(frozen=True)
class Unit:
    megatron: str
    hf: tuple[str, ...]
    kind: str


def units(arch: Arch) -> list[Unit]:
    """Every Megatron parameter, in model order, with the HF tensors it holds."""
    embed = ("model.embed_tokens.weight", "lm_head.weight") if arch.tied else ("model.embed_tokens.weight",)
    out = [Unit("embedding.word_embeddings.weight", embed, "vocab")]
    for i in range(arch.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        a = h + "self_attn."
        out.append(Unit(m + "input_layernorm.weight", (h + "input_layernorm.weight",), "replicated"))
        out.append(Unit(m + "self_attention.linear_qkv.weight",
                        tuple(a + f"{p}_proj.weight" for p in "qkv"), "qkv"))
        if arch.qkv_bias:
            out.append(Unit(m + "self_attention.linear_qkv.bias",
                            tuple(a + f"{p}_proj.bias" for p in "qkv"), "qkv"))
        if arch.qk_norm:
            out.append(Unit(m + "self_attention.q_layernorm.weight", (a + "q_norm.weight",), "replicated"))
            out.append(Unit(m + "self_attention.k_layernorm.weight", (a + "k_norm.weight",), "replicated"))
        out.append(Unit(m + "self_attention.linear_proj.weight", (a + "o_proj.weight",), "row"))
        out.append(Unit(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), "replicated"))
        out.append(Unit(m + "mlp.linear_fc1.weight",
                        (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), "gate_up"))
        out.append(Unit(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "row"))
    out.append(Unit("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"))
    if not arch.tied:
        out.append(Unit("output_layer.weight", ("lm_head.weight",), "vocab"))
    return out


def check_tp(arch: Arch, tp_size: int) -> None:
    for what, n in (("num_key_value_heads", arch.num_kv_heads), ("num_attention_heads", arch.num_heads),
                    ("intermediate_size", arch.ffn_hidden_size)):
        if n % tp_size:
            raise UnsupportedModel(f"{what}={n} is not divisible by tensor_parallel_size={tp_size}")


def _group_rows(arch: Arch) -> list[int]:
    """Rows of one query group's [q heads; k; v] block in the fused QKV tensor."""
    return [arch.num_heads // arch.num_kv_heads * arch.head_dim, arch.head_dim, arch.head_dim]


def to_megatron(unit: Unit, arch: Arch, hf: Mapping[str, torch.Tensor], tp_rank: int,
                tp_size: int) -> torch.Tensor:
    """TP rank `tp_rank`'s shard of `unit`, cut from HF tensors."""
    # A tied head is stored once, so only units that fuse several tensors read them all.
    t = [hf[n] for n in unit.hf] if unit.kind in ("qkv", "gate_up") else [hf[unit.hf[0]]]
    if unit.kind == "replicated":
        return t[0].clone()
    if unit.kind == "row":
        return t[0].chunk(tp_size, dim=1)[tp_rank].clone()
    if unit.kind == "vocab":
        w = t[0]
        padded = w.new_zeros((arch.padded_vocab(tp_size), *w.shape[1:]))
        padded[:w.shape[0]] = w
        return padded.chunk(tp_size, dim=0)[tp_rank].clone()
    if unit.kind == "gate_up":
        return torch.cat([x.chunk(tp_size, dim=0)[tp_rank] for x in t])
    if unit.kind == "qkv":
        g = arch.num_kv_heads
        rest = t[0].shape[1:]
        fused = torch.cat([x.reshape(g, -1, *rest) for x in t], dim=1)
        return fused.chunk(tp_size, dim=0)[tp_rank].reshape(-1, *rest).clone()
    raise AssertionError(unit.kind)


def to_hf(unit: Unit, arch: Arch, shards: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF tensors of `unit` from the shards of all TP ranks (in rank order)."""
    if unit.kind == "replicated":
        full = [shards[0]]
    elif unit.kind == "row":
        full = [torch.cat(shards, dim=1)]
    elif unit.kind == "vocab":
        full = [torch.cat(shards, dim=0)[:arch.vocab_size]] * len(unit.hf)  # a tied head: same tensor
    elif unit.kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        full = [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    elif unit.kind == "qkv":
        g = arch.num_kv_heads
        rest = shards[0].shape[1:]
        fused = torch.cat(shards, dim=0).reshape(g, -1, *rest)
        full = [x.reshape(-1, *rest) for x in fused.split(_group_rows(arch), dim=1)]
    else:
        raise AssertionError(unit.kind)
    return {n: x.contiguous() for n, x in zip(unit.hf, full)}


def to_hf_shard(unit: Unit, arch: Arch, shard: torch.Tensor, tp_size: int) -> dict[str, torch.Tensor]:
    """One TP rank's shard of `unit` as HF tensors split the way vLLM splits them over
    the same TP size (q/k/v and gate/up rows, o/down columns; norms whole): what that
    rank sends in a sharded update. A rank holds its query groups whole, so its shard
    converts as the whole unit of a model with 1/tp_size of the heads. Vocabulary units
    pad differently in Megatron and vLLM: they travel whole (`to_hf`)."""
    if unit.kind == "vocab":
        raise ValueError(f"{unit.megatron}: vocabulary units travel whole, not as shards")
    local = replace(arch, num_heads=arch.num_heads // tp_size, num_kv_heads=arch.num_kv_heads // tp_size)
    return to_hf(unit, local, [shard])


def hf_shapes(unit: Unit, arch: Arch, shard: torch.Tensor, tp_size: int) -> dict[str, tuple[int, ...]]:
    """The HF shapes `to_hf` will produce, from one rank's shard (no data moved)."""
    meta = [torch.empty(shard.shape, device="meta")] * tp_size
    return {n: tuple(t.shape) for n, t in to_hf(unit, arch, meta).items()}
