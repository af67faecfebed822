"""A user's own model and data end to end: a Llama-architecture directory with its own
BPE tokenizer and chat template (tests/conftest.py: own_model), GSM8K-style JSONL rows,
a held-out eval split. What the model saw and wrote is in the run's dumps."""
import json

import pytest
from transformers import AutoTokenizer

from rlloop.config import compose_config
from rlloop.tasks.jsonl import jsonl_problems
from rlloop.train import run

pytestmark = pytest.mark.integration

SYSTEM = "Solve it step by step."


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_own_model_sees_its_chat_template_and_is_scored_on_held_out_rows_only(tmp_path, ray_cluster, own_model):
    model, data = own_model
    out = tmp_path / "run"
    summary = run(compose_config([
        "+conf=grpo", f"output_dir={out}", "name=own-data", f"model.path={model}", "rollout.task=jsonl",
        f"rollout.jsonl_path={data}", "rollout.reward=rlloop.tasks.rewards:math_reward",
        f"rollout.system_prompt='{SYSTEM}'", "rollout.batch_prompts=4", "rollout.group_size=2",
        "rollout.max_tokens=6", "rollout.dump_every=1", "eval.fraction=0.25", "eval.every=2",
        "trainer.steps=3", "learner.backend=hf", "engines.max_num_seqs=16",
        "trainer.sft_steps=20", "trainer.sft_target_reward=0.0"]))

    tok = AutoTokenizer.from_pretrained(model)
    questions = {p.id: p.prompt for p in jsonl_problems(data)}

    def chat(question):
        return tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                                       tokenize=False, add_generation_prompt=True)

    trained = [r for step in range(3) for r in _rows(out / "rollouts" / f"step_{step}.jsonl")]
    assert len(trained) == 3 * 4 * 2
    for r in trained:  # the prompt the engine got is the tokenizer's chat template of the row's question
        assert r["prompt"] == chat(questions[r["id"]]) and r["prompt"].startswith("<s><|system|>")
    evals = {step: _rows(out / "eval" / f"step_{step}.jsonl") for step in (0, 2)}  # every 2 steps and the last
    assert not (out / "eval" / "step_1.jsonl").exists()
    held = {r["id"] for r in evals[0]}
    assert len(held) == 4 and held == {r["id"] for r in evals[2]}, "every eval scores the same held-out rows"
    assert not held & {r["id"] for r in trained}, "no held-out row is ever trained on"
    assert all(r["prompt"] == chat(questions[r["id"]]) for r in evals[0])

    rows = _rows(out / "metrics.jsonl")
    assert [r.get("eval_accuracy") is not None for r in rows] == [True, False, True]
    assert all(r["eval_problems"] == 4 for r in rows if "eval_problems" in r)
    assert summary["eval_problems"] == 4 and summary["eval_last"] == rows[-1]["eval_accuracy"]
    assert (out / "reward.png").stat().st_size > 1000
    # The model already earns the warm-up's target at its first check: no SFT step, one
    # extra weight version (the check's), then the first push and one per step.
    [check] = summary["sft_checks"]
    assert check["sft_step"] == 0 and check["sft_loss"] is None and check["reward"] >= 0.0
    assert summary["weight_version"] == 1 + 1 + 3
