"""The coordinator: runs the GRPO loop over a fleet (engines, learner, weight group)
and a rollout source, with rollout pipelined against training.

Each step it (1) collects the rollout that was generating while the previous step
trained, (2) immediately starts the next rollout on the current weights, (3) trains
on the collected samples, and (4) pushes the new weights to every engine in flight:
the next rollout pauses for the transfer, continues on the new version, and no request
is dropped. Recovery from a lost engine or learner rank lives in the fleet.

One `seed` fixes what a run draws: the problems and SFT batches and every request's
sampling seed (the rollout source), the tiny model's init and the learner's RNG.
Synchronous runs are then reproducible; pipelined ones still depend on when an update
lands relative to each token (see README).
"""
from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path

from rlloop.actors.fleet import Fleet
from rlloop.metrics import report
from rlloop.plugins import import_function
from rlloop.run_config import RunConfig
from rlloop.run_report import write_run_report
from rlloop.trackers import RunTrackers, hyperparameters, progress_line


class Coordinator:
    def __init__(self, cfg: RunConfig):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.history: list[dict] = []
        self.sft_checks: list[dict] = []  # sampled reward during the SFT warm-up (sft_target_reward)
        self.sft_loss: float | None = None  # of the last SFT step
        self.stop_requested = False
        self.phase = "starting engines and learner"  # what the run is doing before its first step
        self.endpoint = None  # server.enabled: the run's OpenAI routes and control plane

    def progress(self, since: int | None = None) -> dict:
        """Steps done and the last row; with `since`, also the rows from that step on."""
        p = {"step": len(self.history), "steps": self.cfg.trainer.steps, "phase": self.phase,
             "last": self.history[-1] if self.history else None}
        if since is not None:
            p["rows"] = self.history[since:]
        return p

    def metrics(self) -> list[dict]:
        return list(self.history)

    def stop(self) -> None:
        """Finish after the current step (checkpoint, summary, engines shut down)."""
        self.stop_requested = True

    # --- the run ----------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        self.fleet = Fleet(cfg)
        self.rollouts = import_function(cfg.rollout.function, "rollout function")(cfg, self.fleet, self.tokenizer)
        first_step = self._restore() if cfg.resume else 0
        if not cfg.resume:
            self._sft()
        self.phase = "sending the first weights"
        self.fleet.push()  # engines now serve the learner's weights
        if cfg.server.enabled:  # outside clients sample the live policy (rlloop/serving/)
            from rlloop.serving.endpoint import Endpoint

            self.endpoint = Endpoint(self.fleet.engines, cfg.server, cfg.model, self.out, allow_swap=False)
            print(f"[rlloop] {cfg.name}: OpenAI routes at {self.endpoint.url}/v1", flush=True)
        self.phase = "training"
        trackers = RunTrackers(cfg.trainer.loggers, cfg.output_dir, cfg.name, hyperparameters(cfg))
        for row in self.history:  # a resumed run's curve continues the old one
            trackers.log(row)
        try:
            self._steps(first_step, trackers, t_start)
        except BaseException:
            trackers.close(failed=True)  # W&B and MLflow show the run as failed, not running
            raise
        summary = write_run_report(self.history, cfg.name, self.out, {
            "wall_s": time.perf_counter() - t_start, "weight_version": self.fleet.version,
            "dropped_stale": self.rollouts.dropped_stale,
            **self.fleet.counters(), "restored_learner_steps": self.fleet.restored_learner_steps,
            "requests_reissued": self.rollouts.requests_reissued, "sft_checks": self.sft_checks,
            "placement": self.fleet.nodes(), "gpus": self.fleet.nodes("gpus"),
            "weight_group": self.fleet.weight_group()})
        trackers.close(plot=self.out / "reward.png")
        return summary

    def _sft(self) -> None:
        """Supervised warm-up on the training split: sft_steps, or fewer once a rollout
        of the current weights reaches sft_target_reward (checked before the first step
        and every sft_check_every), so a model built from scratch starts GRPO earning
        reward and one that already earns it is not trained on answers at all."""
        t = self.cfg.trainer
        for i in range(t.sft_steps + 1):
            if t.sft_target_reward is not None and (i % t.sft_check_every == 0 or i == t.sft_steps):
                if self._sampled_reward(i) >= t.sft_target_reward:
                    break
            if i == t.sft_steps:
                break
            self.phase = f"SFT warm-up {i + 1}/{t.sft_steps}" + (
                f" (sampled reward {self.sft_checks[-1]['reward']:.2f})" if self.sft_checks else "")
            self.sft_loss = self.fleet.sft_step(*self.rollouts.sft_batch(t.sft_batch))

    def _sampled_reward(self, sft_step: int) -> float:
        """Mean reward of one rollout on the learner's current weights (sent first)."""
        self.fleet.push()
        reward = self.rollouts.sampled_reward(sft_step)
        self.sft_checks.append({"sft_step": sft_step, "sft_loss": self.sft_loss, "reward": reward})
        loss = "-" if self.sft_loss is None else f"{self.sft_loss:.3f}"
        print(f"[rlloop] {self.cfg.name} SFT {sft_step}/{self.cfg.trainer.sft_steps}: loss {loss}, "
              f"sampled reward {reward:.3f} (target {self.cfg.trainer.sft_target_reward})", flush=True)
        return reward

    def _steps(self, first_step: int, trackers: RunTrackers, t_start: float) -> None:
        t = self.cfg.trainer
        fleet, rollouts = self.fleet, self.rollouts
        ahead = t.rollouts_ahead if t.pipelined else 0
        pending = deque([rollouts.submit(first_step)])
        for step in range(first_step, t.steps):
            last = step + 1 == t.steps or self.stop_requested
            if not pending:  # synchronous: generate, then train
                pending.append(rollouts.submit(step))
            batch = rollouts.collect(pending.popleft(), step)
            # The next `ahead` steps' rollouts generate while this one trains and updates;
            # a rollout submitted k steps ahead is sampled k versions behind the learner.
            while not last and len(pending) < ahead and step + 1 + len(pending) < t.steps:
                pending.append(rollouts.submit(step + 1 + len(pending)))
            slept = fleet.sleep() if self.cfg.engines.sleep_while_training else {}
            train = fleet.train(list(batch.samples)) if batch.samples else {}
            woke = fleet.wake() if self.cfg.engines.sleep_while_training else {}
            update = fleet.push()
            if self.endpoint is not None and fleet.failures:
                self.endpoint.refresh()  # an engine Ray restarted serves again
            scored = self._evaluate(step) if self._eval_due(step, last) else {}
            row = {"step": step, "weight_version": fleet.version, **batch.metrics, **fleet.counters(),
                   **train, **slept, **woke, **update, **scored, "time_s": time.perf_counter() - t_start}
            self.history.append(row)
            report(weight_version=fleet.version, reward=row["reward_mean"], lag_max=row["lag_max"],
                   tok_s=row["tok_s"], loss=row.get("loss"), kl=row.get("kl_behaviour"),
                   clip_frac=row.get("clip_frac"), dropped_stale=row["dropped_stale"],
                   eval_accuracy=row.get("eval_accuracy"))
            trackers.log(row)
            print(progress_line(self.cfg.name, row, t.steps), flush=True)  # to this actor's log (dashboard)
            if (t.checkpoint_every and (step + 1) % t.checkpoint_every == 0) or last:
                self._checkpoint(step)
            if last:
                break

    def _eval_due(self, step: int, last: bool) -> bool:
        return bool(self.cfg.eval.problems) and (step % self.cfg.eval.every == 0 or last)

    def _evaluate(self, step: int) -> dict:
        self.phase = f"eval on {len(self.cfg.eval.problems)} held-out problems"
        scored = self.rollouts.evaluate(step)
        self.phase = "training"
        return scored

    # --- checkpoints ------------------------------------------------------------------

    def _checkpoint(self, step: int) -> Path:
        """HF safetensors policy + tokenizer (a directory engines can start from),
        optimizer state, and the run state needed to continue the curve."""
        path = self.out / "checkpoints" / f"step_{step + 1:06d}"
        self.phase = f"writing checkpoint {path.name}"
        path.mkdir(parents=True, exist_ok=True)
        self.fleet.save(path)
        self.tokenizer.save_pretrained(path)
        state = {"step": step, "version": self.fleet.version, "rollout": self.rollouts.state(),
                 "history": self.history}
        (path / "run_state.json").write_text(json.dumps(state))
        self.phase = "training"
        return path

    def _restore(self) -> int:
        """Continue from checkpoint `cfg.resume` (engines and learner were started from
        its weights); returns the first step to run."""
        state = json.loads((Path(self.cfg.resume) / "run_state.json").read_text())
        self.fleet.load_optimizer(self.cfg.resume)
        self.fleet.version = state["version"]
        self.rollouts.restore(state["rollout"])
        self.history = state["history"]
        return state["step"] + 1

    def shutdown(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
        if hasattr(self, "fleet"):
            self.fleet.shutdown()
