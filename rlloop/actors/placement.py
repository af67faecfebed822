"""Where a run's actors go on a Ray cluster, one machine or many.

- A learner's TP x DP ranks are packed on one node (a STRICT_PACK placement group,
  one bundle per rank): their collectives stay on one host. Rank 0's node serves the
  torch.distributed rendezvous, at an address the other ranks can reach.
- Engines are spread over the nodes (Ray's SPREAD strategy); a restarted engine goes
  wherever there is room again.
- Colocated (`colocated`: engines and learner ranks take fractions of a GPU that fit in
  one, as `learner.gpus=0.5 engines.num_gpus=0.5`): each learner rank's bundle is one
  whole GPU and engine i goes into bundle i % ranks, beside rank i's share; a
  restarted engine comes back in its bundle.
- `learner.node_resource` / `engines.node_resource` pin a role to the nodes that
  carry that custom resource (`ray start --resources='{"engine_node": 8}'`).
- The coordinator runs on the driver's node.

A run that asks for what the cluster does not have fails at once, naming the
resource, instead of waiting forever for it.
"""
from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

PIN = 0.001  # of a node's custom resource, per actor pinned to it: any amount > 0 marks the node
BUNDLE_CPU = 0.001  # a bundle needs some resource; learner ranks take no CPU of their own


class CapacityError(RuntimeError):
    """The cluster cannot hold what the run asks for."""


def check_capacity(gpus: dict[str, float], resources: dict[str, str | None]) -> None:
    """`gpus`: GPUs each role needs in all ({"engines": 2.0, ...}); `resources`: the
    custom resource each config key pins its role to (None: not pinned)."""
    have = ray.cluster_resources()
    need = sum(gpus.values())
    if need > have.get("GPU", 0) + 1e-9:
        parts = ", ".join(f"{role} {n:g}" for role, n in gpus.items() if n)
        raise CapacityError(f"the run needs {need:g} GPUs ({parts}) and the Ray cluster has "
                            f"{have.get('GPU', 0):g}")
    for key, resource in resources.items():
        if resource is not None and have.get(resource, 0) <= 0:
            custom = sorted(r for r in have if r not in ("CPU", "GPU", "memory", "object_store_memory")
                            and not r.startswith("node:") and not r.startswith("accelerator_type"))
            raise CapacityError(f"config key '{key}': no node of the Ray cluster has the resource "
                                f"{resource!r} (custom resources there: {custom or 'none'})")


def colocated(learner_gpus: float, ranks: int, learner_tp: int, engine_gpus: float | None, engines: int,
              engine_tp: int) -> bool:
    """Whether engines share the learner ranks' GPUs: both take fractions, and each GPU
    holds a rank and its share of the engines (engine i beside rank i % ranks). A
    colocated engine takes its weights from the learner rank on its GPU, so one beside
    another than rank 0 needs a TP=1 learner (whose DP replicas each hold the model)."""
    if not (learner_gpus and engine_gpus) or learner_gpus + -(-engines // ranks) * engine_gpus > 1 + 1e-9:
        return False
    if engine_tp != 1:
        raise CapacityError(f"engines.tensor_parallel_size={engine_tp}: a colocated engine (engines.num_gpus="
                            f"{engine_gpus:g} beside learner.gpus={learner_gpus:g}) runs on one GPU")
    if engines > 1 and learner_tp > 1:
        raise CapacityError(f"engines.count={engines} colocated with a learner of tensor_parallel_size="
                            f"{learner_tp}: an engine beside rank r takes its weights from rank r, which holds "
                            "the whole model only at learner.tensor_parallel_size=1 (use data_parallel_size)")
    return True


class PackedRanks:
    """A STRICT_PACK placement group of `ranks` bundles: one node for all of them.
    `bundle_gpus`: GPUs per bundle when more than a rank takes (colocated engines)."""

    def __init__(self, name: str, ranks: int, gpus_per_rank: float, node_resource: str | None,
                 timeout_s: float = 120, bundle_gpus: float | None = None):
        gpus = bundle_gpus or gpus_per_rank
        bundle = {"CPU": BUNDLE_CPU, **({"GPU": gpus} if gpus else {}),
                  **({node_resource: PIN} if node_resource else {})}
        self.group = placement_group([dict(bundle) for _ in range(ranks)], strategy="STRICT_PACK",
                                     name=f"{name}/learner")
        if not self.group.wait(timeout_seconds=timeout_s):
            remove_placement_group(self.group)
            raise CapacityError(f"{ranks} learner ranks of {bundle} each fit on no single node of the Ray "
                                f"cluster within {timeout_s:.0f} s (cluster: {ray.cluster_resources()})")

    def strategy(self, rank: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank)

    def rendezvous(self) -> tuple[str, int]:
        """An address of rank 0's node and a port free there."""
        return ray.get(_address.options(scheduling_strategy=self.strategy(0)).remote())

    def release(self) -> None:
        remove_placement_group(self.group)


@ray.remote(num_cpus=0)
def _address() -> tuple[str, int]:
    from rlloop.weights.group import free_port

    host = ray.util.get_node_ip_address()
    return host, free_port(host)


def engine_options(node_resource: str | None) -> dict:
    """Ray options that spread engines over the nodes (pinned ones: those nodes)."""
    return {"scheduling_strategy": "SPREAD", **({"resources": {node_resource: PIN}} if node_resource else {})}


def on_this_node() -> NodeAffinitySchedulingStrategy:
    """For the coordinator: the driver's node, which stays while the run does."""
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
