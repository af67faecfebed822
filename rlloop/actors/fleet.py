"""The fleet: the engines, the learner and the weight group between them, and the one
place a run recovers from losing any of them.

A member of the weight group that dies is restarted by Ray: an engine comes back on
its initial weights, the learner too (it then reloads the last checkpoint). `recover`
waits for everyone, re-forms the group and resends the learner's weights under a new
version. `push` and `train` recover by themselves and retry once; the rollout calls
`recover` when an engine dies with its requests, then issues them again.
"""
from __future__ import annotations

import time
from pathlib import Path

import ray

from rlloop.actors.engine import engine_actor, engine_gpus
from rlloop.actors.learner_group import LearnerGroup
from rlloop.actors.liveness import ACTOR_GONE, ACTOR_TROUBLE, wait_ready
from rlloop.actors.placement import check_capacity, colocated
from rlloop.actors.weight_sync import (UpdatePusher, auto_backend, join_engines, per_rank_senders,
                                       weight_group_config)
from rlloop.learner.policy import Sample
from rlloop.run_config import RunConfig
from rlloop.weights.group import WeightGroupTimeout
from rlloop.weights.protocol import WeightUpdateError, WeightUpdateRequest
from rlloop.weights.shared import SHARED_WIRES

RECOVERY_ATTEMPTS = 3  # another actor may die while a recovery runs: start it over


