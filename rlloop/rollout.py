"""The rollout: problems in, a frozen `RolloutBatch` of trainable samples out.

`Rollouts` draws batch_prompts problems (seeded), sends each group of group_size
samples to one engine (round robin), scores every completion with the reward, turns
rewards into group advantages, drops samples begun more than max_lag versions ago,
and treats groups whose rewards are all equal as `zero_advantage` says (drop, keep,
or refill them with fresh rollouts: DAPO's dynamic sampling). It also scores the
held-out split greedily (`evaluate`) and draws the SFT warm-up's batches, so that a
run's data comes from one seeded source.

`rollout.function` names what builds the source ("module:function" or a class, called
as `function(cfg, fleet, tokenizer)`); this class is the default, and a subclass may
change one step of it (tests/user_plugins.py draws problems in order).
"""
from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Protocol

import ray
import torch

from rlloop.actors.engine_io import Generation, Sampling
from rlloop.actors.liveness import ACTOR_TROUBLE
from rlloop.learner.grpo import group_advantages
from rlloop.learner.policy import Sample
from rlloop.run_config import RunConfig
from rlloop.plugins import import_function
from rlloop.run_report import write_jsonl
from rlloop.tasks.problem import Problem
from rlloop.tasks.prompts import PromptEncoder
from rlloop.tasks.rewards import resolve_reward


@dataclass(frozen=True)
class RolloutBatch:
    step: int
    samples: tuple[Sample, ...]  # what the learner trains on
    metrics: Mapping[str, float]  # reward_mean, lag_max, tok_s, ... (a row of metrics.jsonl)


@dataclass(frozen=True)
class Pending:
    """Requests generating on the engines: whole groups per engine."""
    problems: list[Problem]
    prompts: list[list[int]]  # one per request: each problem's ids group_size times
    sampling: Sampling
    seeds: list[int]
    futures: list[tuple[object, list[int], ray.ObjectRef]]  # (engine, request indices, generations)
    started: float


class RolloutSource(Protocol):
    """What the coordinator's loop asks of a rollout (Rollouts is one)."""

    def submit(self, step: int) -> Pending: ...

    def collect(self, pending: Pending, step: int) -> RolloutBatch: ...

    def evaluate(self, step: int) -> dict: ...

    def sampled_reward(self, sft_step: int) -> float: ...

    def sft_batch(self, n: int) -> tuple[list[list[int]], list[list[int]]]: ...

    def state(self) -> dict: ...

    def restore(self, state: dict) -> None: ...


