"""Direct layout: where each checkpoint tensor lands inside vLLM's own parameter storage.

vLLM keeps Llama-family weights (Qwen2/2.5/3, Llama) on GPU as plain tensors, with
q/k/v and gate/up fused along the output dimension and every column/row/vocab
parallel layer sharded over its tensor-parallel ranks. Given that, an update needs no
`load_weights` call at all: the receiver copies bucket slices straight into the
parameters with one batched copy per bucket. This module computes those slices once
per (plan, worker) and checks that they tile every parameter exactly; when they do
not (repacked CPU weights, quantised or unknown layers), `build_direct_copies` raises
`LayoutMismatch` and the receiver falls back to vLLM's checkpoint-format reload.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .protocol import DTYPES, UpdatePlan, WeightUpdateError, tp_dim


class LayoutMismatch(Exception):
    pass


@dataclass(frozen=True)
class SliceCopy:
    """Copy rows/cols [start, start+length) along `dim` of plan param `param` into
    `dst` (a view of a vLLM parameter)."""

    param: int
    dim: int
    start: int
    length: int
    dst: torch.Tensor


def _kv_rows(n_rows: int, num_kv_heads: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    head_dim = n_rows // num_kv_heads
    if num_kv_heads >= tp_size:
        per = n_rows // tp_size
        return tp_rank * per, per
    # Fewer KV heads than ranks: vLLM replicates each KV head over tp_size // heads ranks.
    head = tp_rank // (tp_size // num_kv_heads)
    return head * head_dim, head_dim


def build_direct_copies(
    plan: UpdatePlan,
    named_params: dict[str, torch.Tensor],
    packed_modules: dict[str, list[str]],
    num_kv_heads: int,
    tp_rank: int,
    tp_size: int,
    sharded: bool = False,
) -> list[list[SliceCopy]]:
    """Per bucket, the slice copies that rewrite every parameter in `named_params` (of
    a partial plan: every parameter it sends; the others are left as they are).
    `sharded`: the plan holds this rank's shards of the tensors TP splits (a sharded
    request, see WeightUpdateRequest), copied whole; the rest are sliced as usual."""
    if sharded and num_kv_heads < tp_size:  # Megatron, whose ranks send shards, refuses this too
        raise WeightUpdateError(f"a sharded update needs whole KV heads per rank: {num_kv_heads} KV heads "
                                f"over {tp_size} ranks")
    index = {p.name: i for i, p in enumerate(plan.params)}
    bucket_of = {e.param: b for b, bucket in enumerate(plan.buckets) for e in bucket.entries}
    per_bucket: list[list[SliceCopy]] = [[] for _ in plan.buckets]
    for name, param in named_params.items():
        data = param.data
        if not data.is_contiguous() or data.dim() == 0:
            raise LayoutMismatch(f"{name}: storage is not a plain contiguous tensor")
        sources = _sources(name, index, packed_modules, plan.partial)
        if not sources:
            continue
        row = 0
        for shard, src_name in sources:
            info = plan.params[index[src_name]]
            if DTYPES[info.dtype] != data.dtype:
                raise LayoutMismatch(f"{name}: dtype {data.dtype} != sent {info.dtype}")
            src_shape = info.shape
            if len(src_shape) != data.dim():
                raise LayoutMismatch(f"{name}: rank {data.dim()} != sent {src_shape}")
            if data.dim() == 2 and len(sources) == 1 and data.shape[0] == src_shape[0] \
                    and data.shape[1] != src_shape[1]:
                # Row-parallel (o_proj, down_proj): shard the input dimension.
                per = data.shape[1]
                if per * tp_size != src_shape[1]:
                    raise LayoutMismatch(f"{name}: {tuple(data.shape)} vs sent {src_shape}")
                copy = SliceCopy(index[src_name], 1, tp_rank * per, per, data)
                per_bucket[bucket_of[copy.param]].append(copy)
                row = data.shape[0]
                continue
            if data.shape[1:] != torch.Size(src_shape[1:]):
                raise LayoutMismatch(f"{name}: {tuple(data.shape)} vs sent {src_shape}")
            if sharded and tp_dim(src_name) == 0:  # this rank's rows already
                start, length = 0, src_shape[0]
            elif shard in ("k_proj", "v_proj"):
                start, length = _kv_rows(src_shape[0], num_kv_heads, tp_rank, tp_size)
            elif len(sources) == 1:
                # Replicated, column-parallel or vocab-parallel (padded rows stay as they are).
                per = data.shape[0]
                start = tp_rank * per if per != src_shape[0] else 0
                length = max(0, min(per, src_shape[0] - start))
            else:
                length = src_shape[0] // tp_size
                start = tp_rank * length
            dst = data.narrow(0, row, length)
            per_bucket[bucket_of[index[src_name]]].append(
                SliceCopy(index[src_name], 0, start, length, dst))
            row += length
        if len(sources) > 1 and row != data.shape[0]:
            raise LayoutMismatch(f"{name}: fused shards cover {row} of {data.shape[0]} rows")
    return per_bucket


def _sources(name: str, index: dict[str, int], packed: dict[str, list[str]], partial: bool = False):
    """The checkpoint tensors that make up vLLM parameter `name`, in fused order; none
    when a partial plan sends none of them."""
    if name in index:
        return [(None, name)]
    module, _, leaf = name.rpartition(".")
    parent, _, fused = module.rpartition(".")
    if partial and not any(f"{parent}.{shard}.{leaf}" in index for shard in packed.get(fused, (fused,))):
        return []
    for shard in packed.get(fused, ()):
        src = f"{parent}.{shard}.{leaf}"
        if src not in index:
            raise LayoutMismatch(f"{name}: fused shard {src} is not in the plan")
    if fused in packed:
        return [(shard, f"{parent}.{shard}.{leaf}") for shard in packed[fused]]
    raise LayoutMismatch(f"{name}: no checkpoint tensor maps to this parameter")


def as_full(name: str, shard: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """A tensor of the checkpoint's full shape holding TP rank `tp_rank`'s shard where
    that rank reads it (zeros elsewhere): how a sharded update reaches vLLM's loader,
    which cuts its rank's part out of full checkpoint tensors."""
    dim = tp_dim(name)
    if dim is None or tp_size == 1:
        return shard
    n = shard.shape[dim]
    full = shard.new_zeros((*shard.shape[:dim], n * tp_size, *shard.shape[dim + 1:]))
    full.narrow(dim, tp_rank * n, n).copy_(shard)
    return full


def bucket_view(buffer: torch.Tensor, plan: UpdatePlan, param: int, offset: int) -> torch.Tensor:
    """Typed view of plan param `param` stored at byte `offset` of `buffer`."""
    info = plan.params[param]
    return buffer[offset:offset + info.nbytes].view(DTYPES[info.dtype]).view(info.shape)


def bucket_views(buffer: torch.Tensor, plan: UpdatePlan, bucket: int) -> list[tuple[int, torch.Tensor]]:
    return [(e.param, bucket_view(buffer, plan, e.param, e.offset))
            for e in plan.buckets[bucket].entries]


def copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """dst[i].copy_(src[i]) for all i; one fused kernel when devices agree."""
    if dsts and dsts[0].device == srcs[0].device:
        torch._foreach_copy_(dsts, srcs)
    else:
        for d, s in zip(dsts, srcs):
            d.copy_(s)
