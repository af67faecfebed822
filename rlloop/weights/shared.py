"""Same-host wires: instead of broadcasting, the sender shares its bucket memory with
every engine worker, and each worker copies straight out of it.

  shm  POSIX shared memory, for processes on one host (the CPU twin that CI runs)
  ipc  CUDA IPC, for a sender and workers on the same GPU (colocated learner + engine)

Per plan, the sender shares a region and a small mailbox segment named after the
group's token and the plan's key. The region is either one buffer holding all
buckets back to back (the sender packs into it), or, with ipc and a sender whose
tensors stay where they are (a model's parameters), the sender's tensors themselves:
then an update is one copy, straight from the learner's parameters into vLLM's. The
mailbox holds a version stamp and how to open the region (a segment name, or CUDA IPC
handles plus the GPU's UUID). Workers open both once per plan and keep them mapped;
nothing is opened per step.

One update: the sender packs every bucket (or nothing, in place), waits for its
device, then stamps the version; each worker checks the stamp (a region that does not
hold the requested version is refused before anything is copied), copies out of the
region, waits for its device, and answers. The sender writes again (packs, or lets
the optimizer step) only after every worker has answered (`push_update` orders it),
so a region is never overwritten while read.
"""
from __future__ import annotations

import pickle
import struct
from collections.abc import Mapping
from multiprocessing import resource_tracker, shared_memory

import torch

from .protocol import UpdatePlan, WeightUpdateError

SHARED_WIRES = ("shm", "ipc")
_HEADER = struct.Struct("<qq")  # version stamp, descriptor length


def mailbox_name(token: str, plan_key: str, sender: int = 0) -> str:
    """`sender`: the learner TP rank whose shard a sharded update's region holds."""
    return f"rlloop-{token}-{plan_key}" + (f"-{sender}" if sender else "")


def _open_segment(name: str) -> shared_memory.SharedMemory:
    """Open an existing segment without letting this process's resource tracker unlink
    it at exit (Python < 3.13 registers every opened segment as if it created it)."""
    try:
        return shared_memory.SharedMemory(name=name, track=False)
    except TypeError:
        seg = shared_memory.SharedMemory(name=name)
        resource_tracker.unregister(seg._name, "shared_memory")  # noqa: SLF001 (the documented workaround)
        return seg


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


class SharedRegion:
    """The sender's side, for one plan: a packed buffer of `plan.bucket_bytes`, or
    (ipc, `tensors` given) the tensors themselves, and the mailbox."""

    def __init__(self, wire: str, token: str, plan: UpdatePlan, device: torch.device,
                 tensors: Mapping[str, torch.Tensor] | None = None, sender: int = 0):
        self.wire = wire
        name = mailbox_name(token, plan.key, sender)
        self._data_segment = None
        self.buffer = None
        self.pointers = None
        if tensors is not None:
            from torch.multiprocessing.reductions import reduce_tensor

            if wire != "ipc":
                raise WeightUpdateError("in-place sending shares GPU tensors: it needs the ipc wire")
            shared = [tensors[p.name] for p in plan.params]
            self.pointers = [t.data_ptr() for t in shared]
            opener = {"kind": "tensors", "ipc_args": [reduce_tensor(t)[1] for t in shared],
                      "uuid": device_uuid(device)}
        elif wire == "shm":
            self._data_segment = shared_memory.SharedMemory(name=f"{name}-data",
                                                            create=True, size=max(plan.bucket_bytes, 1))
            self.buffer = torch.frombuffer(self._data_segment.buf, dtype=torch.uint8, count=plan.bucket_bytes)
            opener = {"kind": "buckets", "segment": self._data_segment.name}
        else:
            from torch.multiprocessing.reductions import reduce_tensor

            self.buffer = torch.empty(plan.bucket_bytes, dtype=torch.uint8, device=device)
            opener = {"kind": "buckets", "ipc_args": reduce_tensor(self.buffer)[1], "uuid": device_uuid(device)}
        descriptor = pickle.dumps({"wire": wire, "nbytes": plan.bucket_bytes, **opener})
        self.mailbox = shared_memory.SharedMemory(name=name, create=True,
                                                  size=_HEADER.size + len(descriptor))
        _HEADER.pack_into(self.mailbox.buf, 0, 0, len(descriptor))
        self.mailbox.buf[_HEADER.size:_HEADER.size + len(descriptor)] = descriptor

    def check_in_place(self, plan: UpdatePlan, tensors: Mapping[str, torch.Tensor]) -> None:
        """Shared tensors must still be where they were when shared."""
        if [tensors[p.name].data_ptr() for p in plan.params] != self.pointers:
            raise WeightUpdateError("in-place send: the tensors moved since they were shared; "
                                    "send packed (in_place=False) or keep the same tensors")

    def stamp(self, version: int) -> None:
        """Publish: the region now holds `version` (call after the device is idle)."""
        struct.pack_into("<q", self.mailbox.buf, 0, version)

    def close(self) -> None:
        self.buffer = None
        for seg in (self._data_segment, self.mailbox):
            if seg is not None:
                seg.close()
                try:
                    seg.unlink()
                except FileNotFoundError:  # a worker removed the name first (see OpenedRegion.close)
                    resource_tracker.unregister(seg._name, "shared_memory")  # noqa: SLF001
        self._data_segment = self.mailbox = None


