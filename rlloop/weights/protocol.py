"""The weight-update protocol as plain data, shared by the sending and receiving side.

A sender (the learner, a benchmark, a test) and the receivers (vLLM workers) agree on
an `UpdatePlan`: which tensors travel, in HF checkpoint names, and where each one
sits inside a few large flat byte buckets. The plan is computed once per model and
reused every step; a `WeightUpdateRequest` only adds the version and the learner's
tensor-parallel coordinates. Receivers cache everything they derive from a plan under
`plan.key`, so no metadata is rebuilt per step, and a plan travels once: later updates
of it are `UpdateTicket`s, which name the plan by its key.
"""
from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

# Offsets inside a bucket are aligned so every view is aligned for its dtype and for
# vectorised copies.
ALIGN_BYTES = 256

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class WeightUpdateError(ValueError):
    """An update request that does not fit the receiving model; nothing was changed."""


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise WeightUpdateError(f"unsupported dtype {dtype}; supported: {sorted(DTYPES)}")


@dataclass(frozen=True)
class ParameterInfo:
    """One tensor as it appears in an HF checkpoint."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class BucketEntry:
    """Where parameter `param` (an index into `UpdatePlan.params`) lies in a bucket."""

    param: int
    offset: int  # in bytes from the start of the bucket


@dataclass(frozen=True)
class Bucket:
    nbytes: int
    entries: tuple[BucketEntry, ...]


@dataclass(frozen=True)
class UpdatePlan:
    """`partial`: the plan names a subset of the model's tensors (a learner that freezes
    some, an adapter); the rest keep their values. A full plan must name every tensor."""

    params: tuple[ParameterInfo, ...]
    buckets: tuple[Bucket, ...]
    key: str = field(default="")
    partial: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self.params)

    @property
    def bucket_bytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    def bucket_starts(self) -> list[int]:
        """Byte offset of each bucket when all buckets lie back to back (shared wires)."""
        starts, at = [], 0
        for b in self.buckets:
            starts.append(at)
            at += b.nbytes
        return starts


@dataclass(frozen=True)
class WeightUpdateRequest:
    """One in-flight update: the weights of `version`, laid out as `plan`.

    `tp_rank`/`tp_size` name the learner tensor-parallel rank that sends it; a full
    (unsharded) update is tp_rank=0, tp_size=1. With tp_size > 1 the update is sharded:
    each of the learner's tp_size ranks sends its own request, alike but for tp_rank,
    whose plan holds that rank's shard of every tensor tensor parallelism splits
    (`tp_dim`; the others whole), and an engine of the same TP size takes them all:
    its worker w copies learner rank w's shard. The engine is addressed with rank 0's.
    """

    version: int
    plan: UpdatePlan
    tp_rank: int = 0
    tp_size: int = 1

    def ticket(self) -> UpdateTicket:
        return UpdateTicket(self.version, self.plan.key, self.tp_rank, self.tp_size)


@dataclass(frozen=True)
class UpdateTicket:
    """A further update of a plan its receiver already holds: the version and the plan's
    key instead of the plan. A plan of a few hundred tensors costs about a millisecond
    to pickle at each hop (driver -> engine actor -> engine core -> worker), so only a
    plan's first request carries it."""

    version: int
    plan_key: str
    tp_rank: int = 0
    tp_size: int = 1


def resolve(update: WeightUpdateRequest | UpdateTicket, plans: Mapping[str, UpdatePlan]) -> WeightUpdateRequest:
    """The request `update` stands for: itself, or a ticket with its plan from `plans`
    (the plans this receiver holds, by key)."""
    if isinstance(update, WeightUpdateRequest):
        return update
    plan = plans.get(update.plan_key)
    if plan is None:
        raise WeightUpdateError(f"update v{update.version} names plan {update.plan_key!r}, which this receiver "
                                "has not been given: send its WeightUpdateRequest (prepare_update) first")
    return WeightUpdateRequest(update.version, plan, update.tp_rank, update.tp_size)


# Which dimension of a Llama-family checkpoint tensor tensor parallelism splits: the
# output rows of column-parallel layers, the input columns of row-parallel ones. Norms
# and biases of row-parallel layers are whole on every rank; embeddings and the output
# layer travel whole too (each engine pads and splits its vocabulary its own way).
_TP_DIMS = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0, "o_proj": 1, "down_proj": 1}


def tp_dim(name: str) -> int | None:
    """The dimension of checkpoint tensor `name` that a sharded update splits, or None."""
    module, _, leaf = name.rpartition(".")
    dim = _TP_DIMS.get(module.rpartition(".")[2])
    return None if dim == 1 and leaf == "bias" else dim


