"""Watching a run where people already look, on one short run with every tracker
on: Prometheus gauges labelled with the run and the reporting role, the same curves in
metrics.jsonl, TensorBoard, the offline W&B run, MLflow's file store and the notebook
handle, and the coordinator's per-step line in its actor log."""
import json
import math
import os
import re
import time
import urllib.request
from pathlib import Path

import pytest
import ray

from rlloop.config import compose_config
from rlloop.handle import launch_config
from rlloop.metrics import ROLES

pytestmark = pytest.mark.integration

RUN = "observed"
STEPS = 4


def _scrape() -> list[tuple[str, dict[str, str], float]]:
    """Every ray_rlloop_* sample on this node's Prometheus endpoint: (gauge, labels, value)."""
    node = ray._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    samples = []
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith("ray_rlloop_"):  # Ray prefixes exported metrics with ray_
            head, value = line.rsplit(" ", 1)
            name, _, labels = head.partition("{")
            samples.append((name.removeprefix("ray_"), dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return samples


def _expected() -> set[tuple[str, str]]:
    return {(gauge, role) for role, gauges in ROLES.items() for gauge in gauges}


@pytest.fixture(scope="module")
def observed(ray_cluster, tmp_path_factory):
    """One short run with every tracker, scraped while it goes; its actors stay up
    (the handle has not shut them down) until every gauge has been exported once."""
    out = tmp_path_factory.mktemp("observed")
    handle = launch_config(compose_config([
        "+conf=grpo", f"output_dir={out}", f"name={RUN}", f"trainer.steps={STEPS}", "trainer.sft_steps=10",
        "trainer.sft_target_reward=2", "trainer.sft_check_every=5", "eval.fraction=0.1", "trainer.loggers=[jsonl,tensorboard,wandb,mlflow]",
        "learner.peak_tflops=0.5",  # a CPU has no peak in the table: without one, learner_mfu is not exported
        "server.enabled=true", "server.port=0"]))  # and outside clients sample the live policy
    seen: dict[tuple[str, str], float] = {}
    served: list[tuple[int, int]] = []  # (version at start, at end) of each completion asked during the run
    deadline = time.time() + 600
    while time.time() < deadline:
        # Ray pushes gauges to its metrics agent every few seconds (later on a loaded
        # machine): keep scraping after the last step, for 120 s at most, until each
        # has arrived. The last step's gauges (eval, learner) are set a second before it.
        if handle.done():
            deadline = min(deadline, time.time() + 120)
        if not handle.done() and (info := out / "server.json").exists() and info.read_text():
            served.extend(_complete(json.loads(info.read_text())))
        try:
            for gauge, labels, value in _scrape():
                if labels.get("run") == RUN:
                    key = (gauge, labels.get("role"))
                    seen[key] = max(value, seen.get(key, -math.inf))
        except OSError:
            pass
        if handle.done() and _expected() <= set(seen) and _last_step_seen(handle, seen):
            break
        time.sleep(1)
    summary = handle.wait(timeout=120, progress=False)
    return {"out": out, "handle": handle, "summary": summary, "seen": seen, "served": served}


def _complete(info: dict) -> list[tuple[int, int]]:
    """A few completions from the run's OpenAI route: the versions that answered."""
    import openai

    client = openai.OpenAI(base_url=f"{info['url']}/v1", api_key="open", max_retries=0, timeout=60)
    versions = []
    for _ in range(5):
        try:
            raw = client.completions.with_raw_response.create(model=info["model"], prompt="12+7=", max_tokens=4)
        except openai.APIConnectionError:  # the run ended meanwhile
            break
        assert raw.parse().choices[0].text is not None
        versions.append((int(raw.headers["x-rlloop-version-start"]), int(raw.headers["x-rlloop-version-end"])))
    return versions


def _last_step_seen(handle, seen) -> bool:
    """Gauges arrive a few seconds after they are set, and each actor pushes its own
    on its own clock: has the last step's arrived from the coordinator and the learner?"""
    final = ray.get(handle.coordinator.progress.remote())["last"]["weight_version"]
    return (seen.get(("rlloop_weight_version", "coordinator")) == final
            and seen.get(("rlloop_learner_steps", "learner")) == STEPS)


def test_every_gauge_is_labelled_with_the_run_and_its_role(observed):
    seen = observed["seen"]
    assert _expected() <= set(seen), f"missing {sorted(_expected() - set(seen))}"
    assert set(seen) <= _expected(), f"labelled with a role that does not report it: {sorted(set(seen) - _expected())}"
    trained = sum("loss" in json.loads(line) for line in (observed["out"] / "metrics.jsonl").read_text().splitlines())
    assert seen[("rlloop_learner_steps", "learner")] == trained > 0
    assert seen[("rlloop_learner_step_ms", "learner")] > 0 and seen[("rlloop_learner_tok_s", "learner")] > 0
    assert seen[("rlloop_weight_version", "coordinator")] == observed["summary"]["weight_version"]


def test_sft_warm_up_samples_on_the_engine_at_each_check_until_its_last_step(observed):
    """A target no reward reaches: every check runs, before the first SFT step, every
    sft_check_every steps and after the last; each one's rollout is on the current weights."""
    checks = observed["summary"]["sft_checks"]
    assert [c["sft_step"] for c in checks] == [0, 5, 10]
    assert checks[0]["sft_loss"] is None and all(c["sft_loss"] > 0 for c in checks[1:])
    assert all(0 <= c["reward"] <= 1 for c in checks)
    assert observed["summary"]["weight_version"] == len(checks) + 1 + STEPS


def _jsonl_rewards(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["reward_mean"] for r in rows}


def test_tensorboard_reads_back_the_curves_config_and_plot(observed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    expected = _jsonl_rewards(observed["out"])
    assert sorted(expected) == list(range(STEPS))
    events = EventAccumulator(str(observed["out"] / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"reward_mean", "loss", "kl_behaviour", "grad_norm", "stall_ms", "tok_s"} <= set(tags["scalars"])
    got = {e.step: e.value for e in events.Scalars("reward_mean")}
    assert got == pytest.approx(expected, abs=1e-6)  # stored as float32
    assert tags["images"] == ["reward_plot"]
    assert "config/text_summary" in tags["tensors"]
    hparams = events.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in hparams and "_hparams_/session_start_info" in hparams


def _wandb_records(run_file: Path):
    """The protobuf Records of an offline W&B run's transaction log (run-<id>.wandb), a
    LevelDB-style log of wandb's own `Record` messages: a 7-byte file header, then
    32 KiB blocks of chunks (crc32c: 4, length: 2, type: 1 byte, data)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, payload = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a chunk header: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero fill after the last chunk
            break
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record (FULL) or its last chunk (LAST)
            record = Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def test_wandb_offline_run_holds_the_same_reward_series(observed):
    runs = list((observed["out"] / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    history, config, images = {}, {}, []
    for record in _wandb_records(runs[0]):
        if record.HasField("history"):
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row["reward_mean"]
            images += [row["reward_plot/_type"]] if "reward_plot/_type" in row else []
        elif record.HasField("run"):
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    assert history == _jsonl_rewards(observed["out"])
    run_cfg = observed["handle"].config
    assert config["name"] == RUN and config["learner.lr"] == 5e-4
    # sizes, not the problems: 10 of arithmetic's 100 questions are held out, with their rows
    assert config["eval.problems"] == len(run_cfg.eval.problems) == 10
    assert config["rollout.problems"] == len(run_cfg.rollout.problems) and 800 < config["rollout.problems"] < 1000
    assert images == ["image-file"]


def test_mlflow_run_holds_the_same_reward_series_config_and_plot(observed, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(observed["handle"].tracker_paths["mlflow"])
    [run] = client.search_runs([client.get_experiment_by_name("rlloop").experiment_id])
    assert run.info.run_name == RUN and run.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "reward_mean")}
    assert history == _jsonl_rewards(observed["out"])
    assert run.data.params["learner.lr"] == "0.0005"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["reward.png"]


def test_notebook_handle_shows_the_same_series_and_tracker_paths(observed):
    handle = observed["handle"]
    df = handle.metrics()
    assert dict(zip(df["step"], df["reward_mean"])) == _jsonl_rewards(observed["out"])
    paths = handle.tracker_paths
    assert sorted(paths) == ["jsonl", "mlflow", "tensorboard", "wandb"]
    assert Path(paths["tensorboard"]).is_dir() and Path(paths["jsonl"]).is_file()


def test_coordinator_logs_one_line_per_step(observed):
    """What the dashboard shows as the coordinator actor's log: its worker's stdout file."""
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    lines = [line for f in logs.glob("worker-*.out") if os.path.getsize(f)
             for line in f.read_text(errors="replace").splitlines() if line.startswith(f"[rlloop] {RUN} step ")]
    assert [line.split(":")[0] for line in lines] == [f"[rlloop] {RUN} step {i}/{STEPS}" for i in range(1, STEPS + 1)]


def test_outside_clients_sample_the_live_policy_and_see_its_version(observed):
    """server.enabled=true: while the run trains, completions through its OpenAI route
    come from the weights being updated in flight, each saying which version made it."""
    served = observed["served"]
    ends = [b for _, b in served]
    print(f"{len(served)} completions, versions {sorted(set(ends))}")
    assert all(a <= b for a, b in served) and ends == sorted(ends)
    assert len(set(ends)) >= 2 and ends[-1] <= observed["summary"]["weight_version"]
