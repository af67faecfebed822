"""Weight-group setup never hangs silently: a missing member is a clear, timely error."""
import time

import pytest

from rlloop.weights.group import WeightGroupConfig, WeightGroupTimeout, free_port
from rlloop.weights.sender import WeightSender

pytestmark = pytest.mark.integration  # vLLM's stateless process group


def test_sender_times_out_when_a_receiver_never_joins():
    cfg = WeightGroupConfig("127.0.0.1", free_port(), world_size=2, backend="gloo", timeout_s=3)
    t0 = time.perf_counter()
    with pytest.raises(WeightGroupTimeout, match=r"rank 0/2 did not form within 3s"):
        WeightSender(cfg)
    assert time.perf_counter() - t0 < 3 + 10
