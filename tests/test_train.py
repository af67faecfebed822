"""The main job end to end on the embedded default: Hydra config -> coordinator ->
engine + learner actors -> GRPO with in-flight updates; the reward must rise."""
import json
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from rlloop.train import CONFIG_PATH, ConfigError, build_run_config, run

REPO = Path(__file__).resolve().parent.parent


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
        return compose("config", overrides=["+conf=grpo", f"output_dir={tmp_path}", "name=train-test", *overrides])


def test_grpo_run_learns_and_keeps_versions_and_lag(tmp_path, ray_cluster):
    summary = run(_cfg(tmp_path, "trainer.steps=100"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 100
    assert all(k in rows[0] for k in ("step", "reward_mean", "weight_version", "lag_max", "tok_s"))
    versions = [r["weight_version"] for r in rows]
    assert versions == sorted(set(versions)), "one new weight version per step"
    assert all(r["lag_max"] <= 1 for r in rows), "max_lag=1 must hold for every used sample"
    assert any(r["lag_max"] == 1 for r in rows), "pipelined rollout should overlap an update"
    assert summary["reward_last"] >= summary["reward_first"] + 0.2, summary
    assert (tmp_path / "reward.png").stat().st_size > 1000


def test_invalid_config_names_the_key(tmp_path):
    for override, key in [("trainer.steps=0", "trainer.steps"), ("rollout.group_size=1", "rollout.group_size"),
                          ("learner.loss_aggregation=sum", "learner.loss_aggregation"),
                          ("model.path=/nonexistent", "model.path")]:
        try:
            build_run_config(_cfg(tmp_path, override))
        except ConfigError as e:
            assert f"'{key}'" in str(e)
        else:
            raise AssertionError(f"{override} was accepted")


def test_cli_reports_a_bad_key_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rlloop.train", "+conf=grpo", "trainer.steps=-3",
                          f"output_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "error: config key 'trainer.steps': must be a positive integer, got -3"
