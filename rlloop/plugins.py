"""Functions named in config as "module:function" (learner.loss, rollout.reward)."""
from __future__ import annotations

import importlib


def import_function(spec: str, what: str):
    """The callable named `spec`; ValueError naming `what` if it does not import."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{what} {spec!r} is not an importable module:function ({e})") from e
    if not callable(fn):
        raise ValueError(f"{what} {spec!r} is not callable")
    return fn
