"""The defaults of every typed config, read from the base yaml (rlloop/conf/config.yaml): a
default is written there and only there, so a dataclass built in code (tests,
benchmarks, notebooks) and a run composed by Hydra start from the same values."""
from __future__ import annotations

from functools import cache
from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parent / "conf"  # shipped inside the package (pyproject package-data)


@cache
def _base():
    return OmegaConf.load(CONF_DIR / "config.yaml")


def default(key: str):
    """The base config's value at dotted `key` (a KeyError names a missing one)."""
    value = OmegaConf.select(_base(), key, default=KeyError)
    if value is KeyError:
        raise KeyError(f"{key} is not in {CONF_DIR / 'config.yaml'}")
    return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
