"""The receiving side: a vLLM worker extension (pass its qualified name as
`worker_extension_cls`), so these methods run inside every vLLM worker and are called
through `collective_rpc`.

Two ways to land an update, chosen once per plan:
- "direct": bucket slices are copied straight into vLLM's parameter storage (see
  layout.py). Two bucket buffers alternate, so receiving bucket i+1 overlaps the copy
  out of bucket i. No load_weights call, no metadata built per step.
- "checkpoint": the general path (repacked CPU weights, quantised models): all buckets
  are received asynchronously into persistent buffers while vLLM's own
  `reload_weights(is_checkpoint_format=True)` consumes them in arrival order.

On a shared wire (shm, ipc: shared.py) nothing is received: the bucket buffers are
views of the sender's region, mapped once per plan, and both modes read from them.
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch

from .group import (WeightGroupConfig, broadcast_async, join_weight_group, synchronize,
                    wire_device)
from .layout import LayoutMismatch, as_full, bucket_view, bucket_views, build_direct_copies, copy_all
from .protocol import UpdatePlan, WeightUpdateError, WeightUpdateRequest, unpack
from .shared import SHARED_WIRES, OpenedRegion

RECEIVE_MODES = ("auto", "direct", "checkpoint")


class _PlanState:
    """What a worker derives from one plan, once: buffers and, for direct mode, copies."""

    def __init__(self, plan: UpdatePlan, mode: str, buffers: list[torch.Tensor], copies, reason: str = "",
                 region: OpenedRegion | None = None, shard: tuple[int, int] | None = None):
        self.plan = plan
        self.shard = shard  # a sharded plan: (this worker's TP rank, TP size), whose shards it holds
        self.mode = mode
        self.buffers = buffers  # bucket i arrives in (or, shared, is) buffers[i % len(buffers)]
        self.copies = copies
        self.reason = reason
        self.region = region
        self.scratch: torch.Tensor | None = None  # shared wires' floor: a worker-owned copy target

    def close(self) -> None:
        self.buffers = self.copies = self.scratch = None  # views first: a segment with views cannot close
        if self.region is not None:
            self.region.close()


class WeightReceiver:
    """Mixed into vLLM's Worker class; `self.model_runner` and `self.device` are vLLM's."""

    def rl_join_weight_group(self, cfg: bytes, rank_offset: int, replica: int = 0) -> int:
        from vllm.distributed.parallel_state import get_world_group

        cfg: WeightGroupConfig = unpack(cfg)
        self.rl_leave_weight_group()  # a worker is in one weight group at a time
        rank = rank_offset + get_world_group().rank_in_group
        self._rl_cfg = cfg
        self._rl_replica = replica  # the learner DP replica whose regions this worker maps
        self._rl_group = None if cfg.backend in SHARED_WIRES else join_weight_group(cfg, rank)
        self._rl_wire = wire_device(cfg, self.device)
        self._rl_plans: dict[str, _PlanState] = {}
        return rank

    def rl_leave_weight_group(self) -> None:
        group = getattr(self, "_rl_group", None)
        if group is not None:
            from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

            stateless_destroy_torch_distributed_process_group(group)
        self._rl_group = None
        for state in getattr(self, "_rl_plans", {}).values():
            state.close()
        self._rl_plans = {}

    def rl_packed_modules(self) -> dict[str, list[str]]:
        """vLLM's fused modules and the checkpoint shards each takes (qkv_proj: q, k, v)."""
        return {k: list(v) for k, v in getattr(self.model_runner.get_model(), "packed_modules_mapping", {}).items()}

    def rl_free_device_bytes(self) -> int:
        """Free memory on this worker's GPU (what sleep mode releases shows here)."""
        return torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else 0

    def rl_prepare(self, request: bytes, mode: str = "auto") -> str:
        """Build (once per plan) this worker's buffers and copy plan; returns the mode."""
        return self._rl_plan_state(unpack(request), mode).mode

    def rl_receive(self, plan_key: str, version: int, mode: str = "auto", load: bool = True,
                   tp_size: int = 1) -> dict:
        """Receive `version` of the prepared plan `plan_key` (sent whole, or sharded over
        `tp_size` learner ranks) and load it. `load=False` only receives the bytes (the
        benchmark's floor). Returns timings in ms, measured on this worker."""
        state = self._rl_plans.get(_state_key(plan_key, mode, tp_size))
        if state is None:
            raise WeightUpdateError(f"plan {plan_key!r} ({mode}, tp_size {tp_size}) was not prepared on this "
                                    "worker (rl_prepare)")
        plan = state.plan
        t0 = time.perf_counter()
        if state.region is not None and not load:
            if state.region.buffer is None:
                raise ValueError("an in-place region has no bucket buffer to copy (raw floor)")
            if state.scratch is None:
                state.scratch = torch.empty_like(state.region.buffer)
            state.scratch.copy_(state.region.buffer)
        elif not load:
            for i, b in enumerate(plan.buckets):
                broadcast_async(self._rl_group, state.buffers[i % len(state.buffers)][:b.nbytes]).wait()
        elif state.mode == "direct":
            self._rl_receive_direct(state, version)
        else:
            self._rl_receive_checkpoint(state, version)
        synchronize(self.device)
        return {"mode": state.mode if load else "raw", "worker_ms": (time.perf_counter() - t0) * 1e3,
                "fallback_reason": state.reason}

    # --- internals -------------------------------------------------------------------

    def _rl_plan_state(self, request: WeightUpdateRequest, mode: str) -> _PlanState:
        if mode not in RECEIVE_MODES:
            raise ValueError(f"receive mode {mode!r} not in {RECEIVE_MODES}")
        key = _state_key(request.plan.key, mode, request.tp_size)
        state = self._rl_plans.get(key)
        if state is None:
            if self._rl_group is None:  # shared wire: the sender keeps one plan's region
                for stale in [k for k in self._rl_plans if not k.startswith(f"{request.plan.key}/")]:
                    self._rl_plans.pop(stale).close()
            state = self._rl_build_plan_state(request, mode)
            self._rl_plans[key] = state
        return state

    def _rl_bucket_buffers(self, plan: UpdatePlan, mode: str, sender: int):
        """Where buckets land: two alternating buffers (direct), one per bucket
        (checkpoint), or, on a shared wire, views of the region of `sender`."""
        if self._rl_group is None:
            region = OpenedRegion(self._rl_cfg.token, plan.key, self.device, sender)
            if region.tensors is not None:
                return None, region
            return [region.buffer[s:s + b.nbytes] for s, b in zip(plan.bucket_starts(), plan.buckets)], region
        if mode == "direct":
            largest = max(b.nbytes for b in plan.buckets)
            return [torch.empty(largest, dtype=torch.uint8, device=self._rl_wire)
                    for _ in range(min(2, len(plan.buckets)))], None
        return [torch.empty(b.nbytes, dtype=torch.uint8, device=self._rl_wire) for b in plan.buckets], None

    def _rl_build_plan_state(self, request: WeightUpdateRequest, mode: str) -> _PlanState:
        from vllm.distributed.parallel_state import get_tp_group

        plan = request.plan
        reason = ""
        shard = None
        if request.tp_size > 1:  # sharded: this worker takes the shard of the learner rank of its TP rank
            if self._rl_group is not None:
                raise WeightUpdateError("a sharded update travels on a shared wire (shm, ipc), one region per rank")
            shard = (get_tp_group().rank_in_group, request.tp_size)
        # The sending learner rank's global rank: its replica's first, plus the shard's TP rank.
        sender = self._rl_replica * request.tp_size + (shard[0] if shard else 0)
        if mode in ("auto", "direct"):
            try:
                per_bucket = self._rl_direct_copies(request)
                buffers, region = self._rl_bucket_buffers(plan, "direct", sender)
                # Source views are fixed too: bucket i always lands in buffer i % len(buffers)
                # (in place: each parameter is the sender's own tensor).
                copies = []
                for i, bucket_copies in enumerate(per_bucket):
                    offsets = {e.param: e.offset for e in plan.buckets[i].entries}
                    srcs = [(region.tensors[c.param] if buffers is None else
                             bucket_view(buffers[i % len(buffers)], plan, c.param, offsets[c.param]))
                            .narrow(c.dim, c.start, c.length) for c in bucket_copies]
                    copies.append(([c.dst for c in bucket_copies], srcs))
                return _PlanState(plan, "direct", buffers, copies, region=region, shard=shard)
            except LayoutMismatch as e:
                if mode == "direct":
                    raise
                reason = str(e)
        buffers, region = self._rl_bucket_buffers(plan, "checkpoint", sender)
        return _PlanState(plan, "checkpoint", buffers, None, reason, region, shard)

    def _rl_direct_copies(self, request: WeightUpdateRequest):
        from vllm.distributed.parallel_state import get_tp_group

        model = self.model_runner.get_model()
        if getattr(self.model_runner.model_config, "quantization", None):
            raise LayoutMismatch("quantised model")
        hf = self.model_runner.model_config.hf_config.get_text_config()
        tp = get_tp_group()
        return build_direct_copies(
            request.plan,
            dict(model.named_parameters()),
            getattr(model, "packed_modules_mapping", {}),
            getattr(hf, "num_key_value_heads", hf.num_attention_heads),
            tp.rank_in_group,
            tp.world_size,
            sharded=request.tp_size > 1,
        )

    def _rl_receive_direct(self, state: _PlanState, version: int) -> None:
        plan = state.plan
        if state.region is not None:  # shared: every bucket is already in place
            state.region.check(version)
            copy_all([d for dsts, _ in state.copies for d in dsts], [s for _, srcs in state.copies for s in srcs])
            return
        n_buf = len(state.buffers)
        for i, bucket in enumerate(plan.buckets):
            buf = state.buffers[i % n_buf][:bucket.nbytes]
            # On NCCL this only orders streams: the previous copy out of `buf` was
            # enqueued first, and this broadcast waits for it on the device.
            broadcast_async(self._rl_group, buf).wait()
            dsts, srcs = state.copies[i]
            if dsts:
                copy_all(dsts, srcs)

    def _rl_receive_checkpoint(self, state: _PlanState, version: int) -> None:
        plan = state.plan

        def full(name: str, t: torch.Tensor) -> torch.Tensor:  # vLLM's loader cuts its rank's part itself
            return as_full(name, t, *state.shard) if state.shard else t

        if state.region is not None:
            state.region.check(version)
            if state.region.tensors is not None:  # in place: the sender's own tensors
                weights = ((p.name, full(p.name, t)) for p, t in zip(plan.params, state.region.tensors))
                with _quiet_partial_reload(plan):
                    self.model_runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
                return
        works = [broadcast_async(self._rl_group, buf) if state.region is None else None for buf in state.buffers]

        def weights():
            for i, work in enumerate(works):
                if work is not None:
                    work.wait()
                for param, view in bucket_views(state.buffers[i], plan, i):
                    name = plan.params[param].name
                    yield name, full(name, view)

        with _quiet_partial_reload(plan):
            self.model_runner.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)


def _state_key(plan_key: str, mode: str, tp_size: int) -> str:
    return f"{plan_key}/{mode}/{tp_size}"


@contextlib.contextmanager
def _quiet_partial_reload(plan: UpdatePlan):
    """vLLM's reload warns, every update, of each module a checkpoint left out: a
    partial plan leaves modules out by design (validated: only whole ones)."""
    if not plan.partial:
        yield
        return
    loggers = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{m}") for m in ("inplace", "layerwise")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
