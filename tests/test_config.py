"""Hydra config -> typed run config: a bad value stops with one line naming its key."""
import subprocess
import sys
from pathlib import Path

import pytest

from rlloop.config import ConfigError, build_run_config, compose_config

REPO = Path(__file__).resolve().parent.parent


def test_invalid_config_names_the_key(tmp_path):
    for override, key in [("trainer.steps=0", "trainer.steps"), ("rollout.group_size=1", "rollout.group_size"),
                          ("learner.loss_aggregation=sum", "learner.loss_aggregation"),
                          ("model.path=/nonexistent", "model.path"),
                          ("learner.loss=rlloop.learner.grpo:no_such_loss", "learner.loss"),
                          ("learner.backend=deepspeed", "learner.backend"),
                          ("rollout.reward=rlloop.tasks.rewards:no_such_reward", "rollout.reward"),
                          ("rollout.function=no_such_module:Rollouts", "rollout.function"),
                          ("rollout.function=rlloop.rollout:NoSuchRollouts", "rollout.function"),
                          ("learner.tensor_parallel_size=0", "learner.tensor_parallel_size"),
                          ("trainer.rollouts_ahead=0", "trainer.rollouts_ahead"),
                          ("trainer.rollouts_ahead=2", "trainer.rollouts_ahead"),  # max_lag 1 would drop them
                          ("eval.fraction=1.5", "eval.fraction"), ("eval.every=0", "eval.every"),
                          ("eval.path=/nonexistent.jsonl", "eval.path"),
                          ("rollout.prompt_template='Q: {q}'", "rollout.prompt_template"),
                          ("rollout.chat_template=/nonexistent.jinja", "rollout.chat_template"),
                          ("trainer.sft_steps=-1", "trainer.sft_steps"),
                          ("learner.attention=flash3", "learner.attention"),
                          ("learner.recompute=some", "learner.recompute"),
                          ("learner.max_tokens_per_micro_batch=-1", "learner.max_tokens_per_micro_batch"),
                          ("learner.optimizer_offload=1.5", "learner.optimizer_offload"),
                          ("learner.freeze=['']", "learner.freeze"),
                          ("weights.kv_after_update=drop", "weights.kv_after_update"),
                          ("engines.requests_during_swap=later", "engines.requests_during_swap"),
                          ("weights.kv_gap_requests=-1", "weights.kv_gap_requests"),
                          ("server.port=70000", "server.port"), ("server.api_key=''", "server.api_key"),
                          ("server.max_body_bytes=0", "server.max_body_bytes"),
                          ("rollout.agent=rlloop.agents.calculator:no_such_agent", "rollout.agent"),
                          ("rollout.demonstration=no_such_module:demo", "rollout.demonstration"),
                          ("rollout.max_turns=0", "rollout.max_turns")]:
        cfg = compose_config(["+conf=grpo", f"output_dir={tmp_path}", "name=config-test", override])
        try:
            build_run_config(cfg)
        except ConfigError as e:
            assert f"'{key}'" in str(e)
        else:
            raise AssertionError(f"{override} was accepted")


def test_cli_reports_a_bad_key_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rlloop.train", "+conf=grpo", "trainer.steps=-3",
                          f"output_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "error: config key 'trainer.steps': must be a positive integer, got -3"


BAD_DATA = [('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?" "answer": "4"}\n',
             ":2: not valid JSON (Expecting ',' delimiter at column 21)"),
            ('{"question": "1+1?", "answer": "2"}\n\n{"question": "2+2?"}\n', ":3: missing 'answer'"),
            ('["1+1?", "2"]\n', ":1: expected a JSON object with 'question' and 'answer', got list"),
            ("\n\n", ": no problems (the file has no JSON lines)")]


@pytest.mark.parametrize("text,problem", BAD_DATA)
def test_bad_data_names_the_file_and_line_and_writes_nothing(tmp_path, text, problem):
    data = tmp_path / "data.jsonl"
    data.write_text(text)
    out = tmp_path / "run"
    cfg = compose_config(["+conf=grpo", f"output_dir={out}", "rollout.task=jsonl", f"rollout.jsonl_path={data}"])
    with pytest.raises(ConfigError) as e:
        build_run_config(cfg)
    assert str(e.value) == f"config key 'rollout.jsonl_path': {data}{problem}"
    assert not out.exists(), "nothing is written before the data is read"


