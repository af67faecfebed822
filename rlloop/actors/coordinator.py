"""The coordinator: places engines and the learner, forms the weight group, and runs
the GRPO loop with rollout pipelined against training.

Each step it (1) collects the rollout that was generating while the previous step
trained, (2) immediately starts the next rollout on the current weights, (3) trains
on the collected samples, and (4) pushes the new weights to every engine in flight:
the next rollout pauses for the transfer, continues on the new version, and no request
is dropped. Every sample carries the versions that produced it; samples older than
`max_lag` versions are dropped and counted.

One `seed` fixes what a run draws: the problems and SFT batches (self.rng), every
request's sampling seed (`sampling_seed`), the tiny model's init and the learner's
RNG. Synchronous runs are then reproducible; pipelined ones still depend on when an
update lands relative to each token (see README).
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from rlloop.actors.engine import EngineConfig, Sampling, engine_actor
from rlloop.actors.learner_group import LearnerGroup
from rlloop.actors.liveness import ACTOR_GONE, ACTOR_TROUBLE, wait_ready
from rlloop.actors.weight_sync import UpdatePusher, auto_backend, join_engines, weight_group_config
from rlloop.learner.grpo import group_advantages
from rlloop.learner.policy import LearnerConfig, Sample
from rlloop.metrics import report
from rlloop.run_report import plot_run, summarize, write_jsonl
from rlloop.tasks.problem import Problem
from rlloop.tasks.prompts import PromptEncoder, PromptFormat
from rlloop.tasks.rewards import resolve_reward
from rlloop.trackers import RunTrackers, hyperparameters, progress_line
from rlloop.weights.protocol import WeightUpdateError, WeightUpdateRequest
from rlloop.weights.shared import SHARED_WIRES


@dataclass(frozen=True)
class RunConfig:
    name: str
    output_dir: str
    model: str
    problems: tuple[Problem, ...]  # the training split: rollouts and SFT draw from it
    engine: EngineConfig
    learner: LearnerConfig
    engines: int = 1
    steps: int = 20
    sft_steps: int = 0
    sft_batch: int = 64
    sft_target_reward: float | None = None  # end the warm-up once a rollout's mean reward reaches it
    sft_check_every: int = 25  # SFT steps between those rollouts
    batch_prompts: int = 16
    group_size: int = 4
    max_tokens: int = 8
    reward: str = "rlloop.tasks.rewards:numeric_reward"  # module:function (completion, answer) -> float
    temperature: float = 1.0
    normalize_std: bool = True
    max_lag: int = 1
    zero_advantage: str = "drop"  # drop | keep | refill (docs/objectives.md)
    refill_rounds: int = 4  # zero_advantage=refill: extra rollouts per step at most
    pipelined: bool = True
    rollouts_ahead: int = 1  # pipelined: rollouts generating ahead of the step that trains
    sleep_while_training: bool = False  # engines sleep (GPU memory released) while the learner trains
    bucket_mb: float = 64
    backend: str = "auto"
    timeout_s: float = 120
    seed: int = 0
    learner_gpus: float = 0  # per learner rank; 1: its own GPU, 0.5: half of one (shared with an engine)
    engine_gpus: float | None = None  # per engine; None: its tensor_parallel_size
    engine_restarts: int = 3  # per engine; a restarted engine rejoins and gets the current weights
    learner_restarts: int = 3  # a restarted learner reloads the last checkpoint
    checkpoint_every: int = 0  # steps; 0: only at the end
    resume: str | None = None  # a checkpoint directory (see Coordinator._checkpoint)
    loggers: tuple[str, ...] = ("jsonl",)  # rlloop/trackers.py: jsonl (always), tensorboard, wandb, mlflow
    prompt: PromptFormat = PromptFormat()
    eval_problems: tuple[Problem, ...] = ()  # held out: scored greedily, never trained on
    eval_every: int = 10  # steps (and the last step)
    eval_max_tokens: int | None = None  # None: max_tokens
    dump_every: int = 0  # steps; rollouts/step_N.jsonl and eval/step_N.jsonl (0: never)


class Coordinator:
    def __init__(self, cfg: RunConfig):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.prompts = PromptEncoder(self.tokenizer, cfg.prompt)
        self.rng = random.Random(cfg.seed)
        self.reward = resolve_reward(cfg.reward)
        self.version = 0
        self.history: list[dict] = []
        self.dropped_stale = 0
        self.failures = 0
        self.learner_restores = 0  # failures after which the learner came back from its last checkpoint
        self.learner_came_back = False  # during a recovery: the learner was restarted
        self.restored_learner_steps: int | None = None  # optimizer steps of the checkpoint last restored
        self.requests_reissued = 0
        self.sft_checks: list[dict] = []  # sampled reward during the SFT warm-up (sft_target_reward)
        self.sft_loss: float | None = None  # of the last SFT step
        self.last_checkpoint: Path | None = None
        self.stop_requested = False
        self.phase = "starting engines and learner"  # what the run is doing before its first step

    def progress(self, since: int | None = None) -> dict:
        """Steps done and the last row; with `since`, also the rows from that step on."""
        p = {"step": len(self.history), "steps": self.cfg.steps, "phase": self.phase,
             "last": self.history[-1] if self.history else None}
        if since is not None:
            p["rows"] = self.history[since:]
        return p

    def metrics(self) -> list[dict]:
        return list(self.history)

    def stop(self) -> None:
        """Finish after the current step (checkpoint, summary, engines shut down)."""
        self.stop_requested = True

    # --- setup ------------------------------------------------------------------------

    def _start(self):
        cfg = self.cfg
        self.engines = [engine_actor(cfg.engine, name=f"{cfg.name}/engine/{i}", num_gpus=cfg.engine_gpus,
                                     max_restarts=cfg.engine_restarts) for i in range(cfg.engines)]
        self.learner = LearnerGroup(cfg.learner, cfg.name, gpus_per_rank=cfg.learner_gpus,
                                    max_restarts=cfg.learner_restarts)
        self.learner_pids = self.learner.wait_ready(time.time() + max(cfg.timeout_s, 600))
        ray.get([e.ready.remote() for e in self.engines])
        self._form_group()
        self.plan = self.learner.call("weight_plan", int(cfg.bucket_mb * 2**20))

    def _form_group(self) -> None:
        cfg = self.cfg
        self.wire = cfg.backend
        if cfg.backend == "auto":
            self.wire = auto_backend(self.learner.call("placement"), ray.get([e.ready.remote() for e in self.engines]))
        tp = [cfg.engine.tensor_parallel_size] * cfg.engines
        self.group = weight_group_config(tp, self.wire, timeout_s=cfg.timeout_s)
        joins = join_engines(self.engines, tp, self.group)
        ray.get([*self.learner.submit("join_weight_group", self.group), *joins], timeout=cfg.timeout_s)
        self.pusher = UpdatePusher(self.engines, shared=self.wire in SHARED_WIRES)

    def _recover(self, error: Exception, attempts: int = 3) -> None:
        """A member of the weight group died and Ray restarted it: an engine comes back
        on its initial weights, the learner too (it then reloads the last checkpoint).
        Wait for everyone, re-form the group and resend the learner's weights. Another
        actor may fail while this runs (an engine whose transfer broke): start over."""
        self.failures += 1
        self.learner_came_back = False
        try:
            for attempt in range(attempts):
                print(f"[rlloop] actor failure ({type(error).__name__}: {str(error)[:200]}); recovering, "
                      f"attempt {attempt + 1}", flush=True)
                try:
                    self._regroup()
                    return
                except ACTOR_TROUBLE as e:
                    if attempt + 1 == attempts:
                        raise
                    error = e
        finally:
            # One failure, one restore, however many attempts it took: a retry may have to
            # restart ranks again (a survivor still stuck in the broken collective).
            self.learner_restores += self.learner_came_back

    def _regroup(self) -> None:
        deadline = time.time() + max(self.cfg.timeout_s, 300)
        pids = self.learner.recover(self.learner_pids, deadline)
        for e in self.engines:
            wait_ready(e, deadline)
        if pids != self.learner_pids:
            self.learner_pids = pids
            self.learner_came_back = True
            # A new incarnation holds no plan: it computes the same one again (same key),
            # so that it can resolve the tickets of later updates.
            self.plan = self.learner.call("weight_plan", int(self.cfg.bucket_mb * 2**20))
            if self.last_checkpoint is not None:
                self.restored_learner_steps = self.learner.call("load_checkpoint", str(self.last_checkpoint))
        self.learner.call("leave_weight_group", self.group.token, self.plan.key)
        for e in self.engines:
            try:
                ray.get(e.leave_weight_group.remote(), timeout=60)
            except ACTOR_TROUBLE:
                # Its vLLM engine died with the broken transfer (EngineDeadError):
                # restart the whole actor; it comes back on its initial weights.
                ray.kill(e, no_restart=False)
                wait_ready(e, deadline)
        self._form_group()
        self._push(recovering=True)

    def _push(self, recovering: bool = False) -> dict:
        self.version += 1
        req = WeightUpdateRequest(self.version, self.plan)
        try:
            # The learner computed the plan: it gets the ticket, never the plan.
            stats, send = self.pusher.push(req, lambda: self.learner.call("send_weights", req.ticket()))
        except (*ACTOR_GONE, ray.exceptions.RayTaskError) as e:
            if recovering or isinstance(e, WeightUpdateError):
                raise
            self._recover(e)  # resends the current weights under a newer version
            return {"update_ms": None, "stall_ms": None, "send_ms": None}
        return {"update_ms": max(s.total_ms for s in stats), "stall_ms": max(s.pause_ms for s in stats),
                "send_ms": send["send_ms"]}

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _sft(self) -> None:
        """Supervised warm-up on the training split: sft_steps, or fewer once a rollout
        of the current weights reaches sft_target_reward (checked before the first step
        and every sft_check_every), so a model built from scratch starts GRPO earning
        reward and one that already earns it is not trained on answers at all."""
        cfg = self.cfg
        eos = self.tokenizer.eos_token_id
        for i in range(cfg.sft_steps + 1):
            if cfg.sft_target_reward is not None and (i % cfg.sft_check_every == 0 or i == cfg.sft_steps):
                if self._sampled_reward(i) >= cfg.sft_target_reward:
                    break
            if i == cfg.sft_steps:
                break
            self.phase = f"SFT warm-up {i + 1}/{cfg.sft_steps}" + (
                f" (sampled reward {self.sft_checks[-1]['reward']:.2f})" if self.sft_checks else "")
            batch = [self.rng.choice(cfg.problems) for _ in range(cfg.sft_batch)]
            self.sft_loss = self.learner.call("sft_step", [self.prompts.ids(p.prompt) for p in batch],
                                              [self._encode(p.answer) + [eos] for p in batch])["sft_loss"]

    def _sampled_reward(self, sft_step: int) -> float:
        """Mean reward of one rollout on the learner's current weights (sent first)."""
        self._push()
        # A negative step: these requests' sampling seeds differ from every GRPO step's.
        problems, _, gens, _ = self._gather(self._submit_rollout(-1 - sft_step))
        reward = self._rewards(problems, gens).mean().item()
        self.sft_checks.append({"sft_step": sft_step, "sft_loss": self.sft_loss, "reward": reward})
        loss = "-" if self.sft_loss is None else f"{self.sft_loss:.3f}"
        print(f"[rlloop] {self.cfg.name} SFT {sft_step}/{self.cfg.sft_steps}: loss {loss}, "
              f"sampled reward {reward:.3f} (target {self.cfg.sft_target_reward})", flush=True)
        return reward

    # --- rollout ----------------------------------------------------------------------

    def _submit_rollout(self, step: int, first_prompt: int = 0):
        """Start generating the next batch_prompts groups of step `step`; a further
        rollout in the same step numbers its prompts from `first_prompt` on, so every
        request of the run has its own sampling seed."""
        cfg = self.cfg
        problems = [self.rng.choice(cfg.problems) for _ in range(cfg.batch_prompts)]
        encoded = [self.prompts.ids(p.prompt) for p in problems]
        prompts = [ids for ids in encoded for _ in range(cfg.group_size)]
        seeds = [sampling_seed(cfg.seed, step, first_prompt + g, k) for g in range(cfg.batch_prompts)
                 for k in range(cfg.group_size)]
        sampling = Sampling(max_tokens=cfg.max_tokens, temperature=cfg.temperature)
        return self._dispatch(problems, prompts, sampling, seeds, cfg.group_size)

    def _dispatch(self, problems, prompts, sampling, seeds, group_size: int):
        """Whole groups to one engine, round robin; returns the pending rollout."""
        per_engine = [[] for _ in self.engines]
        for g in range(len(problems)):
            per_engine[g % len(self.engines)].append(g)
        futures = []
        for e, groups in zip(self.engines, per_engine):
            idx = [g * group_size + k for g in groups for k in range(group_size)]
            if idx:
                futures.append((e, idx, e.generate.remote([prompts[i] for i in idx], sampling,
                                                          [seeds[i] for i in idx])))
        return problems, prompts, sampling, seeds, futures, time.perf_counter()

    def _evaluate(self, step: int) -> dict:
        """Greedy decoding of every held-out problem on the current weights; the mean
        reward is eval_accuracy."""
        cfg = self.cfg
        problems = list(cfg.eval_problems)
        self.phase = f"eval on {len(problems)} held-out problems"
        prompts = [self.prompts.ids(p.prompt) for p in problems]
        greedy = Sampling(max_tokens=cfg.eval_max_tokens or cfg.max_tokens, temperature=0.0, logprobs=False)
        _, _, gens, elapsed = self._gather(self._dispatch(problems, prompts, greedy, [0] * len(problems), 1))
        rewards = [self.reward(g.text, p.answer) for p, g in zip(problems, gens)]
        if cfg.dump_every:
            write_jsonl(self.out / "eval" / f"step_{step}.jsonl", [
                {"id": p.id, "prompt": self.prompts.text(p.prompt), "completion": g.text, "answer": p.answer,
                 "reward": r, "weight_version": g.version_end} for p, g, r in zip(problems, gens, rewards)])
        self.phase = "training"
        return {"eval_accuracy": sum(rewards) / len(rewards), "eval_problems": len(problems), "eval_s": elapsed}

    def _gather(self, rollout):
        """The rollout's problems, prompts and generations (in prompt order), and its
        wall time."""
        problems, prompts, sampling, seeds, futures, t0 = rollout
        gens = [None] * len(prompts)
        for engine, idx, fut in futures:
            try:
                out = ray.get(fut)
            except ACTOR_TROUBLE as e:
                # The engine (or its vLLM core, after a broken transfer) died with these
                # requests: bring it back on the current weights and issue them again,
                # so no sample is lost. A second failure propagates.
                self._recover(e)
                self.requests_reissued += len(idx)
                out = ray.get(engine.generate.remote([prompts[i] for i in idx], sampling,
                                                     [seeds[i] for i in idx]))
            for i, g in zip(idx, out):
                gens[i] = g
        return problems, prompts, gens, time.perf_counter() - t0

    def _rewards(self, problems, gens) -> torch.Tensor:
        return torch.tensor([self.reward(g.text, problems[i // self.cfg.group_size].answer)
                             for i, g in enumerate(gens)])

    def _flat_groups(self, rewards: torch.Tensor) -> list[int]:
        """Groups whose rewards are all equal: every advantage is zero."""
        per_group = rewards.view(-1, self.cfg.group_size)
        return [k for k, r in enumerate(per_group) if r.min() == r.max()]

    def _refill(self, step: int, flat: list[int], problems, prompts, gens, rewards) -> int:
        """DAPO's dynamic sampling: the `flat` groups are replaced, in place, by groups
        of fresh rollouts on the current weights that have reward variance; at most
        `refill_rounds` extra rollouts. Returns how many were replaced."""
        size, flat, replaced = self.cfg.group_size, list(flat), 0
        for extra in range(1, self.cfg.refill_rounds + 1):
            if not flat:
                break
            more_problems, more_prompts, more_gens, _ = self._gather(
                self._submit_rollout(step, first_prompt=extra * self.cfg.batch_prompts))
            more_rewards = self._rewards(more_problems, more_gens)
            more_flat = self._flat_groups(more_rewards)
            for k in [k for k in range(len(more_problems)) if k not in more_flat]:
                if flat:
                    slot, new = flat.pop(0), slice(k * size, (k + 1) * size)
                    old = slice(slot * size, (slot + 1) * size)
                    problems[slot] = more_problems[k]
                    prompts[old], gens[old], rewards[old] = more_prompts[new], more_gens[new], more_rewards[new]
                    replaced += 1
        return replaced

    def _collect(self, rollout, step: int):
        cfg = self.cfg
        problems, prompts, gens, elapsed = self._gather(rollout)
        rewards = self._rewards(problems, gens)
        reward_mean = rewards.mean().item()  # of the rollout as sampled, before any refill
        flat = self._flat_groups(rewards)
        refilled = self._refill(step, flat, problems, prompts, gens, rewards) if cfg.zero_advantage == "refill" else 0
        adv = group_advantages(rewards, cfg.group_size, cfg.normalize_std)
        if cfg.dump_every and step % cfg.dump_every == 0:
            self._dump(step, problems, gens, rewards, adv)
        samples, lags = [], []
        for i, g in enumerate(gens):
            lag = self.version - g.version_start
            lags.append(lag)
            if lag > cfg.max_lag:
                self.dropped_stale += 1
                continue
            if g.token_ids and (adv[i] != 0 or cfg.zero_advantage == "keep"):
                samples.append(Sample(prompts[i], g.token_ids, g.logprobs, adv[i].item(),
                                      rewards[i].item(), g.version_start, g.version_end))
        tokens = sum(len(g.token_ids) for g in gens)
        return samples, {"reward_mean": reward_mean, "lag_max": max(lags),
                         "tok_s": tokens / elapsed, "rollout_s": elapsed, "samples": len(samples),
                         "dropped_stale": self.dropped_stale, "generated": len(gens),
                         "failures": self.failures, "learner_restores": self.learner_restores,
                         "requests_reissued": self.requests_reissued,
                         "completion_len": tokens / len(gens), "zero_adv_groups": len(flat),
                         "refilled_groups": refilled}

    def _dump(self, step: int, problems, gens, rewards, adv) -> None:
        """Every sample of the step as the model saw and wrote it, for a user to read."""
        size = self.cfg.group_size
        write_jsonl(self.out / "rollouts" / f"step_{step}.jsonl", [
            {"id": problems[i // size].id, "prompt": self.prompts.text(problems[i // size].prompt),
             "completion": g.text, "answer": problems[i // size].answer, "reward": rewards[i].item(),
             "advantage": adv[i].item(), "version_start": g.version_start, "version_end": g.version_end}
            for i, g in enumerate(gens)])

    # --- loop -------------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        self._start()
        first_step = self._restore() if cfg.resume else 0
        if not cfg.resume:
            self._sft()
        self.phase = "sending the first weights"
        self._push()  # engines now serve the learner's weights
        self.phase = "training"
        trackers = RunTrackers(cfg.loggers, cfg.output_dir, cfg.name, hyperparameters(cfg))
        for row in self.history:  # a resumed run's curve continues the old one
            trackers.log(row)
        try:
            self._steps(first_step, trackers, t_start)
        except BaseException:
            trackers.close(failed=True)  # W&B and MLflow show the run as failed, not running
            raise
        summary = self._summary(time.perf_counter() - t_start)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        plot_run(self.history, cfg.name, self.out / "reward.png")
        trackers.close(plot=self.out / "reward.png")
        return summary

    def _steps(self, first_step: int, trackers: RunTrackers, t_start: float) -> None:
        cfg = self.cfg
        ahead = cfg.rollouts_ahead if cfg.pipelined else 0
        pending = deque([self._submit_rollout(first_step)])
        for step in range(first_step, cfg.steps):
            last = step + 1 == cfg.steps or self.stop_requested
            if not pending:  # synchronous: generate, then train
                pending.append(self._submit_rollout(step))
            samples, roll = self._collect(pending.popleft(), step)
            # The next `ahead` steps' rollouts generate while this one trains and updates;
            # a rollout submitted k steps ahead is sampled k versions behind the learner.
            while not last and len(pending) < ahead and step + 1 + len(pending) < cfg.steps:
                pending.append(self._submit_rollout(step + 1 + len(pending)))
            slept = self._sleep_engines() if cfg.sleep_while_training else {}
            train = self._train(samples) if samples else {}
            woke = self._wake_engines() if cfg.sleep_while_training else {}
            upd = self._push()
            scored = (self._evaluate(step) if cfg.eval_problems and (step % cfg.eval_every == 0 or last)
                      else {})
            row = {"step": step, "weight_version": self.version, **roll, **train, **slept, **woke, **upd,
                   **scored, "time_s": time.perf_counter() - t_start}
            self.history.append(row)
            report(weight_version=self.version, reward=row["reward_mean"], lag_max=row["lag_max"],
                   tok_s=row["tok_s"], loss=row.get("loss"), kl=row.get("kl_behaviour"),
                   clip_frac=row.get("clip_frac"), dropped_stale=self.dropped_stale,
                   eval_accuracy=row.get("eval_accuracy"))
            trackers.log(row)
            print(progress_line(cfg.name, row, cfg.steps), flush=True)  # to this actor's log (dashboard)
            if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or last:
                self._checkpoint(step)
            if last:
                break

    def _sleep_engines(self) -> dict:
        """Time-shared GPU: engines release their memory (sleep level 2: KV cache and
        weights; the update after training rewrites every weight) while the learner
        trains. Synchronous mode only, so no request is in flight."""
        slept = ray.get([e.sleep.remote(2) for e in self.engines])
        return {"sleep_ms": max(s["sleep_ms"] for s in slept),
                "released_gib": sum(s["released_bytes"] for s in slept) / 2**30}

    def _wake_engines(self) -> dict:
        woke = ray.get([e.wake_up.remote() for e in self.engines])
        return {"wake_ms": max(w["wake_ms"] for w in woke)}

    def _train(self, samples) -> dict:
        try:
            return self.learner.call("train_step", samples)
        except ACTOR_TROUBLE as e:
            # A rank died, or a survivor's collective failed with it: the learner comes
            # back on its last checkpoint. A second failure propagates.
            self._recover(e)
            return self.learner.call("train_step", samples)

    # --- checkpoints ------------------------------------------------------------------

    def _checkpoint(self, step: int) -> Path:
        """HF safetensors policy + tokenizer (a directory engines can start from),
        optimizer state, and the run state needed to continue the curve."""
        path = self.out / "checkpoints" / f"step_{step + 1:06d}"
        self.phase = f"writing checkpoint {path.name}"
        path.mkdir(parents=True, exist_ok=True)
        self.learner.call("save", str(path))
        self.tokenizer.save_pretrained(path)
        self.last_checkpoint = path
        state = {"step": step, "version": self.version, "dropped_stale": self.dropped_stale,
                 "rng": self.rng.getstate(), "history": self.history}
        (path / "run_state.json").write_text(json.dumps(state))
        self.phase = "training"
        return path

    def _restore(self) -> int:
        """Continue from checkpoint `cfg.resume` (engines and learner were started from
        its weights); returns the first step to run."""
        state = json.loads((Path(self.cfg.resume) / "run_state.json").read_text())
        self.learner.call("load_optimizer", self.cfg.resume)
        self.version = state["version"]
        self.dropped_stale = state["dropped_stale"]
        self.rng.setstate((state["rng"][0], tuple(state["rng"][1]), state["rng"][2]))
        self.history = state["history"]
        return state["step"] + 1

    def _summary(self, wall_s: float) -> dict:
        return {"name": self.cfg.name, **summarize(self.history), "wall_s": wall_s,
                "weight_version": self.version, "weights_backend": self.wire, "dropped_stale": self.dropped_stale,
                "failures": self.failures, "learner_restores": self.learner_restores,
                "restored_learner_steps": self.restored_learner_steps,
                "requests_reissued": self.requests_reissued, "sft_checks": self.sft_checks,
                "output_dir": str(self.out)}

    def shutdown(self) -> None:
        # Leaving the weight group releases its shared segments (shm, ipc wires).
        region = (self.group.token, self.plan.key) if hasattr(self, "plan") else ()
        members = self.learner.submit("leave_weight_group", *region) if hasattr(self, "learner") else []
        members += [e.leave_weight_group.remote() for e in getattr(self, "engines", [])]
        for ref in members:
            try:
                ray.get(ref, timeout=30)
            except Exception:  # already dead: it holds nothing
                pass
        for e in getattr(self, "engines", []):
            try:
                ray.get(e.shutdown.remote(), timeout=30)
            except Exception:  # already dead: nothing left to stop
                pass


def sampling_seed(seed: int, step: int, prompt: int, sample: int) -> int:
    """The vLLM sampling seed of sample `sample` of prompt `prompt` in step `step`:
    a request issued again (after an engine failure) draws the same tokens, and no
    two requests of a run share a seed."""
    key = f"{seed}/{step}/{prompt}/{sample}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1  # int64
