"""Driving in-flight updates from the sender's process: form the weight group with
every engine, then push updates (validate everywhere first, then send).

The sender (a learner rank, a benchmark, a test) calls these; engines are Ray handles
of GenerationEngine.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import ray

from rlloop.weights.group import WeightGroupConfig, free_port
from rlloop.weights.protocol import WeightUpdateRequest, check_version
from rlloop.weights.sender import WeightSender
from rlloop.weights.shared import SHARED_WIRES


def weight_group_config(tp_sizes: Sequence[int], backend: str, host: str | None = None,
                        timeout_s: float = 120.0, port: int | None = None, senders: int = 1,
                        replicas: int = 1) -> WeightGroupConfig:
    """Sender = rank 0, at `host:port` (default: this node, a free port); engine e's
    workers follow those of engines < e. `senders`, `replicas`: see WeightGroupConfig."""
    host = host or ray.util.get_node_ip_address()
    return WeightGroupConfig(host, port or free_port(host), 1 + sum(tp_sizes), backend, timeout_s, senders,
                             replicas)


def join_engines(engines: Sequence, tp_sizes: Sequence[int], cfg: WeightGroupConfig) -> list:
    """Engine i takes its weights from learner DP replica i % cfg.replicas."""
    offsets = [1 + sum(tp_sizes[:i]) for i in range(len(engines))]
    return [e.init_weight_group.remote(cfg, off, i % cfg.replicas) for i, (e, off) in enumerate(zip(engines, offsets))]


def form_weight_group(engines: Sequence, tp_sizes: Sequence[int], backend: str, device="cpu",
                      host: str | None = None, timeout_s: float = 120.0, in_place: bool = False) -> WeightSender:
    """Form the group with this process as the sender; returns the sender once every
    engine worker has joined (`in_place`: see WeightSender)."""
    cfg = weight_group_config(tp_sizes, backend, host, timeout_s)
    joins = join_engines(engines, tp_sizes, cfg)
    with ThreadPoolExecutor(1) as pool:
        sender = pool.submit(WeightSender, cfg, device, in_place)
        # An engine that fails to join raises here at once instead of leaving the
        # sender waiting out its timeout.
        pending = joins
        while pending and not sender.done():
            done, pending = ray.wait(pending, timeout=0.2)
            ray.get(done)
        ray.get(pending, timeout=timeout_s)
        return sender.result()


class UpdatePusher:
    """Drives in-flight updates of one formed weight group from the sender's side.

    A plan travels once: its first update is validated and prepared on every engine
    before anything changes anywhere (a bad request raises here, every engine keeps
    its weights and the sender has not started); later updates of the plan are
    tickets (its key and the version), one call per engine. On a shared wire (shm,
    ipc) the sender fills its region first and the engines then copy out of it; the
    next send waits for all of them. On a broadcast wire the engines receive while
    `send` broadcasts. Form a new pusher with each group (engines forget their plans
    when they join one)."""

    def __init__(self, engines: Sequence, shared: bool):
        self.engines = list(engines)
        self.shared = shared
        self._prepared: set[tuple[str, str | None]] = set()  # (plan key, mode) on every engine
        # Versions only rise: a stale ticket is refused here, before any engine or the
        # sender starts (one engine refusing mid-broadcast would leave the others waiting).
        self.version = max(ray.get([e.version.remote() for e in self.engines]))

    def _prepare(self, request: WeightUpdateRequest, mode: str | None) -> None:
        if (request.plan.key, mode) not in self._prepared:
            ray.get([e.prepare_update.remote(request, mode) for e in self.engines])
            self._prepared.add((request.plan.key, mode))

    def push(self, request: WeightUpdateRequest, send: Callable[[], dict],
             mode: str | None = None, kv: str | None = None) -> tuple[list, dict]:
        """Update every engine to `request`; `send` makes the sender send it. Returns the
        engines' UpdateStats and what `send` returned. `mode` and `kv` override the
        engines' receive mode and kv_after_update for this update."""
        check_version(request.version, self.version)
        ticket = request.ticket()
        if self.shared:
            send_stats = send()
            self._prepare(request, mode)  # the workers map the region the send created
            stats = ray.get([e.update_weights.remote(ticket, mode, kv) for e in self.engines])
        else:
            self._prepare(request, mode)
            updates = [e.update_weights.remote(ticket, mode, kv) for e in self.engines]
            send_stats = send()
            stats = ray.get(updates)
        self.version = request.version
        return stats, send_stats


def placement() -> dict:
    """Where the calling Ray actor runs: its node, the GPUs Ray gave it, and whether it
    can use them (a simulated cluster declares GPUs a CPU machine lacks)."""
    import torch

    ctx = ray.get_runtime_context()
    return {"node": ctx.get_node_id(), "gpus": sorted(int(g) for g in ray.get_gpu_ids()),
            "cuda": torch.cuda.is_available()}


def per_rank_senders(wire: str, learner_tp: int, ranks: Sequence[dict], engine_tp: int,
                     engines: Sequence[dict]) -> int:
    """How many learner TP ranks send (WeightGroupConfig.senders): every one, each its own
    shard, when the wire is shared, every engine has the learner's TP size and learner
    rank r shares worker r's host (shm) or GPU (ipc); else 1, rank 0 with the gathered
    tensors. `ranks`: the learner ranks' placements (DP rank 0's TP ranks come first)."""
    if wire not in SHARED_WIRES or learner_tp == 1 or engine_tp != learner_tp:
        return 1
    tp_ranks = ranks[:learner_tp]
    if wire == "shm":
        together = all(e["node"] == r["node"] for e in engines for r in tp_ranks)
    else:
        together = all(e["node"] == tp_ranks[0]["node"] and e["gpus"] == [g for r in tp_ranks for g in r["gpus"]]
                       for e in engines)
    return learner_tp if together else 1


def auto_backend(sender: dict | Sequence[dict], engines: Sequence[dict]) -> str:
    """The wire for a sender and engines placed as `{"node": id, "gpus": [ids]}` (or
    one sender per engine: colocated DP replicas): ipc when every engine is on its
    sender's GPU, shm for CPU processes on one host, else nccl between GPUs and gloo
    between hosts."""
    senders = [sender] * len(engines) if isinstance(sender, dict) else list(sender)
    same_node = all(e["node"] == s["node"] for s, e in zip(senders, engines))
    if not senders[0]["gpus"] or not senders[0].get("cuda", True):
        return "shm" if same_node else "gloo"
    if same_node and all(e["gpus"] == s["gpus"] for s, e in zip(senders, engines)):
        return "ipc"
    return "nccl"
