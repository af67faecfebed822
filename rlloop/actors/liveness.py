"""Telling a dead or restarting actor from a slow one."""
from __future__ import annotations

import time

import ray

# What a call on a dead or restarting actor raises.
ACTOR_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
# What recovery itself may meet: also a member's task failing on the broken group, or
# a member not answering in time.
ACTOR_TROUBLE = (*ACTOR_GONE, ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError)


def wait_ready(actor, deadline: float):
    """`actor.ready()` once it answers: a restarting actor refuses calls until its
    constructor is done. A constructor that raised is not waited for: its error (the
    cause, with its traceback) is raised at once."""
    while True:
        try:
            return ray.get(actor.ready.remote(), timeout=max(1.0, deadline - time.time()))
        except ACTOR_GONE as e:
            if getattr(e, "actor_init_failed", False) or time.time() > deadline:
                raise
            time.sleep(1.0)
