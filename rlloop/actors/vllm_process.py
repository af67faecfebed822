"""The vLLM processes behind an engine actor: the CPU KV-cache size, their logs (the
root cause of a failed start) and their memory."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from rlloop.actors.engine_io import EngineConfig


def cpu_kv_cache_bytes(config: EngineConfig) -> int:
    """KV cache for max_num_seqs sequences of max_model_len tokens of this model.

    On CPU, vLLM reads gpu_memory_utilization as a fraction of the NUMA node's RAM and
    gives the KV cache that fraction minus the engine's own resident memory (~0.7 GiB
    for the tiny model): a budget that goes negative ("Engine core initialization
    failed") on a node with less RAM, or when other engines and learners share it.
    An explicit size depends only on the model and the limits asked for."""
    from rlloop.weights.protocol import DTYPES

    hf = json.loads((Path(config.model) / "config.json").read_text())
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    per_token = 2 * hf["num_hidden_layers"] * kv_heads * head_dim * DTYPES[config.dtype].itemsize
    return config.max_num_seqs * config.max_model_len * per_token


class OwnLogs:
    """This process's stdout and stderr from now on, where they are files (a Ray
    worker's are; vLLM's engine-core and worker processes inherit them and log there)."""

    TAIL = 20
    _ANSI = re.compile(r"\x1b\[[0-9;]*m")
    # "(EngineCore pid=12) ERROR 11-25 08:24:13 [core.py:1510] " before a subprocess's line
    _PREFIX = re.compile(r"^\(\w+ pid=\d+\) (?:[A-Z]+ [\d-]+ [\d:]+ \[[^\]]+\] )?")
    _EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception): \S")

    def __init__(self):
        self.start = {}
        for fd in (1, 2):
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if os.path.isfile(path):
                self.start[path] = os.path.getsize(path)

    def tail(self) -> str:
        """The exception lines the subprocesses logged (the root cause is among them),
        then the last lines of each file."""
        errors, tails = [], []
        for path, offset in self.start.items():
            with open(path, errors="replace") as f:
                f.seek(offset)
                lines = self._ANSI.sub("", f.read()).splitlines()
            for line in lines:
                bare = self._PREFIX.sub("", line)
                if self._EXCEPTION.match(bare) and bare not in errors:
                    errors.append(bare)
            if lines:
                tails.append(f"[last lines of {path}]\n" + "\n".join(lines[-self.TAIL:]))
        if not tails:
            return "(not captured: this process's output is not a file; see above)"
        return "\n".join(["[exceptions raised]", *errors, *tails])


def tree_rss_mb() -> float:
    """Resident memory of this actor and the vLLM processes it spawned."""
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20
