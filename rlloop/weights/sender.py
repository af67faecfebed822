"""The sending side: rank 0 of the weight group. Packs named tensors into the plan's
buckets and hands them to every engine worker over the group's wire:

- gloo / nccl: bucket by bucket over a broadcast; two pack buffers alternate, so
  packing bucket i+1 overlaps the broadcast of bucket i.
- shm / ipc (shared.py): into one region the workers have mapped; they copy out of it
  after the sender returns (so `push_update` runs the sender first). With ipc and
  `in_place=True` the sender's tensors themselves are the region (no packing): for
  tensors that stay where they are between updates, such as a model's parameters.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping

import torch

from .group import (WeightGroupConfig, broadcast_async, join_weight_group, synchronize,
                    wire_device)
from .layout import bucket_views, copy_all
from .protocol import DTYPES, UpdatePlan, WeightUpdateError, WeightUpdateRequest
from .shared import SHARED_WIRES, SharedRegion


class WeightSender:
    def __init__(self, cfg: WeightGroupConfig, device: torch.device | str = "cpu", in_place: bool = False,
                 sender: int = 0):
        """`sender`: the learner TP rank this sender shares the shard of (a sharded
        update: cfg.senders > 1, shared wires only)."""
        self.cfg = cfg
        self.sender = sender
        self.device = torch.device(device)
        self.shared = cfg.backend in SHARED_WIRES
        self.in_place = in_place and cfg.backend == "ipc"
        if cfg.backend == "ipc" and self.device.type != "cuda":
            raise WeightUpdateError(f"ipc wire: the sender is on {self.device}, not a GPU (use shm on CPU)")
        if sender and not self.shared:
            raise WeightUpdateError(f"sender {sender}: only shared wires (shm, ipc) have one sender per TP rank")
        self.group = None if self.shared else join_weight_group(cfg, rank=0)
        self._buffers: dict[str, list[torch.Tensor]] = {}
        self._region: tuple[str, SharedRegion] | None = None

    def _buffers_for(self, plan: UpdatePlan) -> list[torch.Tensor]:
        bufs = self._buffers.get(plan.key)
        if bufs is None:
            largest = max(b.nbytes for b in plan.buckets)
            bufs = [torch.empty(largest, dtype=torch.uint8, device=wire_device(self.cfg, self.device))
                    for _ in range(min(2, len(plan.buckets)))]
            self._buffers = {plan.key: bufs}  # one model per sender: drop older plans
        return bufs

    def publish(self, plan: UpdatePlan, tensors: Mapping[str, torch.Tensor] | None = None) -> SharedRegion:
        """The shared region for `plan` (created once; an older plan's is released);
        in place, `tensors` are shared themselves."""
        if self._region is None or self._region[0] != plan.key:
            if self._region is not None:
                self._region[1].close()
            self._region = (plan.key, SharedRegion(self.cfg.backend, self.cfg.token, plan,
                                                   self.device, tensors if self.in_place else None, self.sender))
        return self._region[1]

    def check(self, request: WeightUpdateRequest, tensors: Mapping[str, torch.Tensor]) -> None:
        """The tensors must be exactly what the plan says, or nothing is sent."""
        for p in request.plan.params:
            t = tensors.get(p.name)
            if t is None:
                raise WeightUpdateError(f"sender has no tensor for {p.name}")
            if tuple(t.shape) != tuple(p.shape) or t.dtype != DTYPES[p.dtype]:
                raise WeightUpdateError(
                    f"{p.name}: tensor {tuple(t.shape)} {t.dtype} != plan {p.shape} {p.dtype}")

    def send(self, request: WeightUpdateRequest, buckets: Iterable[Mapping[str, torch.Tensor]]) -> dict:
        """Send what `buckets` yields, laid out as `request.plan`: one mapping per plan
        bucket, in order, holding that bucket's tensors not yielded before (it may hold
        some of later buckets too: a learner's `export`, or `buckets_of` a full
        mapping). Blocks until sent (shared wires: until the region holds them, stamped
        with the request's version)."""
        plan = request.plan
        t0 = time.perf_counter()
        if self.in_place:
            tensors = {name: t for bucket in buckets for name, t in bucket.items()}
            region = self.publish(plan, tensors)
            region.check_in_place(plan, tensors)
            synchronize(self.device)  # the optimizer step that wrote them is done
            region.stamp(request.version)
            return {"send_ms": (time.perf_counter() - t0) * 1e3, "bytes": plan.total_bytes}
        per_bucket = _entry_tensors(plan, buckets)
        if self.shared:
            region = self.publish(plan)
            for i, (start, tensors) in enumerate(zip(plan.bucket_starts(), per_bucket)):
                views = bucket_views(region.buffer[start:start + plan.buckets[i].nbytes], plan, i)
                copy_all([v for _, v in views], tensors)
            synchronize(self.device)
            region.stamp(request.version)
            return {"send_ms": (time.perf_counter() - t0) * 1e3, "bytes": plan.total_bytes}
        bufs = self._buffers_for(plan)
        works = []
        for i, (bucket, tensors) in enumerate(zip(plan.buckets, per_bucket)):
            buf = bufs[i % len(bufs)]
            if i >= len(bufs):
                works[i - len(bufs)].wait()  # buffer free again (on GPU: stream order only)
            copy_all([v for _, v in bucket_views(buf, plan, i)], tensors)
            works.append(broadcast_async(self.group, buf[:bucket.nbytes]))
        for w in works:
            w.wait()
        synchronize(self.device)
        return {"send_ms": (time.perf_counter() - t0) * 1e3, "bytes": plan.total_bytes}

    def close(self) -> None:
        from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

        if self._region is not None:
            self._region[1].close()
            self._region = None
        if self.group is not None:
            stateless_destroy_torch_distributed_process_group(self.group)
            self.group = None


def buckets_of(plan: UpdatePlan, tensors: Mapping[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """A full mapping of named tensors as `send` takes it: bucket by bucket."""
    for bucket in plan.buckets:
        yield {plan.params[e.param].name: tensors[plan.params[e.param].name] for e in bucket.entries}


def _entry_tensors(plan: UpdatePlan, buckets: Iterable[Mapping[str, torch.Tensor]]) -> Iterator[list[torch.Tensor]]:
    """Per plan bucket, its entries' tensors in entry order, drawing on `buckets` one
    mapping per bucket; a tensor is dropped as soon as it is handed out."""
    source, ready = iter(buckets), {}
    for i, bucket in enumerate(plan.buckets):
        ready.update(next(source, {}))
        names = [plan.params[e.param].name for e in bucket.entries]
        if missing := [n for n in names if n not in ready]:
            raise WeightUpdateError(f"bucket {i}: the sender was given no tensor for {missing[:3]}")
        yield [ready.pop(n) for n in names]
