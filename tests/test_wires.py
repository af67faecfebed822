"""The same-host wires' pure parts: choosing a wire from placement, the shared region's
life cycle (map, stamp, refuse a stale stamp, release), and clear refusals."""
from pathlib import Path

import pytest
import torch

from rlloop.actors.weight_sync import auto_backend
from rlloop.weights.group import WeightGroupConfig
from rlloop.weights.protocol import ParameterInfo, WeightUpdateError, make_plan
from rlloop.weights.sender import WeightSender
from rlloop.weights.shared import OpenedRegion, SharedRegion, mailbox_name


def test_auto_backend_follows_placement():
    cpu = {"node": "a", "gpus": []}
    assert auto_backend(cpu, [cpu, cpu]) == "shm"
    assert auto_backend(cpu, [cpu, {"node": "b", "gpus": []}]) == "gloo"
    gpu0 = {"node": "a", "gpus": [0]}
    assert auto_backend(gpu0, [gpu0]) == "ipc"
    assert auto_backend(gpu0, [gpu0, {"node": "a", "gpus": [1]}]) == "nccl"
    assert auto_backend(gpu0, [{"node": "b", "gpus": [0]}]) == "nccl"


def _read_in_another_process(token: int, key: str, version: int) -> tuple[list[int], str]:
    """What a worker sees: the first bytes of the region, and its stamp check."""
    opened = OpenedRegion(token, key, torch.device("cpu"))
    try:
        opened.check(version)
        verdict = "ok"
    except WeightUpdateError as e:
        verdict = str(e)
    head = opened.buffer[:16].tolist()
    opened.close()
    return head, verdict


def test_shm_region_is_mapped_stamped_checked_and_released():
    import multiprocessing

    plan = make_plan([ParameterInfo("w", (64, 8), "float32"), ParameterInfo("b", (8,), "float32")],
                     bucket_bytes=1 << 10)
    region = SharedRegion("shm", 12345, plan, torch.device("cpu"))
    try:
        region.buffer[:16] = torch.arange(16, dtype=torch.uint8)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            head, verdict = pool.apply(_read_in_another_process, (12345, plan.key, 3))
            assert head == list(range(16))  # the same memory
            assert "holds v0, not the requested v3" in verdict
            region.stamp(3)
            assert pool.apply(_read_in_another_process, (12345, plan.key, 3))[1] == "ok"
    finally:
        region.close()
    assert not (Path("/dev/shm") / mailbox_name(12345, plan.key)).exists()
    with pytest.raises(WeightUpdateError, match="no segment"):
        OpenedRegion(12345, plan.key, torch.device("cpu"))


def test_ipc_needs_a_gpu_sender_and_in_place_needs_ipc():
    with pytest.raises(WeightUpdateError, match="not a GPU"):
        WeightSender(WeightGroupConfig("127.0.0.1", 1, 2, "ipc"), "cpu")
    plan = make_plan([ParameterInfo("w", (4,), "float32")])
    with pytest.raises(WeightUpdateError, match="needs the ipc wire"):
        SharedRegion("shm", 12346, plan, torch.device("cpu"), tensors={"w": torch.zeros(4)})
