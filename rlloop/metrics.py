"""Metrics through ray.util.metrics, so they appear in the Ray dashboard's metrics view
and on each node's Prometheus endpoint (names get Ray's `ray_` prefix). Every value is
tagged with the reporting actor's run, role and index, taken from its name
("<run>/<role>/<index>": coordinator, engine and learner actors are all named so).
docs/grafana/rlloop.json charts every gauge below."""
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
    "rlloop_eval_accuracy": "mean reward of greedy decoding on the held-out eval split (last eval)",
    "rlloop_loss": "learner loss of the last step",
    "rlloop_kl": "KL between learner and behaviour policy (last step)",
    "rlloop_clip_frac": "fraction of clipped tokens (last step)",
    "rlloop_dropped_stale": "samples dropped for exceeding max_lag (total)",
    "rlloop_learner_step_ms": "wall time of the learner's last training step on this rank",
    "rlloop_learner_tok_s": "completion tokens of the last training batch per second of its step",
    "rlloop_learner_tflops": "model FLOP/s per learner process in the last training step, in TFLOP/s",
    "rlloop_learner_mfu": "model FLOPs utilisation of the last training step (over the device's peak)",
    "rlloop_learner_steps": "training steps the learner has taken (its policy version)",
    "rlloop_grad_norm": "gradient norm before clipping (last step, mean over mini-batches)",
}
# Which actor role reports each gauge.
ROLES = {
    "coordinator": ("rlloop_weight_version", "rlloop_reward", "rlloop_lag_max", "rlloop_tok_s", "rlloop_loss",
                    "rlloop_kl", "rlloop_clip_frac", "rlloop_dropped_stale", "rlloop_eval_accuracy"),
    "engine": ("rlloop_weight_version", "rlloop_update_ms", "rlloop_stall_ms", "rlloop_transfer_gbps",
               "rlloop_in_flight"),
    "learner": ("rlloop_learner_step_ms", "rlloop_learner_tok_s", "rlloop_learner_tflops", "rlloop_learner_mfu",
                "rlloop_learner_steps", "rlloop_grad_norm"),
}
TAG_KEYS = ("run", "role", "index")


@cache
def _gauge(name: str):
    from ray.util.metrics import Gauge

    return Gauge(name, description=DESCRIPTIONS[name], tag_keys=TAG_KEYS)


@cache
def actor_tags() -> dict[str, str] | None:
    """run, role and index of this actor; None outside a named rlloop actor."""
    import ray

    parts = (ray.get_runtime_context().get_actor_name() or "").split("/")
    if len(parts) < 3:
        return None
    return {"run": "/".join(parts[:-2]), "role": parts[-2], "index": parts[-1]}


def report(**values: float | None) -> None:
    """Set gauges `rlloop_<key>` for this actor, e.g. report(stall_ms=12.5); None
    values are skipped. Outside a named Ray actor (a learner built in a test or a
    script) there is no run to label, and nothing is exported."""
    import ray

    tags = actor_tags() if ray.is_initialized() else None
    if tags is None:
        return
    for key, value in values.items():
        if value is not None:
            _gauge(f"rlloop_{key}").set(float(value), tags=tags)