def shard_shape(name: str, shape: tuple[int, ...], tp_size: int) -> tuple[int, ...]:
    """The shape of one TP rank's shard of checkpoint tensor `name`."""
    dim = tp_dim(name)
    if dim is None or tp_size == 1:
        return tuple(shape)
    if shape[dim] % tp_size:
        raise WeightUpdateError(f"{name}: dimension {dim} ({shape[dim]}) does not split over {tp_size} TP ranks")
    return tuple(n // tp_size if d == dim else n for d, n in enumerate(shape))


def check_version(version: int, current_version: int) -> None:
    if version <= current_version:
        raise WeightUpdateError(f"stale update: version {version} <= current version {current_version}")


def _align(n: int) -> int:
    return (n + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


def make_plan(params: list[ParameterInfo], bucket_bytes: int = 512 << 20, partial: bool = False) -> UpdatePlan:
    """Pack `params`, in the given order, into buckets of at most `bucket_bytes`.

    Order is kept so a layer's tensors stay together (the receiver loads as buckets
    arrive). A tensor larger than `bucket_bytes` gets a bucket of its own. `partial`:
    `params` are a subset of the model's tensors (UpdatePlan.partial).
    """
    if not params:
        raise WeightUpdateError("an update plan needs at least one parameter")
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise WeightUpdateError("duplicate parameter names in plan")
    for p in params:
        if p.dtype not in DTYPES:
            raise WeightUpdateError(f"{p.name}: unsupported dtype {p.dtype!r}")
    buckets: list[Bucket] = []
    entries: list[BucketEntry] = []
    used = 0
    for i, p in enumerate(params):
        if entries and used + p.nbytes > bucket_bytes:
            buckets.append(Bucket(used, tuple(entries)))
            entries, used = [], 0
        entries.append(BucketEntry(i, used))
        used = _align(used + p.nbytes)
    buckets.append(Bucket(used, tuple(entries)))
    digest = hashlib.sha1(repr((tuple(params), tuple(buckets), partial)).encode()).hexdigest()[:16]
    return UpdatePlan(tuple(params), tuple(buckets), key=digest, partial=partial)


def parameter_infos(named_tensors) -> list[ParameterInfo]:
    """`ParameterInfo`s for (name, tensor) pairs, e.g. a model's named_parameters()."""
    return [ParameterInfo(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in named_tensors]


def load_groups(names, packed_modules: Mapping[str, list[str]], tied: bool) -> dict[str, frozenset[str]]:
    """For each checkpoint tensor name, the names the receiving model loads together
    with it: the tensors of one engine module (weight and bias; the shards vLLM fuses,
    by its `packed_modules_mapping`, e.g. q/k/v_proj -> qkv_proj) and tied embeddings.
    vLLM reprocesses a module as a whole (repacked CPU weights): a partial update that
    sends only part of one would leave the rest of it undefined."""
    fused_of = {shard: fused for fused, shards in packed_modules.items() for shard in shards}
    by_module: dict[str, set[str]] = {}
    for name in names:
        module = name.rpartition(".")[0]
        parent, _, leaf = module.rpartition(".")
        by_module.setdefault(f"{parent}.{fused_of.get(leaf, leaf)}", set()).add(name)
    groups = {n: frozenset(members) for members in by_module.values() for n in members}
    tie = {"model.embed_tokens.weight", "lm_head.weight"}
    if tied and tie <= groups.keys():
        joined = frozenset().union(*(groups[n] for n in tie))
        groups.update({n: joined for n in joined})
    return groups


def validate_request(
    request: WeightUpdateRequest,
    schema: dict[str, ParameterInfo],
    current_version: int,
    groups: Mapping[str, frozenset[str]] | None = None,
    tp_size: int = 1,
) -> None:
    """Raise WeightUpdateError unless `request` fits the model described by `schema`,
    served at tensor-parallel size `tp_size` (a sharded request must match it).

    `schema` holds every tensor of the model's checkpoint, tied aliases such as
    lm_head.weight included: vLLM on CPU keeps a separately packed copy of a tied
    lm_head, which only a tensor sent under that name refreshes. A partial plan may
    leave tensors out, but only whole `groups` (load_groups; without them, any subset).
    """
    check_version(request.version, current_version)
    if request.tp_size not in (1, tp_size) or not 0 <= request.tp_rank < request.tp_size:
        raise WeightUpdateError(
            f"update v{request.version} is sharded over tp_size={request.tp_size} (tp_rank={request.tp_rank}): "
            f"this engine takes full tensors (tp_size=1) or shards of its own TP size, {tp_size}")
    problems: list[str] = []
    sent = set()
    for p in request.plan.params:
        if p.name in sent:
            problems.append(f"{p.name} sent twice")
        sent.add(p.name)
        want = schema.get(p.name)
        if want is None:
            problems.append(f"unknown parameter {p.name!r}")
            continue
        try:
            shape = shard_shape(p.name, want.shape, request.tp_size)
        except WeightUpdateError as e:
            problems.append(str(e))
            continue
        if tuple(p.shape) != shape:
            of = f"model's TP-{request.tp_size} shard" if request.tp_size > 1 else "model's"
            problems.append(f"{p.name}: shape {tuple(p.shape)} != {of} {shape}")
        if p.dtype != want.dtype:
            problems.append(f"{p.name}: dtype {p.dtype} != model's {want.dtype}")
    missing = sorted(set(schema) - sent)
    if missing and not request.plan.partial:
        problems.append(f"missing {len(missing)} parameter(s), e.g. {missing[:3]}")
    for members in {groups[n] for n in sent if n in groups} if groups and request.plan.partial else ():
        left_out = sorted(members - sent)
        if left_out:
            problems.append(f"partial update splits what loads together: sends {sorted(members & sent)[:3]} "
                            f"without {left_out[:3]}")
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise WeightUpdateError(f"update v{request.version} rejected: {shown}{more}")


def pack(obj) -> bytes:
    """vLLM's collective_rpc msgpack-encodes its arguments, turning dataclasses into
    dicts; protocol objects cross it pickled."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(data: bytes):
    return pickle.loads(data)
