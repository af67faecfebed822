"""Multi-turn GRPO with a tool: the calculator recipe on the embedded default learns,
its episodes are what the model and the environment wrote in turn, and the tool's
answers are the calculator's."""
import json

import pytest

from rlloop.agents.calculator import CALL, END, evaluate
from rlloop.config import compose_config
from rlloop.train import run

pytestmark = pytest.mark.integration

# last 10 steps' mean reward - first 10's, seeds 0-4 of this recipe (60 pipelined steps,
# CPU): +0.289, +0.198, +0.236, +0.298, +0.261 (docs/benchmarks.md, "Tool rollouts");
# the bound sits below the least.
GAIN = 0.15


def test_a_calculator_run_learns_and_its_episodes_alternate_model_and_tool(tmp_path, ray_cluster):
    summary = run(compose_config(["+conf=calculator", f"output_dir={tmp_path}", "name=calc", "seed=0",
                                  "rollout.dump_every=20"]))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = (sum(r["reward_mean"] for r in part) / len(part) for part in (rows[:10], rows[-10:]))
    print(f"reward {first:.3f} (first 10) -> {last:.3f} (last 10)")
    assert summary["steps"] == 60 and last >= first + GAIN
    episodes = [json.loads(line) for line in (tmp_path / "rollouts" / "step_40.jsonl").read_text().splitlines()]
    called = [e for e in episodes if len(e["conversation"]) > 1]
    assert len(called) > len(episodes) / 2, "most episodes call the tool"
    for e in called:
        turns = e["conversation"]  # model and tool in turn (a tool answer last: out of turns or tokens)
        assert [t["role"] for t in turns] == ["assistant", "tool"] * (len(turns) // 2) + ["assistant"] * (len(turns) % 2)
        for call, answer in zip(turns[0::2], turns[1::2]):
            assert call["content"].endswith(END) and answer["content"] == \
                f"={evaluate(call['content'].rsplit(CALL, 1)[-1].removesuffix(END))}\n"
        assert e["completion"] == turns[-1 - (len(turns) % 2 == 0)]["content"]  # the reward scores the model's last turn
