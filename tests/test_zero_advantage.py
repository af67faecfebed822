"""What happens to groups whose rewards are all equal (no advantage), end to end on
the embedded default: dropped, kept, or refilled with fresh groups that have reward
variance (DAPO's dynamic sampling)."""
import json

import pytest

from rlloop.config import compose_config
from rlloop.train import run

pytestmark = pytest.mark.integration
BATCH, GROUP = 32, 8


def _rows(tmp_path, policy: str, steps: int) -> list[dict]:
    out = tmp_path / policy
    run(compose_config(["+conf=grpo", f"output_dir={out}", f"name=zero-adv-{policy}", f"trainer.steps={steps}",
                        "trainer.sft_steps=20", "trainer.pipelined=false", f"rollout.zero_advantage={policy}"]))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_zero_advantage_groups_are_kept_or_refilled(tmp_path, ray_cluster):
    for row in _rows(tmp_path, "keep", steps=2):
        assert row["samples"] == BATCH * GROUP, row  # every sample trains, flat groups too
    rows = _rows(tmp_path, "refill", steps=3)
    assert sum(r["zero_adv_groups"] for r in rows) > 0, "the test needs flat groups to refill"
    assert sum(r["refilled_groups"] for r in rows) > 0
    for r in rows:
        assert r["refilled_groups"] <= r["zero_adv_groups"]
        # Only groups with reward variance train: the rollout's, plus the refills.
        assert r["samples"] == (BATCH - r["zero_adv_groups"] + r["refilled_groups"]) * GROUP, r
