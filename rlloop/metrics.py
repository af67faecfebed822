"""Metrics through ray.util.metrics, so they appear in the Ray dashboard's metrics view
and on each node's Prometheus endpoint. Every value is tagged with the reporting
actor's run, role and index, taken from its name ("<run>/<role>/<index>")."""
from __future__ import annotations

from functools import cache

DESCRIPTIONS = {
    "rlloop_weight_version": "weight version an actor holds",
    "rlloop_update_ms": "wall time of the last weight update on an engine",
    "rlloop_stall_ms": "generation pause of the last in-flight update",
    "rlloop_transfer_gbps": "receive bandwidth of the last update, GB/s",
    "rlloop_in_flight": "requests in flight on an engine (queue depth)",
    "rlloop_tok_s": "generated tokens per second in the last rollout",
    "rlloop_lag_max": "largest version lag among the last rollout's samples",
    "rlloop_reward": "mean reward of the last rollout",
    "rlloop_loss": "learner loss of the last step",
    "rlloop_kl": "KL between learner and behaviour policy (last step)",
    "rlloop_clip_frac": "fraction of clipped tokens (last step)",
    "rlloop_dropped_stale": "samples dropped for exceeding max_lag (total)",
}
TAG_KEYS = ("run", "role", "index")


@cache
def _gauge(name: str):
    from ray.util.metrics import Gauge

    return Gauge(name, description=DESCRIPTIONS[name], tag_keys=TAG_KEYS)


@cache
def actor_tags() -> dict[str, str]:
    import ray

    name = ray.get_runtime_context().get_actor_name() or "driver"
    parts = name.split("/")
    if len(parts) >= 3:
        run, role, index = "/".join(parts[:-2]), parts[-2], parts[-1]
    else:
        run, role, index = name, "actor", "0"
    return {"run": run, "role": role, "index": index}


def report(**values: float) -> None:
    """Set gauges `rlloop_<key>` for this actor, e.g. report(stall_ms=12.5)."""
    tags = actor_tags()
    for key, value in values.items():
        if value is not None:
            _gauge(f"rlloop_{key}").set(float(value), tags=tags)
