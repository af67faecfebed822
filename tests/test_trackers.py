"""Fast checks of the observability pieces that need no run: the shipped Grafana
dashboard charts every gauge, and a tracker whose package is missing stops the run
before it starts with one line naming the extra to install."""
import json
import sys
from pathlib import Path

import pytest

from rlloop.config import ConfigError, build_run_config, compose_config
from rlloop.metrics import DESCRIPTIONS, ROLES

REPO = Path(__file__).resolve().parent.parent


def test_grafana_dashboard_charts_every_gauge_by_run():
    dashboard = json.loads((REPO / "docs" / "grafana" / "rlloop.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    charted = {name for name in DESCRIPTIONS for e in exprs if f"ray_{name}{{" in e}
    assert charted == set(DESCRIPTIONS)
    assert all('run=~"$run"' in e for e in exprs)
    assert {g for gauges in ROLES.values() for g in gauges} == set(DESCRIPTIONS), "every gauge has a reporter"


@pytest.mark.parametrize("tracker,package", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                             ("mlflow", "mlflow")])
def test_missing_tracker_package_names_the_extra(tmp_path, monkeypatch, tracker, package):
    monkeypatch.setitem(sys.modules, package, None)  # how Python marks a module as not importable
    cfg = compose_config(["+conf=grpo", f"output_dir={tmp_path}", f"trainer.loggers=[jsonl,{tracker}]"])
    with pytest.raises(ConfigError) as e:
        build_run_config(cfg)
    assert str(e.value) == (f"config key 'trainer.loggers': {tracker} needs the '{package}' package: "
                            "pip install 'rlloop[trackers]'")


def test_loggers_must_be_a_list_of_known_trackers(tmp_path):
    for value in ("[jsonl,csv]", "tensorboard"):
        with pytest.raises(ConfigError, match="config key 'trainer.loggers': must be a list of jsonl, tensorboard"):
            build_run_config(compose_config(["+conf=grpo", f"output_dir={tmp_path}", f"trainer.loggers={value}"]))


@pytest.mark.parametrize("failed,status", [(False, "FINISHED"), (True, "FAILED")])
def test_a_run_that_dies_is_closed_as_failed(tmp_path, monkeypatch, failed, status):
    """The coordinator closes its trackers with failed=True when a step raises: MLflow
    (and W&B) then show the run as failed instead of running forever."""
    from mlflow.tracking import MlflowClient

    from rlloop.trackers import RunTrackers, tracker_paths

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trackers = RunTrackers(["mlflow"], str(tmp_path), "dies", {"seed": 0})
    trackers.log({"step": 0, "reward_mean": 0.5})
    trackers.close(failed=failed)
    client = MlflowClient(tracker_paths(str(tmp_path), ["mlflow"])["mlflow"])
    [run] = client.search_runs([client.get_experiment_by_name("rlloop").experiment_id])
    assert run.info.status == status
    assert [m.value for m in client.get_metric_history(run.info.run_id, "reward_mean")] == [0.5]
    assert (tmp_path / "metrics.jsonl").read_text().strip() == '{"step": 0, "reward_mean": 0.5}'
