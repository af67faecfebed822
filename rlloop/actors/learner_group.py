"""The ranks of one learner as one object: a call runs on every rank (they take part
in the same collectives) and answers with rank 0's result.

backend=hf is one rank (HFLearner); backend=megatron is tensor_parallel_size x
data_parallel_size ranks of MegatronLearner, each its own Ray actor (and GPU).
"""
from __future__ import annotations

import ray

from rlloop.actors.liveness import ACTOR_TROUBLE, wait_ready
from rlloop.learner.policy import LearnerConfig
from rlloop.weights.group import free_port


class LearnerGroup:
    def __init__(self, cfg: LearnerConfig, name: str, gpus_per_rank: float = 0, max_restarts: int = 0):
        if cfg.backend == "hf":
            from rlloop.learner.hf_learner import HFLearner

            cls, args = HFLearner, [(cfg,)]
        elif cfg.backend == "megatron":
            from rlloop.learner.megatron_learner import MegatronLearner

            host = ray.util.get_node_ip_address()
            port = free_port(host)  # rank 0 serves the torch.distributed rendezvous here
            world = cfg.tensor_parallel_size * cfg.data_parallel_size
            cls, args = MegatronLearner, [(cfg, r, host, port) for r in range(world)]
        else:
            raise ValueError(f"learner backend {cfg.backend!r}: expected hf or megatron")
        self.actors = [ray.remote(cls).options(name=f"{name}/learner/{r}", num_cpus=0, num_gpus=gpus_per_rank,
                                               max_restarts=max_restarts).remote(*a)
                       for r, a in enumerate(args)]

    def submit(self, method: str, *args) -> list[ray.ObjectRef]:
        return [getattr(a, method).remote(*args) for a in self.actors]

    def call(self, method: str, *args, timeout: float | None = None):
        """Run `method` on every rank; rank 0's answer."""
        return ray.get(self.submit(method, *args), timeout=timeout)[0]

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

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
