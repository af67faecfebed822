"""Driving an in-flight update from the sender's process: form the weight group with
every engine, then validate-everywhere-first and broadcast.

The sender (a learner rank, a benchmark, a test) calls these; engines are Ray handles
of GenerationEngine.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import ray

from rlloop.weights.group import WeightGroupConfig, free_port
from rlloop.weights.protocol import WeightUpdateRequest
from rlloop.weights.sender import WeightSender


def weight_group_config(tp_sizes: Sequence[int], backend: str, host: str | None = None,
                        timeout_s: float = 120.0) -> WeightGroupConfig:
    """Sender = rank 0 on this node; engine e's workers follow those of engines < e."""
    host = host or ray.util.get_node_ip_address()
    return WeightGroupConfig(host, free_port(host), 1 + sum(tp_sizes), backend, timeout_s)


def join_engines(engines: Sequence, tp_sizes: Sequence[int], cfg: WeightGroupConfig) -> list:
    offsets = [1 + sum(tp_sizes[:i]) for i in range(len(engines))]
    return [e.init_weight_group.remote(cfg, off) for e, off in zip(engines, offsets)]


def form_weight_group(engines: Sequence, tp_sizes: Sequence[int], backend: str, device="cpu",
                      host: str | None = None, timeout_s: float = 120.0) -> WeightSender:
    """Form the group with this process as the sender; returns the sender once every
    engine worker has joined."""
    cfg = weight_group_config(tp_sizes, backend, host, timeout_s)
    joins = join_engines(engines, tp_sizes, cfg)
    with ThreadPoolExecutor(1) as pool:
        sender = pool.submit(WeightSender, cfg, device)
        # An engine that fails to join raises here at once instead of leaving the
        # sender waiting out its timeout.
        pending = joins
        while pending and not sender.done():
            done, pending = ray.wait(pending, timeout=0.2)
            ray.get(done)
        ray.get(pending, timeout=timeout_s)
        return sender.result()


def push_update(engines: Sequence, request: WeightUpdateRequest,
                send: Callable[[], dict], mode: str | None = None) -> tuple[list, dict]:
    """Every engine validates and prepares first (a bad request raises here and
    nothing has changed anywhere); then all receive while `send` broadcasts."""
    ray.get([e.prepare_update.remote(request, mode) for e in engines])
    updates = [e.update_weights.remote(request, mode) for e in engines]
    send_stats = send()
    return ray.get(updates), send_stats
