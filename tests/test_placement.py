"""Which placements colocate engines with learner ranks (pure logic; the run on a
simulated cluster is in test_cluster.py)."""
import pytest

from rlloop.actors.placement import CapacityError, colocated


def test_engines_colocate_when_their_shares_fit_each_learner_rank_s_gpu():
    # learner.gpus, ranks, learner TP, engines.num_gpus, engines.count, engine TP
    assert colocated(0.5, 1, 1, 0.5, 1, 1)  # the one-GPU recipe
    assert colocated(0.5, 2, 1, 0.5, 2, 1)  # DP=2: engine i beside rank i
    assert colocated(0.4, 2, 1, 0.3, 4, 1)  # two engines per GPU
    assert not colocated(0.5, 2, 1, 0.3, 4, 1)  # 0.5 + 2 x 0.3 > 1: engines go elsewhere
    assert not colocated(1, 1, 1, 1, 1, 1)  # GPUs of their own
    assert not colocated(0, 1, 1, None, 2, 1)  # CPU
    assert colocated(0.5, 2, 2, 0.5, 1, 1)  # TP=2 learner, one engine beside rank 0
    with pytest.raises(CapacityError, match="learner.tensor_parallel_size=1"):
        colocated(0.5, 2, 2, 0.5, 2, 1)  # rank 1 holds half the model: nothing to send alone
    with pytest.raises(CapacityError, match="engines.tensor_parallel_size=2"):
        colocated(0.5, 2, 1, 0.5, 1, 2)
