"""Entry point: `python -m rlloop.train +conf=grpo [overrides]`.

Reads the Hydra config (rlloop/conf/), builds the tiny model when no model.path is given,
starts a local Ray cluster (or joins RAY_ADDRESS), runs the coordinator and prints a
one-line summary. Metrics go to <output_dir>/metrics.jsonl, the curve to reward.png.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rlloop.config import ConfigError
from rlloop.defaults import CONF_DIR


def run(cfg: DictConfig) -> dict:
    """Run to the end with a progress bar; Ctrl-C finishes the current step and stops."""
    from rlloop.handle import launch_config
    from rlloop.run_report import summary_line

    handle = launch_config(cfg)
    try:
        summary = handle.wait()
    except KeyboardInterrupt:
        print("stopping after the current step ...", file=sys.stderr, flush=True)
        summary = handle.stop()
    print(summary_line(summary), flush=True)
    return summary


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from rlloop.actors.placement import CapacityError

    try:
        run(cfg)
    except (ConfigError, CapacityError) as e:
        _remove_if_unused(Path(cfg.output_dir))
        print(f"error: {getattr(e, 'cause', None) or e}", file=sys.stderr)  # raised in the coordinator: its own words
        sys.exit(2)


def _remove_if_unused(out: Path) -> None:
    """Hydra creates the run directory (and an empty train.log) before the config is
    checked: a run that never started removes it, unless something else is in it (a
    rerun under an old run's name keeps the old run's files)."""
    log = out / "train.log"
    if out.is_dir() and {p.name for p in out.iterdir()} <= {"train.log"} and (
            not log.exists() or log.stat().st_size == 0):
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