class Rollouts:
    def __init__(self, cfg: RunConfig, fleet, tokenizer):
        self.cfg, self.fleet = cfg.rollout, fleet
        self.prompts = PromptEncoder(tokenizer, cfg.rollout.prompt)
        self.eval_cfg = cfg.eval
        self.out = Path(cfg.output_dir)
        self.seed = cfg.seed
        self.rng = random.Random(cfg.seed)
        self.reward = resolve_reward(self.cfg.reward)
        self.dropped_stale = 0
        self.requests_reissued = 0

    # --- what the loop calls ----------------------------------------------------------

    def submit(self, step: int, first_prompt: int = 0) -> Pending:
        """Start generating the next batch_prompts groups of step `step`; a further
        rollout in the same step numbers its prompts from `first_prompt` on, so every
        request of the run has its own sampling seed."""
        cfg = self.cfg
        problems = self.draw(cfg.batch_prompts)
        encoded = [self.prompts.ids(p.prompt) for p in problems]
        prompts = [ids for ids in encoded for _ in range(cfg.group_size)]
        seeds = [sampling_seed(self.seed, step, first_prompt + g, k) for g in range(cfg.batch_prompts)
                 for k in range(cfg.group_size)]
        return self._dispatch(problems, prompts, Sampling(max_tokens=cfg.max_tokens, temperature=cfg.temperature),
                              seeds, cfg.group_size)

    def collect(self, pending: Pending, step: int) -> RolloutBatch:
        cfg = self.cfg
        gens, elapsed = self._gather(pending)
        problems, prompts = list(pending.problems), list(pending.prompts)
        rewards = self._rewards(problems, gens)
        reward_mean = rewards.mean().item()  # of the rollout as sampled, before any refill
        flat = self._flat_groups(rewards)
        refilled = self._refill(step, flat, problems, prompts, gens, rewards) if cfg.zero_advantage == "refill" else 0
        adv = group_advantages(rewards, cfg.group_size, cfg.normalize_std)
        if cfg.dump_every and step % cfg.dump_every == 0:
            self._dump(step, problems, gens, rewards, adv)
        samples, lags = [], []
        for i, g in enumerate(gens):
            lag = self.fleet.version - g.version_start
            lags.append(lag)
            if lag > cfg.max_lag:
                self.dropped_stale += 1
                continue
            if g.token_ids and (adv[i] != 0 or cfg.zero_advantage == "keep"):
                samples.append(Sample(prompts[i], g.token_ids, g.logprobs, adv[i].item(), rewards[i].item(),
                                      g.version_start, g.version_end,
                                      None if g.loss_mask is None else tuple(g.loss_mask)))
        tokens = sum(len(g.token_ids) for g in gens)
        metrics = {"reward_mean": reward_mean, "lag_max": max(lags), "tok_s": tokens / elapsed,
                   "rollout_s": elapsed, "samples": len(samples), "dropped_stale": self.dropped_stale,
                   "generated": len(gens), "requests_reissued": self.requests_reissued,
                   "completion_len": tokens / len(gens), "zero_adv_groups": len(flat), "refilled_groups": refilled}
        return RolloutBatch(step, tuple(samples), MappingProxyType(metrics))

    def evaluate(self, step: int) -> dict:
        """Greedy decoding of every held-out problem on the current weights; the mean
        reward is eval_accuracy."""
        problems = list(self.eval_cfg.problems)
        prompts = [self.prompts.ids(p.prompt) for p in problems]
        greedy = Sampling(max_tokens=self.eval_cfg.max_tokens, temperature=0.0, logprobs=False)
        gens, elapsed = self._gather(self._dispatch(problems, prompts, greedy, [0] * len(problems), 1))
        rewards = [self.reward(g.text, p.answer) for p, g in zip(problems, gens)]
        if self.cfg.dump_every:
            write_jsonl(self.out / "eval" / f"step_{step}.jsonl", [
                {"id": p.id, "prompt": self.prompts.text(p.prompt), "completion": g.text, "answer": p.answer,
                 "reward": r, "weight_version": g.version_end} for p, g, r in zip(problems, gens, rewards)])
        return {"eval_accuracy": sum(rewards) / len(rewards), "eval_problems": len(problems), "eval_s": elapsed}

    def sampled_reward(self, sft_step: int) -> float:
        """Mean reward of one rollout on the weights the engines serve."""
        # A negative step: these requests' sampling seeds differ from every GRPO step's.
        pending = self.submit(-1 - sft_step)
        gens, _ = self._gather(pending)
        return self._rewards(pending.problems, gens).mean().item()

    def sft_batch(self, n: int) -> tuple[list[list[int]], list[list[int]]]:
        """Prompt ids and answer ids (+ end of sequence) of n training problems."""
        eos = self.prompts.tokenizer.eos_token_id
        batch = self.draw(n)
        target = import_function(self.cfg.demonstration, "demonstration") if self.cfg.demonstration else (
            lambda question, answer: answer)
        return ([self.prompts.ids(p.prompt) for p in batch],
                [self.prompts.tokenizer(target(p.prompt, p.answer), add_special_tokens=False).input_ids + [eos]
                 for p in batch])

    def state(self) -> dict:
        """What a checkpoint keeps so that a resumed run draws what it would have."""
        return {"rng": self.rng.getstate(), "dropped_stale": self.dropped_stale}

    def restore(self, state: dict) -> None:
        self.rng.setstate((state["rng"][0], tuple(state["rng"][1]), state["rng"][2]))
        self.dropped_stale = state["dropped_stale"]

    # --- steps a subclass may change --------------------------------------------------

    def draw(self, n: int) -> list[Problem]:
        """n training problems, drawn with replacement (seeded)."""
        return [self.rng.choice(self.cfg.problems) for _ in range(n)]

    def _rewards(self, problems: list[Problem], gens: list[Generation]) -> torch.Tensor:
        return torch.tensor([self.reward(g.text, problems[i // self.cfg.group_size].answer)
                             for i, g in enumerate(gens)])

    # --- internals --------------------------------------------------------------------

    def _dispatch(self, problems, prompts, sampling: Sampling, seeds, group_size: int) -> Pending:
        """Whole groups to one engine, round robin."""
        engines = self.fleet.engines
        per_engine = [[] for _ in engines]
        for g in range(len(problems)):
            per_engine[g % len(engines)].append(g)
        futures = []
        for e, groups in zip(engines, per_engine):
            idx = [g * group_size + k for g in groups for k in range(group_size)]
            if idx:
                futures.append((e, idx, self._request(e, [prompts[i] for i in idx], sampling, [seeds[i] for i in idx],
                                                      [problems[i // group_size] for i in idx])))
        return Pending(problems, prompts, sampling, seeds, futures, time.perf_counter())

    def _request(self, engine, prompts, sampling: Sampling, seeds, problems) -> ray.ObjectRef:
        """One engine's requests: single completions, or rollout.agent's episodes (each
        agent sees its problem)."""
        if self.cfg.agent:
            return engine.episodes.remote(prompts, sampling, seeds, self.cfg.agent, self.cfg.max_turns, problems)
        return engine.generate.remote(prompts, sampling, seeds)

    def _gather(self, pending: Pending) -> tuple[list[Generation], float]:
        """The generations, in request order, and the rollout's wall time."""
        gens = [None] * len(pending.prompts)
        for engine, idx, fut in pending.futures:
            try:
                out = ray.get(fut)
            except ACTOR_TROUBLE as e:
                # The engine (or its vLLM core, after a broken transfer) died with these
                # requests: bring it back on the current weights and issue them again
                # with the same seeds, so no sample is lost. A second failure propagates.
                self.fleet.recover(e)
                self.requests_reissued += len(idx)
                size = len(pending.prompts) // len(pending.problems)
                out = ray.get(self._request(engine, [pending.prompts[i] for i in idx], pending.sampling,
                                            [pending.seeds[i] for i in idx], [pending.problems[i // size] for i in idx]))
            for i, g in zip(idx, out):
                gens[i] = g
        return gens, time.perf_counter() - pending.started

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
            more = self.submit(step, first_prompt=extra * self.cfg.batch_prompts)
            more_gens, _ = self._gather(more)
            more_rewards = self._rewards(more.problems, more_gens)
            more_flat = self._flat_groups(more_rewards)
            for k in [k for k in range(len(more.problems)) if k not in more_flat]:
                if flat:
                    slot, new = flat.pop(0), slice(k * size, (k + 1) * size)
                    old = slice(slot * size, (slot + 1) * size)
                    problems[slot] = more.problems[k]
                    prompts[old], gens[old], rewards[old] = more.prompts[new], more_gens[new], more_rewards[new]
                    replaced += 1
        return replaced

    def _dump(self, step: int, problems, gens, rewards, adv) -> None:
        """Every sample of the step as the model saw and wrote it, for a user to read."""
        size = self.cfg.group_size
        write_jsonl(self.out / "rollouts" / f"step_{step}.jsonl", [
            {"id": problems[i // size].id, "prompt": self.prompts.text(problems[i // size].prompt),
             "completion": g.text, "answer": problems[i // size].answer, "reward": rewards[i].item(),
             "advantage": adv[i].item(), "version_start": g.version_start, "version_end": g.version_end,
             **({"conversation": [{"role": t["role"], "content": t["content"]} for t in g.conversation]}
                if g.conversation else {})}
            for i, g in enumerate(gens)])


def sampling_seed(seed: int, step: int, prompt: int, sample: int) -> int:
    """The vLLM sampling seed of sample `sample` of prompt `prompt` in step `step`:
    a request issued again (after an engine failure) draws the same tokens, and no
    two requests of a run share a seed."""
    key = f"{seed}/{step}/{prompt}/{sample}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1  # int64