class Fleet:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        e, learner = cfg.engines, cfg.learner
        ranks = learner.tensor_parallel_size * learner.data_parallel_size if learner.backend == "megatron" else 1
        check_capacity({"engines": e.count * engine_gpus(e.engine, e.num_gpus), "learner": ranks * learner.gpus},
                       {"engines.node_resource": e.node_resource, "learner.node_resource": learner.node_resource})
        self.learner_tp = learner.tensor_parallel_size if learner.backend == "megatron" else 1
        self.colocated = colocated(learner.gpus, ranks, self.learner_tp, e.num_gpus, e.count,
                                   e.engine.tensor_parallel_size)
        # Colocated: each learner rank's bundle is a whole GPU, and engine i joins bundle i % ranks.
        self.learner = LearnerGroup(cfg.learner, cfg.name, bundle_gpus=1 if self.colocated else None)
        self.engines = [engine_actor(e.engine, name=f"{cfg.name}/engine/{i}", num_gpus=e.num_gpus,
                                     max_restarts=e.max_restarts, node_resource=e.node_resource,
                                     bundle=self.learner.ranks.strategy(i % ranks) if self.colocated else None)
                        for i in range(e.count)]
        self.version = 0  # of the weights the engines serve
        self.failures = 0
        self.learner_restores = 0  # failures after which the learner came back from its last checkpoint
        self.restored_learner_steps: int | None = None  # optimizer steps of the checkpoint last restored
        self.last_checkpoint: Path | None = None
        try:
            self.learner_pids = self.learner.wait_ready(time.time() + max(cfg.weights.timeout_s, 600))
            ray.get([e.ready.remote() for e in self.engines])
            self._form_group()
            print(f"[rlloop] {cfg.name} placement (node ids): {self.nodes()}", flush=True)
        except BaseException:
            self.kill()  # nothing of a run that did not start stays behind
            raise

    @property
    def _bucket_bytes(self) -> int:
        return int(self.cfg.weights.bucket_mb * 2**20)

    def nodes(self, key: str = "node") -> dict:
        """Each actor's node: {"learner/0": id, ..., "engine/0": id, ...} (key="gpus":
        the GPUs Ray gave each)."""
        engines = ray.get([e.ready.remote() for e in self.engines])
        return {**{f"learner/{r}": p[key] for r, p in enumerate(self.learner.placements())},
                **{f"engine/{i}": info[key] for i, info in enumerate(engines)}}

    def weight_group(self) -> dict:
        """How weights travel: the wire, the learner TP ranks and DP replicas that send."""
        return {"backend": self.wire, "senders": self.group.senders, "replicas": self.group.replicas}

    def counters(self) -> dict:
        return {"failures": self.failures, "learner_restores": self.learner_restores}

    # --- what the loop calls ----------------------------------------------------------

    def push(self) -> dict:
        """The learner's weights to every engine, in flight, as the next version."""
        try:
            return self._send()
        except (*ACTOR_GONE, ray.exceptions.RayTaskError) as e:
            if isinstance(e, WeightUpdateError):
                raise  # refused before anything changed: a bug, not a failure
            self.recover(e)  # resends the current weights under a newer version
            return {"update_ms": None, "stall_ms": None, "send_ms": None, "kv_recomputed_tokens": None,
                    "kv_logprob_gap": None}

    def train(self, samples: list[Sample]) -> dict:
        try:
            return self.learner.train_step(samples)
        except ACTOR_TROUBLE as e:
            # A rank died, or a survivor's collective failed with it: the learner comes
            # back on its last checkpoint. A second failure propagates.
            self.recover(e)
            return self.learner.train_step(samples)

    def sft_step(self, prompts: list[list[int]], targets: list[list[int]]) -> float:
        return self.learner.sft_step(prompts, targets)["sft_loss"]

    def sleep(self) -> dict:
        """Time-shared GPU: engines release their memory (sleep level 2: KV cache and
        weights; the update after training rewrites every weight) while the learner
        trains. Synchronous mode only, so no request is in flight."""
        slept = ray.get([e.sleep.remote(2) for e in self.engines])
        return {"sleep_ms": max(s["sleep_ms"] for s in slept),
                "released_gib": sum(s["released_bytes"] for s in slept) / 2**30}

    def wake(self) -> dict:
        woke = ray.get([e.wake_up.remote() for e in self.engines])
        return {"wake_ms": max(w["wake_ms"] for w in woke)}

    def save(self, path: Path) -> None:
        """The learner's weights (an HF directory) and optimizer; a restarted learner
        comes back from the last one saved."""
        try:
            self.learner.save(str(path))
        except ACTOR_TROUBLE as e:
            # A rank died since the last step: the learner comes back on its last checkpoint
            # (recover), and that state is what this checkpoint then holds.
            self.recover(e)
            self.learner.save(str(path))
        self.last_checkpoint = path

    def load_optimizer(self, path: str) -> int:
        return self.learner.load_optimizer(path)

    # --- the weight group -------------------------------------------------------------

    def _form_group(self) -> None:
        """Form the weight group and take the learner's plan for it (a new incarnation of
        the learner computes the same one again, same key, to resolve later tickets)."""
        cfg = self.cfg
        engines = ray.get([e.ready.remote() for e in self.engines])
        ranks = self.learner.placements()
        # Colocated engines take their weights from the learner replica on their GPU.
        replicas = min(len(ranks), len(engines)) if self.colocated and self.learner_tp == 1 else 1
        self.wire = cfg.weights.backend
        if self.wire == "auto":
            self.wire = auto_backend([ranks[i % replicas] for i in range(len(engines))], engines)
        if self.wire not in SHARED_WIRES:
            replicas = 1  # a broadcast wire has one sender
        engine_tp = cfg.engines.engine.tensor_parallel_size
        tp = [engine_tp] * len(self.engines)
        senders = per_rank_senders(self.wire, self.learner_tp, ranks, engine_tp, engines)
        # The sender (learner rank 0) serves the rendezvous, at its node's address.
        host, port = self.learner.ranks.rendezvous()
        self.group = weight_group_config(tp, self.wire, host=host, port=port, timeout_s=cfg.weights.timeout_s,
                                         senders=senders, replicas=replicas)
        members = {**{f"learner/{r}": ref for r, ref in enumerate(self.learner.join_weight_group(self.group))},
                   **{f"engine/{i}": ref for i, ref in enumerate(join_engines(self.engines, tp, self.group))}}
        _, pending = ray.wait(list(members.values()), num_returns=len(members), timeout=cfg.weights.timeout_s)
        if pending:
            late = [name for name, ref in members.items() if ref in pending]
            raise WeightGroupTimeout(f"weight group {host}:{port} ({self.wire}): {', '.join(late)} did not join "
                                     f"within weights.timeout_s={cfg.weights.timeout_s:g}")
        ray.get(list(members.values()))  # a member that failed to join raises its own error
        self.pusher = UpdatePusher(self.engines, shared=self.wire in SHARED_WIRES)
        self.plan = self.learner.weight_plan(self._bucket_bytes)

    def _send(self) -> dict:
        self.version += 1
        # Sharded (each learner TP rank sends its own shard): the engines get rank 0's request.
        req = WeightUpdateRequest(self.version, self.plan, tp_size=self.group.senders)
        # The learner computed the plan: it gets the ticket, never the plan.
        stats, send = self.pusher.push(req, lambda: self.learner.send_weights(req.ticket()))
        measured = sum(s.kv_gap_tokens for s in stats)
        return {"update_ms": max(s.total_ms for s in stats), "stall_ms": max(s.pause_ms for s in stats),
                "send_ms": send["send_ms"], "kv_recomputed_tokens": sum(s.recomputed_tokens for s in stats),
                # mean over the tokens re-scored on every engine (rlloop.actors.kv_gap)
                "kv_logprob_gap": sum(s.kv_gap_tokens * s.kv_gap_mean for s in stats if s.kv_gap_tokens) / measured
                if measured else None}

    # --- recovery ---------------------------------------------------------------------

    def recover(self, error: Exception) -> None:
        """Bring every member back, re-form the group and resend the weights."""
        self.failures += 1
        pids_before = self.learner_pids
        try:
            for attempt in range(RECOVERY_ATTEMPTS):
                print(f"[rlloop] actor failure ({type(error).__name__}: {str(error)[:200]}); recovering, "
                      f"attempt {attempt + 1}", flush=True)
                try:
                    self._regroup()
                    return
                except (*ACTOR_TROUBLE, WeightGroupTimeout) as e:  # a member still coming back
                    if attempt + 1 == RECOVERY_ATTEMPTS:
                        raise
                    error = e
        finally:
            # One failure, one restore, however many attempts it took: a retry may have to
            # restart ranks again (a survivor still stuck in the broken collective).
            self.learner_restores += self.learner_pids != pids_before

    def _regroup(self) -> None:
        deadline = time.time() + max(self.cfg.weights.timeout_s, 300)
        pids = self.learner.recover(self.learner_pids, deadline)
        for e in self.engines:
            wait_ready(e, deadline)
        if pids != self.learner_pids:
            self.learner_pids = pids
            if self.last_checkpoint is not None:
                self.restored_learner_steps = self.learner.load_checkpoint(str(self.last_checkpoint))
        ray.get(self.learner.leave_weight_group(self.group.token, self.plan.key))
        for e in self.engines:
            try:
                ray.get(e.leave_weight_group.remote(), timeout=60)
            except ACTOR_TROUBLE:
                # Its vLLM engine died with the broken transfer (EngineDeadError):
                # restart the whole actor; it comes back on its initial weights.
                ray.kill(e, no_restart=False)
                wait_ready(e, deadline)
        self._form_group()
        self._send()

    def kill(self) -> None:
        self.learner.kill()
        for e in self.engines:
            ray.kill(e)

    def shutdown(self) -> None:
        # Leaving the weight group releases its shared segments (shm, ipc wires).
        members = self.learner.leave_weight_group(self.group.token, self.plan.key)
        members += [e.leave_weight_group.remote() for e in self.engines]
        for ref in members:
            try:
                ray.get(ref, timeout=30)
            except Exception:  # already dead: it holds nothing
                pass
        for e in self.engines:
            try:
                ray.get(e.shutdown.remote(), timeout=30)
            except Exception:  # already dead: nothing left to stop
                pass
        self.learner.kill()  # and its placement on the cluster
