"""Launching runs from Python or a notebook without blocking.

    import rlloop
    run = rlloop.launch(["trainer.steps=100"])   # Hydra overrides; +conf=grpo is implied
    run.status(); run.metrics(); run.plot(); run.wait(); run.stop()
"""
from __future__ import annotations

import logging
import os

import ray

from rlloop.trackers import progress_line

log = logging.getLogger("rlloop")


class RunHandle:
    """A running (or finished) GRPO run, backed by its coordinator actor."""

    def __init__(self, coordinator, run_ref, run_cfg):
        self.coordinator = coordinator
        self.config = run_cfg
        self._ref = run_ref
        self._summary = None

    @property
    def output_dir(self) -> str:
        return self.config.output_dir

    def done(self) -> bool:
        return self._summary is not None or bool(ray.wait([self._ref], timeout=0)[0])

    def status(self) -> dict:
        p = ray.get(self.coordinator.progress.remote())
        state = "finished" if self.done() else "running"
        return {"state": state, "phase": p["phase"], "step": p["step"], "steps": p["steps"],
                "reward_mean": p["last"]["reward_mean"] if p["last"] else None,
                "weight_version": p["last"]["weight_version"] if p["last"] else 0}

    @property
    def tracker_paths(self) -> dict[str, str]:
        """Where each tracker of `trainer.loggers` writes, e.g. the TensorBoard log dir."""
        from rlloop.trackers import tracker_paths

        return tracker_paths(self.output_dir, self.config.trainer.loggers)

    def metrics(self):
        """One row per step, as a pandas DataFrame: the series every tracker gets, under
        the same names (reward_mean, loss, kl_behaviour, grad_norm, ...)."""
        import pandas as pd

        return pd.DataFrame(ray.get(self.coordinator.metrics.remote()))

    def plot(self):
        """The reward curve (and its moving average), and beside it the held-out eval
        accuracy when the run has an eval split: the figure of reward.png."""
        from rlloop.run_report import plot_run

        return plot_run(ray.get(self.coordinator.metrics.remote()), self.config.name)

    def wait(self, timeout: float | None = None, progress: bool = True) -> dict:
        """Block until the run ends (with a progress bar); returns its summary."""
        if self._summary is None:
            from tqdm.auto import tqdm

            from rlloop.run_report import summary_line

            held_out = {}  # the last eval accuracy seen, shown until the next
            with tqdm(total=self.config.trainer.steps, desc=self.config.name, unit="step",
                      disable=not progress) as bar:
                while True:
                    ready, _ = ray.wait([self._ref], timeout=1.0 if timeout is None else min(1.0, timeout))
                    p = ray.get(self.coordinator.progress.remote(bar.n))
                    for row in p["rows"]:  # to train.log under the CLI (Hydra's file handler)
                        log.info(progress_line(self.config.name, row, self.config.trainer.steps))
                        if row.get("eval_accuracy") is not None:
                            held_out = {"eval": f"{row['eval_accuracy']:.2f}"}
                    bar.update(p["step"] - bar.n)
                    if p["last"]:
                        bar.set_postfix(reward=f"{p['last']['reward_mean']:.2f}", v=p["last"]["weight_version"],
                                        **held_out,
                                        **({} if p["phase"] == "training" else {"now": p["phase"]}))
                    else:  # engine start and warm-up take a while: say which
                        bar.set_postfix_str(p["phase"])
                    if ready:
                        break
                    if timeout is not None:
                        timeout -= 1.0
                        if timeout <= 0:
                            raise TimeoutError(f"run {self.config.name} still going")
            self._summary = ray.get(self._ref)
            log.info(summary_line(self._summary))
            ray.get(self.coordinator.shutdown.remote())
        return self._summary

    def stop(self, timeout: float = 300) -> dict:
        """Ask the run to finish after its current step, then wait for it."""
        ray.get(self.coordinator.stop.remote())
        return self.wait(timeout=timeout, progress=False)


def connect_ray(cfg) -> None:
    """Join cfg.ray.address (or RAY_ADDRESS), else start a local cluster; once per process."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if not ray.is_initialized():
        # "local", not None: None would join whatever cluster /tmp/ray/ray_current_cluster
        # names (another user's `ray start`, or a stale one: the run then hangs on it).
        ray.init(address=cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=cfg.ray.dashboard,
                 log_to_driver=cfg.ray.log_to_driver,
                 runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": os.environ["VLLM_LOGGING_LEVEL"]}})


def launch_config(cfg) -> RunHandle:
    """Start a run from a composed Hydra config (DictConfig)."""
    from rlloop.actors.coordinator import Coordinator
    from rlloop.actors.placement import on_this_node
    from rlloop.config import build_run_config

    run_cfg = build_run_config(cfg)
    connect_ray(cfg)
    coord = ray.remote(Coordinator).options(name=f"{run_cfg.name}/coordinator/0", num_cpus=0, max_concurrency=4,
                                            scheduling_strategy=on_this_node()).remote(run_cfg)
    return RunHandle(coord, coord.run.remote(), run_cfg)


def launch(overrides: list[str] | dict | None = None, recipe: str = "grpo") -> RunHandle:
    """Start a run without blocking. `overrides` are Hydra overrides, as a list
    (["trainer.steps=50"]) or a dict ({"trainer.steps": 50})."""
    from rlloop.config import compose_config

    if isinstance(overrides, dict):
        overrides = [f"{k}={v}" for k, v in overrides.items()]
    return launch_config(compose_config([f"+conf={recipe}", *(overrides or [])]))
