"""The main job end to end on the embedded default: Hydra config -> coordinator ->
engine + learner actors -> GRPO with in-flight updates; the reward must rise.

Every run here is seeded (problems, sampling seeds, model init, learner). Synchronous
runs (trainer.pipelined=false) are then reproducible to the bit; pipelined ones still
vary with timing (which weights sampled which token), so each learning bound sits
well below the lowest of five seeds, and the spread measured is written beside it."""
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import ray

from rlloop.config import compose_config
from rlloop.handle import launch_config
from rlloop.train import run

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


def _cfg(tmp_path, *overrides):
    return compose_config(["+conf=grpo", f"output_dir={tmp_path}", "name=train-test", *overrides])


def _scrape_rlloop_metrics() -> dict[str, float]:
    """Largest value of each rlloop_* series on this node's Prometheus endpoint."""
    node = ray._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    found: dict[str, float] = {}
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith("ray_rlloop_"):  # Ray prefixes exported metrics with ray_
            name = line.split("{")[0].split(" ")[0].removeprefix("ray_")
            found[name] = max(found.get(name, 0.0), float(line.rsplit(" ", 1)[1]))
    return found


def test_grpo_run_learns_and_keeps_versions_and_lag(tmp_path, ray_cluster):
    """The default run (pipelined, 200 steps), seeded; a CPU has no peak in the MFU
    table, so one is given (it changes no number but learner_mfu)."""
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(run, _cfg(tmp_path, "seed=0", "learner.peak_tflops=0.5"))
        seen: dict[str, float] = {}
        while not job.done():  # metrics must show while the run is going
            try:
                seen.update({k: max(v, seen.get(k, 0.0)) for k, v in _scrape_rlloop_metrics().items()})
            except OSError:
                pass
            time.sleep(2)
        summary = job.result()
    for name in ("rlloop_reward", "rlloop_stall_ms", "rlloop_update_ms", "rlloop_weight_version",
                 "rlloop_tok_s", "rlloop_transfer_gbps", "rlloop_learner_tflops", "rlloop_learner_mfu"):
        assert seen.get(name, 0) > 0, f"{name} not exported with a non-zero value: {sorted(seen)}"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 200
    assert all(k in rows[0] for k in ("step", "reward_mean", "weight_version", "lag_max", "tok_s"))
    trained = [r for r in rows if "train_ms" in r]  # (a batch of zero-advantage groups trains nothing)
    assert len(trained) > 150 and all(0 < r["learner_mfu"] == pytest.approx(r["learner_tflops"] / 0.5)
                                      for r in trained)
    assert summary["learner_mfu_median"] > 0 and summary["learner_tflops_median"] > 0
    versions = [r["weight_version"] for r in rows]
    assert versions == sorted(set(versions)), "one new weight version per step"
    assert all(r["lag_max"] <= 1 for r in rows), "max_lag=1 must hold for every used sample"
    assert any(r["lag_max"] == 1 for r in rows), "pipelined rollout should overlap an update"
    # Gain (last 10 - first 10 steps) over seeds 0-4 at the recipe's lr 5e-4: 0.43-0.57
    # (seed 0: 0.45), no run collapsing. At lr 1e-3 it was 0.29-0.46, and one CI run
    # collapsed late to 0.18: the recipe's lr was lowered, the bound kept below the spread.
    assert summary["reward_last"] >= summary["reward_first"] + 0.3, summary
    assert (tmp_path / "reward.png").stat().st_size > 1000


def test_rollouts_ahead_are_sampled_that_many_versions_behind(tmp_path, ray_cluster):
    """trainer.rollouts_ahead=2: two rollouts generate while a step trains and updates,
    so samples lag the learner by up to two versions, and max_lag=2 keeps them all."""
    run(_cfg(tmp_path, "seed=0", "trainer.steps=5", "trainer.sft_steps=2", "trainer.rollouts_ahead=2",
             "rollout.max_lag=2", "name=ahead"))
    rows = _rows(tmp_path)
    assert len(rows) == 5 and max(r["lag_max"] for r in rows) == 2, rows
    assert rows[-1]["dropped_stale"] == 0


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _curve(rows: list[dict]) -> list[tuple]:
    """What a seed determines in a synchronous run (timings and tok/s vary)."""
    return [(r["step"], r["reward_mean"], r.get("loss")) for r in rows]


SYNCHRONOUS = ("seed=7", "trainer.pipelined=false", "trainer.steps=8", "trainer.sft_steps=5",
               "trainer.checkpoint_every=4")


@pytest.fixture(scope="module")
def synchronous_run(tmp_path_factory, ray_cluster) -> Path:
    """A short synchronous run, seed 7, checkpointed halfway."""
    out = tmp_path_factory.mktemp("sync") / "first"
    run(_cfg(out, "name=sync-first", *SYNCHRONOUS))
    return out


def test_same_seed_synchronous_runs_write_identical_curves(synchronous_run, tmp_path):
    """What the README promises for `trainer.pipelined=false seed=7`, on a short run."""
    run(_cfg(tmp_path, "name=sync-again", *SYNCHRONOUS))
    first, again = _curve(_rows(synchronous_run)), _curve(_rows(tmp_path))
    assert again == first
    assert len({reward for _, reward, _ in first}) > 1, "a curve, not a constant"


