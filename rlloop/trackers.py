"""Where a run's curves go: `metrics.jsonl` always, and TensorBoard, Weights & Biases
and MLflow when `trainer.loggers` names them, each written through its own library so
its own viewer reads the run. Every tracker gets the same series under the same names
(the keys of a metrics.jsonl row, `step` as the x axis), the run config as
hyperparameters, and at the end the reward plot.

Each writer persists a row as soon as it is logged (TensorBoard is flushed, W&B and
MLflow write through), so a run that dies keeps every step it finished.

Defaults that need no network or server: W&B runs offline (WANDB_MODE=online syncs
live), MLflow writes a file store under the run directory (MLFLOW_TRACKING_URI points
it at a server instead).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path

TRACKERS = ("jsonl", "tensorboard", "wandb", "mlflow")
# The module each optional tracker imports, to tell a missing package before the run starts.
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
INSTALL_HINT = "pip install 'rlloop[trackers]'"


def missing_package(names) -> str | None:
    """One line naming the first tracker whose package is not installed, else None."""
    for name in names:
        module = _PACKAGES.get(name)
        if module and importlib.util.find_spec(module) is None:
            return f"{name} needs the '{module}' package: {INSTALL_HINT}"
    return None


def tracker_paths(out_dir: str, names) -> dict[str, str]:
    """Where each enabled tracker writes (the notebook handle shows these)."""
    out = Path(out_dir).resolve()
    paths = {"jsonl": str(out / "metrics.jsonl"), "tensorboard": str(out / "tensorboard"),
             "wandb": str(out / "wandb"), "mlflow": os.environ.get("MLFLOW_TRACKING_URI", f"file:{out / 'mlruns'}")}
    return {name: paths[name] for name in TRACKERS if name == "jsonl" or name in names}


def hyperparameters(run_cfg) -> dict[str, int | float | str | bool]:
    """The run config flattened to dotted keys ("learner.objective.clip_low"), values
    that every tracker accepts; a problem set (training, eval) is given by its size."""
    flat: dict[str, int | float | str | bool] = {}

    def walk(prefix: str, value) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                if f.metadata.get("secret"):
                    continue
                v = getattr(value, f.name)
                walk(f"{prefix}{f.name}.", len(v) if f.name == "problems" else v)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix[:-1]] = value
        else:  # None, tuples
            flat[prefix[:-1]] = str(value)

    walk("", run_cfg)
    return flat


def _scalars(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


class JsonlWriter:
    def __init__(self, out: Path, **_):
        self.file = (out / "metrics.jsonl").open("w")

    def log(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self, plot: Path | None, failed: bool) -> None:
        self.file.close()


class TensorBoardWriter:
    def __init__(self, out: Path, hparams: dict, **_):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        self.writer = SummaryWriter(str(out / "tensorboard"))
        # SummaryWriter.add_hparams would open a second run directory; writing the
        # summaries ourselves keeps the config next to the curves.
        for summary in hparams_summary(hparams, {"reward_mean": 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in hparams.items()))

    def log(self, row: dict) -> None:
        for key, value in _scalars(row).items():
            self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()

    def close(self, plot: Path | None, failed: bool) -> None:
        if plot is not None:
            import matplotlib.image

            self.writer.add_image("reward_plot", matplotlib.image.imread(plot)[..., :3], dataformats="HWC")
        self.writer.close()


class WandbWriter:
    def __init__(self, out: Path, name: str, hparams: dict, **_):
        import wandb

        self.wandb = wandb
        # console="off": W&B would otherwise wrap this actor's stdout, which is its log.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlloop"), name=name, dir=str(out),
                              mode=os.environ.get("WANDB_MODE", "offline"), config=hparams,
                              settings=wandb.Settings(console="off", x_disable_stats=True, silent=True))

    def log(self, row: dict) -> None:
        self.run.log(_scalars(row), step=row["step"])

    def close(self, plot: Path | None, failed: bool) -> None:
        if plot is not None:
            self.run.log({"reward_plot": self.wandb.Image(str(plot))})
        self.run.finish(exit_code=1 if failed else 0)


class MlflowWriter:
    def __init__(self, out: Path, name: str, hparams: dict, **_):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = tracker_paths(str(out), ["mlflow"])["mlflow"]
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store but asks for this opt-in; a local store
            # needs no database package and no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "rlloop")
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        params = [Param(k, str(v)) for k, v in hparams.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, row: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, row["step"])
                                                    for k, v in _scalars(row).items()])

    def close(self, plot: Path | None, failed: bool) -> None:
        if plot is not None:
            self.client.log_artifact(self.run_id, str(plot))
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


_WRITERS = {"jsonl": JsonlWriter, "tensorboard": TensorBoardWriter, "wandb": WandbWriter, "mlflow": MlflowWriter}


class RunTrackers:
    """All of a run's trackers as one: log(row) once per step, close(plot) at the end,
    or close(failed=True) when the run dies (W&B and MLflow then show it as failed)."""

    def __init__(self, names, out_dir: str, name: str, hparams: dict):
        out = Path(out_dir)
        self.writers = [_WRITERS[n](out=out, name=name, hparams=hparams) for n in tracker_paths(out_dir, names)]

    def log(self, row: dict) -> None:
        for writer in self.writers:
            writer.log(row)

    def close(self, plot: Path | None = None, failed: bool = False) -> None:
        for writer in self.writers:
            writer.close(plot, failed)


def progress_line(name: str, row: dict, steps: int) -> str:
    """The coordinator's per-step line in its actor log (the dashboard shows it)."""
    loss = row.get("loss")
    return (f"[rlloop] {name} step {row['step'] + 1}/{steps}: reward {row['reward_mean']:.3f}, "
            f"loss {'-' if loss is None else f'{loss:.4f}'}, weights v{row['weight_version']}, "
            f"lag {row['lag_max']}, {row['tok_s']:.0f} tok/s, {row['time_s']:.1f} s"
            + (f", eval {row['eval_accuracy']:.3f}" if row.get("eval_accuracy") is not None else ""))
