"""The megatron learner's weights going out: exported to the engines bucket by bucket
(one gather of the TP shards per bucket, on TP rank 0, which converts them to HF
tensors and sends them; or, in a group of per-rank senders, each TP rank converting
and sending its own shards, with no gather), and saved as an HF checkpoint directory in shards; a
checkpoint read back into the TP shards.

A mixin of MegatronLearner: it uses the learner's arch, units, params, TP/DP ranks
and optimizer."""
from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from rlloop.learner.hf_megatron import Unit, to_hf, to_hf_shard
from rlloop.weights.group import WeightGroupConfig
from rlloop.weights.protocol import (ParameterInfo, UpdatePlan, UpdateTicket, WeightUpdateError,
                                     WeightUpdateRequest, make_plan, resolve, shard_shape)

SAVE_SHARD_BYTES = 2 << 30  # per safetensors file of a saved checkpoint
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens")


class SafetensorsDir(Mapping):
    """HF tensors of a local checkpoint directory, read one at a time on demand."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self._files = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            handle = safe_open(str(f), framework="pt")
            self._files.update({k: handle for k in handle.keys()})
        if not self._files:
            raise FileNotFoundError(f"no *.safetensors in {path}")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._files[name].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


class MegatronWeights:
    # --- weights ----------------------------------------------------------------------

    def gather_hf(self, group: list[Unit]) -> dict[str, torch.Tensor]:
        """The HF tensors of every unit in `group`, on TP rank 0; other TP ranks send
        their shards and get {}. The TP-sharded units travel in one gather (one
        collective per bucket on export, not one per tensor). Every TP rank must call
        this with the same groups in the same order."""
        sharded = [u for u in group if u.kind != "replicated"] if self.tp_size > 1 else []
        shards: dict[str, list[torch.Tensor]] = {}
        if sharded:
            local = [self.params[u.megatron].detach() for u in sharded]
            flat = _flatten_dense_tensors(local)
            parts = [torch.empty_like(flat) for _ in range(self.tp_size)] if self.tp_rank == 0 else None
            dist.gather(flat, parts, dst=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
            if self.tp_rank == 0:
                per_rank = [_unflatten_dense_tensors(part, local) for part in parts]
                shards = {u.megatron: [r[i] for r in per_rank] for i, u in enumerate(sharded)}
        if self.tp_rank != 0:
            return {}
        out: dict[str, torch.Tensor] = {}
        for u in group:
            mine = self.params[u.megatron].detach()
            out.update(to_hf(u, self.arch, shards.get(u.megatron, [mine] * self.tp_size)))
        return out

    def _export_order(self, plan: UpdatePlan) -> list[list[Unit]]:
        """Per bucket, the units it is the first to need; cached per plan."""
        order = self._order.get(plan.key)
        if order is None:
            unit_of = {n: u for u in self.units for n in u.hf}
            seen: set[str] = set()
            order = []
            for bucket in plan.buckets:
                group = []
                for e in bucket.entries:
                    u = unit_of[plan.params[e.param].name]
                    if u.megatron not in seen:
                        seen.add(u.megatron)
                        group.append(u)
                order.append(group)
            self._order = {plan.key: order}
        return order

    def shard_hf(self, group: list[Unit]) -> dict[str, torch.Tensor]:
        """This TP rank's shards of every unit in `group`, as HF tensors (to_hf_shard):
        what it sends in a sharded update. Vocabulary units travel whole: one all-gather
        over the TP group each, since Megatron and vLLM pad the vocabulary differently.
        Every TP rank must call this with the same groups in the same order."""
        out: dict[str, torch.Tensor] = {}
        for u in group:
            mine = self.params[u.megatron].detach()
            if u.kind == "vocab":
                parts = [torch.empty_like(mine) for _ in range(self.tp_size)]
                dist.all_gather(parts, mine.contiguous(), group=self.tp_group)
                out.update(to_hf(u, self.arch, parts))
            else:
                out.update(to_hf_shard(u, self.arch, mine, self.tp_size))
        return out

    def _sent_params(self) -> tuple[ParameterInfo, ...]:
        """What an update carries: the HF tensors, or this rank's shards of them."""
        if self._senders == 1:
            return self.hf_params
        return tuple(ParameterInfo(p.name, shard_shape(p.name, p.shape, self.tp_size), p.dtype)
                     for p in self.hf_params)

    def weight_plan(self, bucket_bytes: int) -> UpdatePlan:
        """The HF update plan, in the engines' names and shapes (shard shapes in a group
        of per-rank senders; every rank's plan is the same); computed once per group kind."""
        params = self._sent_params()
        if self._plan is None or self._plan.params != params:
            self._plan = make_plan(list(params), bucket_bytes, partial=bool(self.frozen_units))
        return self._plan

    def join_weight_group(self, cfg: WeightGroupConfig) -> None:
        """Rank 0 is the one sender (other ranks feed it through gather_hf); with
        cfg.senders = TP size every TP rank sends its own shards; with cfg.replicas DP
        replicas, each of the first that many sends the same way (colocated engines
        take theirs from the replica on their GPU). A sender is named by its global rank."""
        from rlloop.weights.sender import WeightSender

        if cfg.senders not in (1, self.tp_size):
            raise WeightUpdateError(f"a weight group of {cfg.senders} senders: this learner's TP size is {self.tp_size}")
        if cfg.replicas > self.dp_size or (cfg.replicas > 1 and cfg.senders == 1 and self.tp_size > 1):
            raise WeightUpdateError(f"{cfg.replicas} sending replicas: this learner has {self.dp_size} DP replicas of "
                                    f"TP size {self.tp_size} (replicas of TP > 1 send shards)")
        self._senders, self._replicas = cfg.senders, cfg.replicas
        if self.dp_rank < cfg.replicas and (self.tp_rank == 0 or cfg.senders > 1):
            self.sender = WeightSender(cfg, self.device, sender=self.rank)

    def export(self, plan: UpdatePlan) -> Iterator[dict[str, torch.Tensor]]:
        """Per bucket of `plan`, in order, the HF tensors of the units it is the first to
        need (WeightSender.send's shape), as the sender asks for the bucket: one gather
        of the TP shards per bucket, or, sharded, this rank's own shards. Every TP rank
        must run through it; unsharded, ranks other than TP rank 0 get {}."""
        for group in self._export_order(plan):
            yield self.shard_hf(group) if self._senders > 1 else self.gather_hf(group)

    def send_weights(self, update: WeightUpdateRequest | UpdateTicket) -> dict:
        """Export and send `update` (a ticket names the plan of `weight_plan`)."""
        request = resolve(update, {self._plan.key: self._plan} if self._plan else {})
        if request.plan.params != self._sent_params():
            raise WeightUpdateError("update request's parameters are not this learner's (see weight_plan)")
        sent = {}
        if self.sender is not None:
            if self._senders > 1:  # this rank's own shards, to the engine workers of its TP rank
                request = WeightUpdateRequest(request.version, request.plan, self.tp_rank, self.tp_size)
            sent = self.sender.send(request, self.export(request.plan))
        elif self.dp_rank < self._replicas:  # feed the gathers of this replica's TP rank 0
            for _ in self.export(request.plan):
                pass
        self.sent_version = request.version
        return sent

    # --- checkpoints ------------------------------------------------------------------

    def save(self, path: str, shard_bytes: int = SAVE_SHARD_BYTES) -> None:
        """An HF directory (safetensors in shards of at most `shard_bytes`, each written
        as soon as it fills, so no rank holds the whole model; config and tokenizer
        copied from the source model) plus each rank's optimizer state."""
        import json

        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        shards: list[list[str]] = []  # tensor names per written file
        pending: dict[str, torch.Tensor] = {}

        def flush():
            save_file(pending, str(out / f"model-part-{len(shards)}.safetensors"), metadata={"format": "pt"})
            shards.append(list(pending))
            pending.clear()

        total = 0
        if self.dp_rank == 0:
            for u in self.units:  # TP ranks > 0 only send their shards (gather_hf gives {})
                for name, t in self.gather_hf([u]).items():
                    if name == "lm_head.weight" and self.arch.tied:
                        continue  # HF stores a tied head once
                    if pending and sum(x.nbytes for x in pending.values()) + t.nbytes > shard_bytes:
                        flush()
                    pending[name] = t.cpu()
                    total += t.nbytes
        if self.rank == 0:
            flush()
            n = len(shards)
            names = (["model.safetensors"] if n == 1 else
                     [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
            for i, name in enumerate(names):
                (out / f"model-part-{i}.safetensors").rename(out / name)
            if n > 1:
                weight_map = {t: names[i] for i, shard in enumerate(shards) for t in shard}
                (out / "model.safetensors.index.json").write_text(json.dumps(
                    {"metadata": {"total_size": total},
                     "weight_map": weight_map}, indent=1))
            for f in Path(self.cfg.model).iterdir():
                if f.name in ("config.json", "generation_config.json") or f.name.startswith(TOKENIZER_FILES):
                    shutil.copy(f, out / f.name)
        dist.barrier()
        torch.save({"optimizer": self.opt.state_dict(), "steps": self.steps},
                   out / f"learner_state_rank{self.rank}.pt")
        if self.cfg.optimizer_offload:  # megatron's distributed optimizer: state_dict() holds only
            # the param groups; masters and moments are gathered on DP rank 0 of each TP rank
            self.opt.save_parameter_state(str(out / f"optimizer_params_tp{self.tp_rank}.pt"))

    def load_checkpoint(self, path: str) -> int:
        """Weights and optimizer of a checkpoint (after a restart on the initial weights)."""
        self._copy_in(self.model, SafetensorsDir(path))
        return self.load_optimizer(path)

    def load_optimizer(self, path: str) -> int:
        extra = torch.load(Path(path) / f"learner_state_rank{self.rank}.pt", weights_only=False)
        self.opt.load_state_dict(extra["optimizer"])
        if self.cfg.optimizer_offload:
            self.opt.load_parameter_state(str(Path(path) / f"optimizer_params_tp{self.tp_rank}.pt"))
        self.steps = extra["steps"]
        return self.steps