class OpenedRegion:
    """A worker's side: the sender's region for one plan, mapped once."""

    def __init__(self, token: str, plan_key: str, device: torch.device, sender: int = 0):
        name = mailbox_name(token, plan_key, sender)
        try:
            self.mailbox = _open_segment(name)
        except FileNotFoundError:
            raise WeightUpdateError(
                f"shared wire: no segment {name!r} on this host; the sender must run on the same "
                "host (use weights.backend=gloo or nccl across hosts)") from None
        _, length = _HEADER.unpack_from(self.mailbox.buf, 0)
        info = pickle.loads(bytes(self.mailbox.buf[_HEADER.size:_HEADER.size + length]))
        self._data_segment = None
        self.buffer = None  # kind "buckets": every bucket back to back
        self.tensors = None  # kind "tensors": the sender's tensor for each plan parameter
        if info["kind"] == "tensors":
            self.tensors = [_open_ipc(args, info["uuid"], device) for args in info["ipc_args"]]
        elif info["wire"] == "shm":
            self._data_segment = _open_segment(info["segment"])
            self.buffer = torch.frombuffer(self._data_segment.buf, dtype=torch.uint8, count=info["nbytes"])
        else:
            self.buffer = _open_ipc(info["ipc_args"], info["uuid"], device)

    def version(self) -> int:
        return struct.unpack_from("<q", self.mailbox.buf, 0)[0]

    def check(self, version: int) -> None:
        held = self.version()
        if held != version:
            raise WeightUpdateError(f"shared wire: the sender's region holds v{held}, not the requested "
                                    f"v{version}; nothing was copied")

    def close(self) -> None:
        """Unmap, and remove the region's names: a worker closes a region only when its
        group is dissolved or the sender moved to another plan, so the names are dead
        either way, and a sender that died without closing leaves nothing behind."""
        self.buffer = self.tensors = None
        for seg in (self._data_segment, self.mailbox):
            if seg is not None:
                seg.close()
                _unlink(seg)
        self._data_segment = self.mailbox = None


def _unlink(seg: shared_memory.SharedMemory) -> None:
    _unlink_name(seg._name)  # noqa: SLF001


def _unlink_name(name: str) -> None:
    """Remove a segment's name (as SharedMemory keeps it, with its leading slash) without
    touching the resource tracker; whoever is first removes it, the others find it gone."""
    try:
        shared_memory._posixshmem.shm_unlink(name)  # noqa: SLF001
    except FileNotFoundError:
        pass


def remove_region(token: str, plan_key: str, sender: int = 0) -> None:
    """Remove a region's names whoever created it: a re-formed group's members call it
    for the old group, so a sender that died without closing, and whose workers died
    too, leaves nothing behind. The mailbox names the data segment (shm)."""
    try:
        mailbox = _open_segment(mailbox_name(token, plan_key, sender))
    except FileNotFoundError:
        return
    _, length = _HEADER.unpack_from(mailbox.buf, 0)
    info = pickle.loads(bytes(mailbox.buf[_HEADER.size:_HEADER.size + length]))
    mailbox.close()
    if "segment" in info:
        _unlink_name("/" + info["segment"])
    _unlink(mailbox)


def _open_ipc(ipc_args, uuid: str, device: torch.device) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if device.type != "cuda" or device_uuid(device) != uuid:
        raise WeightUpdateError(
            f"ipc wire: the sender's GPU ({uuid}) is not this worker's "
            f"({device_uuid(device) if device.type == 'cuda' else device}); ipc needs learner and engine "
            "on the same GPU (use weights.backend=nccl between GPUs)")
    args = list(ipc_args)
    args[6] = device.index  # the same GPU may have another index in this process
    return rebuild_cuda_tensor(*args)
