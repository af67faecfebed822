"""The ranks of one learner as one object: a call runs on every rank (they take part
in the same collectives) and answers with rank 0's result.

backend=hf is one rank (HFLearner); backend=megatron is tensor_parallel_size x
data_parallel_size ranks of MegatronLearner, each its own Ray actor (and GPU).
"""
from __future__ import annotations

import ray

from rlloop.actors.liveness import wait_ready
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

    def restart(self) -> None:
        """Restart every rank (e.g. after one died: the survivors' process groups are
        broken); each comes back on its initial weights."""
        for actor in self.actors:
            ray.kill(actor, no_restart=False)

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
