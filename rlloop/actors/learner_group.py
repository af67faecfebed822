"""The ranks of one learner as one object: each method runs on every rank (they take
part in the same collectives) and answers with rank 0's result. The methods are the
learner contract (rlloop/learner/contract.py).

backend=hf is one rank (HFLearner); backend=megatron is tensor_parallel_size x
data_parallel_size ranks of MegatronLearner, each its own Ray actor (and GPU).
"""
from __future__ import annotations

import ray

from rlloop.actors.liveness import ACTOR_TROUBLE, wait_ready
from rlloop.actors.placement import PackedRanks
from rlloop.learner.policy import LearnerConfig, Sample
from rlloop.weights.group import WeightGroupConfig
from rlloop.weights.protocol import UpdatePlan, UpdateTicket, WeightUpdateRequest


class LearnerGroup:
    def __init__(self, cfg: LearnerConfig, name: str, bundle_gpus: float | None = None):
        """`bundle_gpus`: each rank's bundle holds that many GPUs, for colocated engines
        to join it (placement.colocated)."""
        if cfg.backend not in ("hf", "megatron"):
            raise ValueError(f"learner backend {cfg.backend!r}: expected hf or megatron")
        world = cfg.tensor_parallel_size * cfg.data_parallel_size if cfg.backend == "megatron" else 1
        self.ranks = PackedRanks(name, world, cfg.gpus, cfg.node_resource, bundle_gpus=bundle_gpus)  # one node
        if cfg.backend == "hf":
            from rlloop.learner.hf_learner import HFLearner

            cls, args = HFLearner, [(cfg,)]
        else:
            from rlloop.learner.megatron_learner import MegatronLearner

            host, port = self.ranks.rendezvous()  # rank 0 serves the torch.distributed rendezvous there
            cls, args = MegatronLearner, [(cfg, r, host, port) for r in range(world)]
        self.actors = [ray.remote(cls).options(name=f"{name}/learner/{r}", num_cpus=0, num_gpus=cfg.gpus,
                                               max_restarts=cfg.max_restarts,
                                               scheduling_strategy=self.ranks.strategy(r)).remote(*a)
                       for r, a in enumerate(args)]

    def _submit(self, method: str, *args) -> list[ray.ObjectRef]:
        return [getattr(a, method).remote(*args) for a in self.actors]

    def _call(self, method: str, *args):
        return ray.get(self._submit(method, *args))[0]

    # --- the learner contract ---------------------------------------------------------

    def placement(self) -> dict:
        return self._call("placement")

    def sft_step(self, prompts: list[list[int]], targets: list[list[int]]) -> dict:
        return self._call("sft_step", prompts, targets)

    def train_step(self, samples: list[Sample]) -> dict:
        return self._call("train_step", samples)

    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        return self._call("score", prompts, completions)

    def weight_plan(self, bucket_bytes: int) -> UpdatePlan:
        return self._call("weight_plan", bucket_bytes)

    def join_weight_group(self, cfg: WeightGroupConfig) -> list[ray.ObjectRef]:
        """Started, not awaited: every engine joins at the same time (a rendezvous)."""
        return self._submit("join_weight_group", cfg)

    def leave_weight_group(self, token: str | None = None, plan_key: str | None = None) -> list[ray.ObjectRef]:
        return self._submit("leave_weight_group", token, plan_key)

    def send_weights(self, update: WeightUpdateRequest | UpdateTicket) -> dict:
        return self._call("send_weights", update)

    def save(self, path: str, *shard_bytes: int) -> None:
        self._call("save", path, *shard_bytes)

    def load_checkpoint(self, path: str) -> int:
        return self._call("load_checkpoint", path)

    def load_optimizer(self, path: str) -> int:
        return self._call("load_optimizer", path)

    def apply(self, fn, *args):
        """`fn(rank, *args)` on every rank, rank 0's answer: code of a test or a
        benchmark (parity checks, raw floors) run inside the learner."""
        return self._call("apply", fn, *args)

    # --- lifetime ---------------------------------------------------------------------

    def wait_ready(self, deadline: float) -> list[int]:
        """Each rank's pid, once every rank answers."""
        return [wait_ready(a, deadline) for a in self.actors]

    def recover(self, known_pids: list[int], deadline: float) -> list[int]:
        """Every rank's pid after a failure somewhere in the run. One rank: wait for it
        (Ray restarts it if it died). Several: if any rank is not the incarnation we
        knew, or does not answer, restart them all, since the survivors' process
        groups died with it (a lone restarted rank would wait forever to rendezvous).
        Restarted ranks come back on their initial weights."""
        if len(self.actors) == 1:
            return self.wait_ready(deadline)
        try:
            pids = ray.get([a.ready.remote() for a in self.actors], timeout=30)
        except ACTOR_TROUBLE:
            pids = None
        if pids == known_pids:
            return pids
        for actor in self.actors:
            ray.kill(actor, no_restart=False)
        return self.wait_ready(deadline)

    def placements(self) -> list[dict]:
        """Each rank's node and GPUs (weight_sync.placement), in rank order."""
        return ray.get([a.placement.remote() for a in self.actors])


    def kill(self) -> None:
        """End every rank and free their placement on the cluster."""
        for actor in self.actors:
            ray.kill(actor)
        self.ranks.release()
