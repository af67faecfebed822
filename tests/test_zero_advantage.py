"""What happens to groups whose rewards are all equal (no advantage), end to end on
the embedded default: dropped, kept, or refilled with fresh groups that have reward
variance (DAPO's dynamic sampling)."""
import pytest

from rlloop.config import compose_config
from rlloop.handle import launch_config

pytestmark = pytest.mark.integration
BATCH, GROUP = 32, 8


def _runs(tmp_path, steps: dict[str, int]) -> dict[str, list[dict]]:
    """One synchronous run per policy, side by side (each run's start dominates its
    time); each run's per-step rows."""
    handles = {policy: launch_config(compose_config([
        "+conf=grpo", f"output_dir={tmp_path / policy}", f"name=zero-adv-{policy}", f"trainer.steps={n}",
        "trainer.sft_steps=20", "trainer.pipelined=false", f"rollout.zero_advantage={policy}"]))
        for policy, n in steps.items()}
    for h in handles.values():
        h.wait(timeout=600, progress=False)
    return {policy: h.metrics().to_dict("records") for policy, h in handles.items()}


def test_zero_advantage_groups_are_kept_or_refilled(tmp_path, ray_cluster):
    runs = _runs(tmp_path, {"keep": 2, "refill": 3})
    for row in runs["keep"]:
        assert row["samples"] == BATCH * GROUP, row  # every sample trains, flat groups too
    rows = runs["refill"]
    assert sum(r["zero_adv_groups"] for r in rows) > 0, "the test needs flat groups to refill"
    assert sum(r["refilled_groups"] for r in rows) > 0
    for r in rows:
        assert r["refilled_groups"] <= r["zero_adv_groups"]
        # Only groups with reward variance train: the rollout's, plus the refills.
        assert r["samples"] == (BATCH - r["zero_adv_groups"] + r["refilled_groups"]) * GROUP, r
