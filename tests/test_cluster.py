"""A run on a Ray cluster of several nodes (simulated on this machine with
ray.cluster_utils.Cluster: each node its own raylet, with its own custom resources):
roles pinned to nodes, the learner's and the engines' nodes lost mid-run, engines
colocated with learner ranks, and a run that asks for more than the cluster has."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlloop.actors.placement import CapacityError
from rlloop.config import compose_config
from rlloop.train import run

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("override,named", [("engines.node_resource=gpu_box", "'gpu_box'"),
                                            ("learner.node_resource=gpu_box", "'learner.node_resource'"),
                                            ("engines.num_gpus=1", "needs 1 GPUs")])
def test_a_run_asking_for_more_than_the_cluster_has_fails_at_once_naming_it(tmp_path, ray_cluster, override,
                                                                            named):
    t0 = time.time()
    with pytest.raises(CapacityError, match=named):
        run(compose_config(["+conf=grpo", f"output_dir={tmp_path}", "name=too-big", "learner.backend=hf", override]))
    assert time.time() - t0 < 60, "no waiting for resources that will never come"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_run_across_nodes_keeps_its_placement_and_survives_losing_its_nodes(tmp_path):
    """The learner on node A, both engines on node B (the head node holds the driver and
    the coordinator); once 10 steps are done node C joins, able to hold either role,
    and nodes A and B are lost: the engines restart on C and rejoin the weight group on
    the current version, the learner restarts on C from its last checkpoint, and every
    step keeps its full batch."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    out = tmp_path / "run"
    proc = None
    try:
        node_a = cluster.add_node(num_cpus=1, resources={"learner_node": 1})
        node_b = cluster.add_node(num_cpus=1, resources={"engine_node": 1})
        cluster.wait_for_nodes()
        with open(tmp_path / "run.log", "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rlloop.train", "+conf=grpo", f"output_dir={out}", "name=two-nodes", "seed=0",
                 f"ray.address={cluster.address}", "engines.count=2", "engines.node_resource=engine_node",
                 "learner.node_resource=learner_node", "trainer.steps=80", "trainer.checkpoint_every=5",
                 "weights.timeout_s=60"],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": ""})
            deadline = time.time() + 600
            while len(_rows(out / "metrics.jsonl")) < 10 and proc.poll() is None and time.time() < deadline:
                time.sleep(1)
            node_c = cluster.add_node(num_cpus=1, resources={"engine_node": 1, "learner_node": 1})
            cluster.wait_for_nodes()
            cluster.remove_node(node_b)
            cluster.remove_node(node_a)
            proc.wait(timeout=900)
        assert proc.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        rows = _rows(out / "metrics.jsonl")
        assert summary["steps"] == 80 and summary["failures"] >= 1 and summary["learner_restores"] >= 1, summary
        placement = summary["placement"]  # where each actor was at the end
        assert placement["learner/0"] == placement["engine/0"] == placement["engine/1"] == node_c.node_id, placement
        assert all(r["generated"] == 32 * 8 for r in rows), "every step keeps its full batch"
        assert [r["weight_version"] for r in rows] == sorted(r["weight_version"] for r in rows)
        rewards = [r["reward_mean"] for r in rows]
        # As the engine/learner kill test: uninterrupted runs, seeds 0-4, steps 60-69 vs
        # 0-4 at lr 5e-4 gained +0.17 to +0.24.
        assert sum(rewards[-10:]) / 10 > sum(rewards[:5]) / 5 + 0.1, summary
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        cluster.shutdown()


def test_colocated_engines_run_on_their_learner_rank_s_gpu_and_take_its_weights(tmp_path):
    """learner.gpus=0.5 and engines.num_gpus=0.5 on a node of two GPUs (declared: this
    machine has none): each DP rank's bundle is one GPU, engine i runs in rank i's and
    takes its weights from DP replica i (CUDA IPC on GPUs, its shared-memory twin
    here); the run trains with full batches."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2})
    out = tmp_path / "run"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "rlloop.train", "+conf=grpo", f"output_dir={out}", "name=colocated", "seed=0",
             f"ray.address={cluster.address}", "learner.data_parallel_size=2", "learner.gpus=0.5",
             "engines.count=2", "engines.num_gpus=0.5", "trainer.steps=4", "trainer.sft_steps=2"],
            cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        gpus = summary["gpus"]
        assert gpus["learner/0"] == gpus["engine/0"] and gpus["learner/1"] == gpus["engine/1"], gpus
        assert gpus["learner/0"] != gpus["learner/1"], gpus
        assert summary["weight_group"] == {"backend": "shm", "senders": 1, "replicas": 2}, summary
        rows = _rows(out / "metrics.jsonl")
        assert len(rows) == 4 and all(r["generated"] == 32 * 8 for r in rows)
        assert [r["weight_version"] for r in rows] == sorted(r["weight_version"] for r in rows)
    finally:
        cluster.shutdown()
