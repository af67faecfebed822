"""The weight group: a side process group between one sender (rank 0) and every
engine worker (ranks 1..N), independent of any torch.distributed default group.

It uses vLLM's stateless process-group helper so it can coexist with vLLM's own
tensor-parallel group and with the learner's megatron groups in the same process.
"""
from __future__ import annotations

import inspect
import secrets
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import torch


@dataclass(frozen=True)
class WeightGroupConfig:
    host: str
    port: int
    world_size: int  # 1 sender + the total TP size of all engines
    backend: str  # "gloo" on CPU, "nccl" on GPU
    timeout_s: float = 120.0
    # Learner TP ranks that send: 1, rank 0 with the gathered tensors; the learner's TP
    # size, each rank its own shard to the engine workers of its TP rank (shared wires,
    # engines of the learner's TP size; see WeightUpdateRequest).
    senders: int = 1
    # Learner DP replicas that send (shared wires): engine e takes its weights from
    # replica e % replicas, the one on its GPU when colocated (placement.colocated).
    # The region of the learner rank that sends is named after its global rank.
    replicas: int = 1
    # Names this group's shared segments (shm, ipc wires). Unique per group formed, never
    # the port: a port comes back in a later run, and so would a segment's name.
    token: str = field(default_factory=lambda: secrets.token_hex(8))


def wire_device(cfg: WeightGroupConfig, device: torch.device) -> torch.device:
    """Where bucket buffers must live to travel over the group: gloo carries only CPU
    tensors (a GPU sender/receiver then stages through host memory)."""
    return torch.device(device) if cfg.backend == "nccl" else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (NCCL broadcasts, copies) so timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WeightGroupTimeout(TimeoutError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def join_weight_group(cfg: WeightGroupConfig, rank: int):
    """Join the group as `rank`; every member must call this within cfg.timeout_s."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    kwargs = {}
    # vLLM 0.32 takes a timeout; 0.26 only its environment default. Both honour the
    # TCPStore rendezvous timeout below.
    if "timeout" in inspect.signature(stateless_init_torch_distributed_process_group).parameters:
        kwargs["timeout"] = timedelta(seconds=cfg.timeout_s)
    try:
        return stateless_init_torch_distributed_process_group(
            cfg.host, cfg.port, rank, cfg.world_size, cfg.backend, **kwargs
        )
    except Exception as e:  # torch raises DistStoreError / RuntimeError on timeouts
        raise WeightGroupTimeout(
            f"weight group {cfg.host}:{cfg.port} rank {rank}/{cfg.world_size} did not "
            f"form within {cfg.timeout_s:.0f}s ({type(e).__name__}: {e})"
        ) from e


def broadcast_async(group, tensor: torch.Tensor):
    """Start a broadcast from rank 0 of the weight group; returns the Work handle."""
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    return group.broadcast([tensor], opts)
