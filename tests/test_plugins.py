"""A reward and a rollout of the user's own, given by module:function as config
overrides, run end to end; the run's dumps show both at work."""
import json

import pytest

from rlloop.config import build_run_config, compose_config
from rlloop.train import run

pytestmark = pytest.mark.integration


def test_a_users_reward_and_rollout_function_run_end_to_end(tmp_path, ray_cluster):
    overrides = ["+conf=grpo", f"output_dir={tmp_path}", "name=plugins", "learner.backend=hf",
                 "rollout.reward=tests.user_plugins:doubled_reward",
                 "rollout.function=tests.user_plugins:InOrderRollouts",
                 "rollout.batch_prompts=4", "rollout.group_size=2", "rollout.dump_every=1",
                 "trainer.steps=2", "trainer.sft_steps=0", "engines.max_num_seqs=16"]
    problems = build_run_config(compose_config(overrides)).rollout.problems
    summary = run(compose_config(overrides))
    for step in range(2):
        rows = [json.loads(line) for line in (tmp_path / "rollouts" / f"step_{step}.jsonl").read_text().splitlines()]
        in_order = [p.id for p in problems[4 * step:4 * step + 4] for _ in range(2)]
        assert [r["id"] for r in rows] == in_order, "the rollout function drew the problems"
        assert {r["reward"] for r in rows} <= {0.0, 2.0}, "the reward function scored them"
    assert summary["steps"] == 2 and summary["weight_version"] == 3