def test_resume_reproduces_the_run_it_continues(synchronous_run, tmp_path):
    """Resumed from its step-4 checkpoint (weights, optimizer, problem stream, sampling
    seeds), a synchronous run writes the same curve as the run that went on."""
    assert sorted(p.name for p in (synchronous_run / "checkpoints").iterdir()) == ["step_000004", "step_000008"]
    summary = run(_cfg(tmp_path, "name=sync-resumed", *SYNCHRONOUS,
                       f"resume={synchronous_run / 'checkpoints' / 'step_000004'}"))
    before, rows = _rows(synchronous_run), _rows(tmp_path)
    assert rows[:4] == before[:4], "the resumed run carries the old curve"
    assert _curve(rows) == _curve(before)
    versions = [r["weight_version"] for r in rows]
    assert versions == sorted(set(versions))
    assert summary["steps"] == 8


def _kill_mid_run(tmp_path, kills: dict[str, int], *overrides):
    """Launch a run, ray.kill each actor of `kills` (Ray restarts it) once its step
    count is done, wait for the run to end; its summary, per-step metrics and handle
    (the run's actors live as long as the handle)."""
    before = _shared_segments()
    handle = launch_config(_cfg(tmp_path, "weights.timeout_s=30", *overrides))
    assert handle.status()["phase"] == "starting engines and learner"  # the bar says so until step 1
    deadline = time.time() + 300
    for actor, at_step in sorted(kills.items(), key=lambda kill: kill[1]):
        while handle.status()["step"] < at_step and time.time() < deadline:
            time.sleep(0.5)
        ray.kill(ray.get_actor(actor), no_restart=False)
    summary = handle.wait(timeout=900, progress=False)
    # Neither a killed incarnation's weight region nor the final one outlives the run.
    assert _shared_segments() <= before, sorted(_shared_segments() - before)
    return summary, handle.metrics(), handle


def _shared_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("rlloop-*")}


def test_killed_engine_and_learner_come_back_and_the_run_goes_on(tmp_path, ray_cluster):
    """ray.kill the engine, later the learner, mid-run. The engine is restarted, rejoins
    and no sample is lost (its requests are issued again); the learner resumes from the
    last checkpoint and keeps learning. Every step keeps its full batch."""
    summary, rows, _handle = _kill_mid_run(tmp_path, {"faulty/engine/0": 5, "faulty/learner/0": 12}, "seed=0",
                                  "trainer.steps=80", "trainer.checkpoint_every=5", "name=faulty")
    assert summary["steps"] == 80 and summary["failures"] >= 2 and summary["learner_restores"] == 1, summary
    # Restored from a trained checkpoint (killed at step >= 12, checkpoints every 5).
    assert summary["restored_learner_steps"] >= 10, summary
    assert (rows["generated"] == 32 * 8).all(), "every step keeps its full batch"
    assert rows["weight_version"].is_monotonic_increasing
    assert ray.get(ray.get_actor("faulty/engine/0").version.remote()) == summary["weight_version"]
    # And it kept learning. Uninterrupted runs, seeds 0-4, steps 60-69 vs 0-4 (the
    # learner kill costs up to 10 steps), at lr 5e-4: +0.17 to +0.24.
    assert rows["reward_mean"][-10:].mean() > rows["reward_mean"][:5].mean() + 0.1, summary


def test_cli_run_leaves_no_processes_behind(tmp_path):
    """A finished run takes its Ray cluster, engines (and their vLLM processes) and
    learner down with it. Its processes are told apart by an inherited variable."""
    token = uuid.uuid4().hex
    out = subprocess.run([sys.executable, "-m", "rlloop.train", "+conf=grpo", "trainer.steps=3",
                          "trainer.sft_steps=2", f"output_dir={tmp_path}", "name=orphans"],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RLLOOP_PROCESS_TAG": token})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "orphans: 3 steps in" in out.stdout
    assert "(first 1) -> " in out.stdout, "3 steps: the first and last step compared, never overlapping"
    log = (tmp_path / "train.log").read_text().splitlines()  # the run's log: each step, then the summary
    assert [line.split("] - ", 1)[1].split(":")[0] for line in log] == [
        "[rlloop] orphans step 1/3", "[rlloop] orphans step 2/3", "[rlloop] orphans step 3/3", "orphans"], log
    deadline = time.time() + 60
    while (left := _tagged_processes(token)) and time.time() < deadline:
        time.sleep(1)
    assert not left, f"processes left behind: {left}"


def _tagged_processes(token: str) -> list[str]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get("RLLOOP_PROCESS_TAG") == token:
                found.append(" ".join(p.cmdline())[:120])
        except psutil.Error:
            pass
    return found


def test_megatron_tp2_learner_trains_and_survives_losing_a_rank(tmp_path, ray_cluster):
    """GRPO with a megatron learner of two TP ranks: the coordinator exports through
    the per-bucket gather, checkpoints per rank; when one rank is killed mid-run all
    ranks restart together, reload the last checkpoint, and the run completes."""
    summary, rows, _ = _kill_mid_run(tmp_path, {"mcore-tp2/learner/1": 14}, "seed=0", "trainer.steps=80",
                                  "trainer.checkpoint_every=10", "learner.backend=megatron",
                                  "learner.tensor_parallel_size=2", "name=mcore-tp2")
    assert summary["steps"] == 80 and summary["learner_restores"] == 1, summary
    assert summary["restored_learner_steps"] >= 10, summary
    assert rows["weight_version"].is_monotonic_increasing and (rows["generated"] == 32 * 8).all()
    # TP=2 trains as TP=1 does (test_megatron_learner): the same spread, +0.17 to +0.24.
    assert rows["reward_mean"][-10:].mean() > rows["reward_mean"][:5].mean() + 0.1, summary
    last = tmp_path / "checkpoints" / "step_000080"
    assert {p.name for p in last.glob("learner_state_rank*.pt")} == {"learner_state_rank0.pt",
                                                                      "learner_state_rank1.pt"}
