"""The same-host wires' pure parts: choosing a wire from placement, the shared region's
life cycle (map, stamp, refuse a stale stamp, release), and clear refusals."""
import os
from pathlib import Path

import pytest
import torch

from rlloop.actors.weight_sync import auto_backend, per_rank_senders
from rlloop.weights.group import WeightGroupConfig
from rlloop.weights.protocol import ParameterInfo, WeightUpdateError, make_plan
from rlloop.weights.sender import WeightSender
from rlloop.weights.shared import OpenedRegion, SharedRegion, mailbox_name, remove_region


def test_auto_backend_follows_placement():
    cpu = {"node": "a", "gpus": []}
    assert auto_backend(cpu, [cpu, cpu]) == "shm"
    assert auto_backend(cpu, [cpu, {"node": "b", "gpus": []}]) == "gloo"
    gpu0 = {"node": "a", "gpus": [0]}
    assert auto_backend(gpu0, [gpu0]) == "ipc"
    assert auto_backend(gpu0, [gpu0, {"node": "a", "gpus": [1]}]) == "nccl"
    assert auto_backend(gpu0, [{"node": "b", "gpus": [0]}]) == "nccl"
    gpu1 = {"node": "a", "gpus": [1]}
    assert auto_backend([gpu0, gpu1], [gpu0, gpu1]) == "ipc"  # each engine beside the replica that serves it
    assert auto_backend([gpu0, gpu0], [gpu0, gpu1]) == "nccl"
    declared = {"node": "a", "gpus": [0], "cuda": False}  # a simulated cluster's GPUs on a CPU machine
    assert auto_backend([declared], [declared]) == "shm"


def test_learner_tp_ranks_send_their_own_shards_only_where_each_shares_its_worker_s_host_or_gpu():
    cpu = {"node": "a", "gpus": []}
    assert per_rank_senders("shm", 2, [cpu, cpu], 2, [cpu, cpu]) == 2
    assert per_rank_senders("shm", 2, [cpu, cpu, cpu, cpu], 2, [cpu]) == 2  # DP=2: DP rank 0's ranks send
    assert per_rank_senders("shm", 2, [cpu, cpu], 1, [cpu]) == 1  # engine TP differs: gathered
    assert per_rank_senders("shm", 2, [cpu, {"node": "b", "gpus": []}], 2, [cpu]) == 1
    assert per_rank_senders("gloo", 2, [cpu, cpu], 2, [cpu]) == 1  # a broadcast wire has one sender
    assert per_rank_senders("shm", 1, [cpu], 1, [cpu]) == 1
    r0, r1 = {"node": "a", "gpus": [0]}, {"node": "a", "gpus": [1]}
    assert per_rank_senders("ipc", 2, [r0, r1], 2, [{"node": "a", "gpus": [0, 1]}] * 2) == 2
    assert per_rank_senders("ipc", 2, [r0, r1], 2, [{"node": "a", "gpus": [2, 3]}]) == 1


_opened: dict[str, OpenedRegion] = {}


def _read_in_another_process(token: str, key: str, version: int) -> tuple[list[int], str]:
    """What a worker sees: the first bytes of the region, and its stamp check. The
    region stays mapped, as a worker keeps it for the life of its plan."""
    opened = _opened.setdefault(key, OpenedRegion(token, key, torch.device("cpu")))
    try:
        opened.check(version)
        verdict = "ok"
    except WeightUpdateError as e:
        verdict = str(e)
    return opened.buffer[:16].tolist(), verdict


def _names(token: str, plan_key: str) -> list[Path]:
    mailbox = Path("/dev/shm") / mailbox_name(token, plan_key)
    return [p for p in (mailbox, mailbox.with_name(mailbox.name + "-data")) if p.exists()]


def test_shm_region_is_mapped_stamped_checked_and_released():
    import multiprocessing

    plan = make_plan([ParameterInfo("w", (64, 8), "float32"), ParameterInfo("b", (8,), "float32")],
                     bucket_bytes=1 << 10)
    region = SharedRegion("shm", "t-mapped", plan, torch.device("cpu"))
    try:
        assert len(_names("t-mapped", plan.key)) == 2  # the mailbox and the data
        region.buffer[:16] = torch.arange(16, dtype=torch.uint8)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            head, verdict = pool.apply(_read_in_another_process, ("t-mapped", plan.key, 3))
            assert head == list(range(16))  # the same memory
            assert "holds v0, not the requested v3" in verdict
            region.stamp(3)
            assert pool.apply(_read_in_another_process, ("t-mapped", plan.key, 3))[1] == "ok"
    finally:
        region.close()
    assert not _names("t-mapped", plan.key)
    with pytest.raises(WeightUpdateError, match="no segment"):
        OpenedRegion("t-mapped", plan.key, torch.device("cpu"))


def _share_and_die(token: str, plan) -> None:
    SharedRegion("shm", token, plan, torch.device("cpu"))
    os._exit(0)  # as a killed learner does: no close, no unlink, no resource tracker


def test_a_dead_senders_region_is_removed_by_the_workers_that_mapped_it():
    import multiprocessing

    plan = make_plan([ParameterInfo("w", (16,), "float32")])
    sender = multiprocessing.get_context("spawn").Process(target=_share_and_die, args=("t-dead", plan))
    sender.start()
    sender.join(60)
    assert len(_names("t-dead", plan.key)) == 2, "the dead sender left its names behind"
    OpenedRegion("t-dead", plan.key, torch.device("cpu")).close()  # the group is re-formed
    assert not _names("t-dead", plan.key)


def test_a_dead_senders_region_is_removed_by_its_successor():
    """When the sender and every worker that mapped its region died, the re-formed
    group's sender removes the old group's names from the token and plan key alone."""
    import multiprocessing

    plan = make_plan([ParameterInfo("w", (16,), "float32")])
    sender = multiprocessing.get_context("spawn").Process(target=_share_and_die, args=("t-orphan", plan))
    sender.start()
    sender.join(60)
    assert len(_names("t-orphan", plan.key)) == 2
    remove_region("t-orphan", plan.key)
    assert not _names("t-orphan", plan.key)
    remove_region("t-orphan", plan.key)  # nothing left: nothing to do


def test_closing_tolerates_a_name_already_removed():
    plan = make_plan([ParameterInfo("w", (16,), "float32")])
    region = SharedRegion("shm", "t-both", plan, torch.device("cpu"))
    OpenedRegion("t-both", plan.key, torch.device("cpu")).close()
    region.close()
    assert not _names("t-both", plan.key)


def test_every_group_formed_names_its_segments_afresh():
    """Ports come back in later runs; a segment named after one would collide with a
    region a killed run left behind."""
    a, b = (WeightGroupConfig("127.0.0.1", 29500, 2, "shm") for _ in range(2))
    assert a.port == b.port and a.token != b.token


def test_ipc_needs_a_gpu_sender_and_in_place_needs_ipc():
    with pytest.raises(WeightUpdateError, match="not a GPU"):
        WeightSender(WeightGroupConfig("127.0.0.1", 1, 2, "ipc"), "cpu")
    plan = make_plan([ParameterInfo("w", (4,), "float32")])
    with pytest.raises(WeightUpdateError, match="needs the ipc wire"):
        SharedRegion("shm", "t-in-place", plan, torch.device("cpu"), tensors={"w": torch.zeros(4)})