def test_cli_run_that_never_starts_leaves_no_run_directory(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(BAD_DATA[0][0])
    out = subprocess.run([sys.executable, "-m", "rlloop.train", "+conf=grpo", "rollout.task=jsonl",
                          f"rollout.jsonl_path={data}", f"output_dir={tmp_path / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == f"error: config key 'rollout.jsonl_path': {data}{BAD_DATA[0][1]}"
    assert not (tmp_path / "run").exists()


def test_user_data_gets_an_eval_split_and_no_warm_up_unless_asked(tmp_path, own_model):
    model, data = own_model
    base = ["+conf=grpo", f"output_dir={tmp_path}", "name=split-test"]
    assert build_run_config(compose_config(base)).trainer.sft_steps == 40, "the tiny random model needs its warm-up"
    user = [*base, f"model.path={model}", "rollout.task=jsonl", f"rollout.jsonl_path={data}"]
    run = build_run_config(compose_config([*user, "eval.fraction=0.25"]))
    assert run.trainer.sft_steps == 0 and len(run.eval.problems) == 4 and len(run.rollout.problems) == 12
    assert not {p.id for p in run.rollout.problems} & {p.id for p in run.eval.problems}
    assert build_run_config(compose_config([*user, "trainer.sft_steps=5"])).trainer.sft_steps == 5
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(data.read_text().splitlines(keepends=True)[:3]))
    run = build_run_config(compose_config([*user, f"eval.path={test_file}"]))
    assert [p.id for p in run.eval.problems] == ["q0", "q1", "q2"], "the eval file's rows, as named"
    assert [p.id for p in run.rollout.problems] == [f"q{i}" for i in range(3, 16)], "its questions leave training"
    with pytest.raises(ConfigError, match="'eval.fraction': set eval.path or eval.fraction"):
        build_run_config(compose_config([*user, f"eval.path={test_file}", "eval.fraction=0.1"]))


def test_the_gsm8k_recipe_takes_a_users_model_and_data(tmp_path, own_model):
    model, data = own_model
    run = build_run_config(compose_config(["+conf=grpo_gsm8k", f"output_dir={tmp_path}", f"model.path={model}",
                                           f"rollout.jsonl_path={data}"]))
    assert run.rollout.reward == "rlloop.tasks.rewards:math_format_reward" and run.trainer.sft_steps == 0
    assert run.rollout.max_tokens >= 256 and run.rollout.prompt.system_prompt and run.rollout.prompt.chat_template == "auto"
    assert len(run.eval.problems) == 2 and len(run.rollout.problems) == 14
    with pytest.raises(ConfigError, match="'rollout.jsonl_path'"):
        build_run_config(compose_config(["+conf=grpo_gsm8k", f"output_dir={tmp_path}", f"model.path={model}"]))


def test_the_gpu_recipe_is_colocated_and_warms_up_until_samples_earn_reward(tmp_path, own_model):
    model, _ = own_model
    run = build_run_config(compose_config(["+conf=grpo_gpu", f"output_dir={tmp_path}", f"model.path={model}"]))
    assert run.model == str(model)  # model.path wins over the recipe's preset
    assert run.engines.num_gpus == run.learner.gpus == 0.5 and run.weights.backend == "auto" and run.trainer.pipelined
    assert 0 < run.trainer.sft_target_reward < 1 and run.trainer.sft_steps >= run.trainer.sft_check_every
    assert run.learner.backend == "megatron" and run.learner.dtype == "bfloat16"
    assert all(int(a) <= 99 and int(b) <= 99 for a, b in (p.prompt[:-1].split("+") for p in run.rollout.problems))
    assert 150 <= len(run.eval.problems) <= 250  # 2% of the 10,000 distinct two-digit sums
    with pytest.raises(ConfigError, match="'trainer.sft_check_every'"):
        build_run_config(compose_config(["+conf=grpo_gpu", f"output_dir={tmp_path}", f"model.path={model}",
                                          "trainer.sft_check_every=0"]))


def test_no_key_reaches_a_tracker(tmp_path):
    from rlloop.trackers import hyperparameters

    cfg = compose_config(["+conf=grpo", f"output_dir={tmp_path}", "name=keys", "server.api_key=secret-a",
                          "server.openai_api_key=secret-b"])
    run = build_run_config(cfg)
    flat = hyperparameters(run)
    assert run.server.api_key == "secret-a" and "server.port" in flat
    assert not any("secret" in str(v) for v in flat.values()) and "secret" not in repr(run)
