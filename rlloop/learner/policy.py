"""What every learner shares: the batch layout, the SFT warm-up step and the GRPO
step. A backend (transformers in hf_learner.py, megatron-core in megatron_learner.py)
supplies the model, per-token log-probs and the optimizer step.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass

import torch


@dataclass
class Sample:
    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: list[float]
    advantage: float
    reward: float
    version_start: int
    version_end: int


@dataclass(frozen=True)
class LearnerConfig:
    model: str
    lr: float = 1e-4
    sft_lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    clip_eps: float = 0.2
    aggregation: str = "token-mean"
    kl_coef: float = 0.0
    tis_cap: float | None = None
    seed: int = 0
    num_threads: int = 1
    pad_id: int = 1
    device: str = "auto"  # auto: cuda when the actor was given a GPU, else cpu
    dtype: str = "float32"  # parameters (and, on CPU, optimizer state); bfloat16 on GPU
    backend: str = "hf"  # hf: transformers, one process | megatron: megatron-core, TP x DP ranks
    tensor_parallel_size: int = 1  # megatron only
    data_parallel_size: int = 1  # megatron only
    micro_batch_size: int = 0  # samples per forward/backward (gradients accumulate); 0: all at once
    # "module:function" with grpo_loss's signature: (logp, behaviour_logp, advantages,
    # mask, clip_eps, aggregation, ref_logp, kl_coef, tis_cap) -> (loss, metrics)
    loss: str = "rlloop.learner.grpo:grpo_loss"


def resolve_loss(spec: str):
    """The policy loss named "module:function"."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"loss {spec!r} is not an importable module:function ({e})") from e


def pack_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device):
    """Right-padded input ids and the completion-token mask that lines up with the
    shifted log-probs ([N, T-1]). Causal attention never sees the right padding."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    comp = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        comp[i, len(p) - 1:len(s) - 1] = True
    return ids.to(device), comp.to(device)


class PolicyLearner:
    """Subclasses set self.cfg, self.device, self.steps and implement the hooks below."""

    cfg: LearnerConfig
    device: torch.device
    steps: int
    sender = None  # a WeightSender on the rank that broadcasts to the engines

    def token_logprobs(self, ids: torch.Tensor, reference: bool = False):
        """(log-prob of each next token [N, T-1] with grad, entropy [N, T-1] without)."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    def step(self, lr: float) -> float:
        """Clip and apply the accumulated gradients at `lr`; the norm before clipping."""
        raise NotImplementedError

    def my_share(self, items: list) -> list:
        """This rank's part of a batch (data parallelism); everything on one rank."""
        return items

    def replica_mean(self, value: float) -> float:
        """A metric averaged over data-parallel ranks; one rank: itself."""
        return value

    def _micro_batches(self, n: int) -> list[slice]:
        size = self.cfg.micro_batch_size or n
        return [slice(i, i + size) for i in range(0, n, size)]

    def sft_step(self, prompts: list[list[int]], targets: list[list[int]]) -> dict:
        """One supervised step on prompt -> target (warm-up before RL)."""
        prompts, targets = self.my_share(prompts), self.my_share(targets)
        total = sum(map(len, targets))
        self.zero_grad()
        loss_sum = 0.0
        for mb in self._micro_batches(len(prompts)):
            ids, comp = pack_batch(prompts[mb], targets[mb], self.cfg.pad_id, self.device)
            tok, _ = self.token_logprobs(ids)
            loss = -(tok * comp).sum() / total
            loss.backward()
            loss_sum += loss.item()
        self.step(self.cfg.sft_lr)
        return {"sft_loss": self.replica_mean(loss_sum)}

    def train_step(self, samples: list[Sample]) -> dict:
        """One GRPO optimizer step over `samples` (advantages already computed), in
        micro-batches whose losses add up to the loss of the whole batch."""
        t0 = time.perf_counter()
        samples = self.my_share(samples)
        total_tokens = sum(len(s.completion_ids) for s in samples)
        loss_fn = resolve_loss(self.cfg.loss)
        self.zero_grad()
        sums: dict[str, float] = {}
        for mb in self._micro_batches(len(samples)):
            part = samples[mb]
            ids, comp = pack_batch([s.prompt_ids for s in part], [s.completion_ids for s in part],
                                   self.cfg.pad_id, self.device)
            behaviour = torch.zeros(comp.shape)
            comp_cpu = comp.cpu()
            for i, s in enumerate(part):
                behaviour[i][comp_cpu[i]] = torch.tensor(s.behaviour_logprobs, dtype=behaviour.dtype)
            behaviour = behaviour.to(self.device)
            adv = torch.tensor([s.advantage for s in part], device=self.device)
            logp, entropy = self.token_logprobs(ids)
            ref_logp = None
            if self.cfg.kl_coef > 0:
                with torch.no_grad():
                    ref_logp, _ = self.token_logprobs(ids, reference=True)
            loss, metrics = loss_fn(logp, behaviour, adv, comp, self.cfg.clip_eps, self.cfg.aggregation,
                                    ref_logp, self.cfg.kl_coef, self.cfg.tis_cap)
            # This micro-batch's share of the whole batch's mean (tokens or sequences).
            n_tok = comp.sum().item()
            weight = n_tok / total_tokens if self.cfg.aggregation == "token-mean" else len(part) / len(samples)
            (loss * weight).backward()
            metrics.update(loss=loss.item(), entropy=((entropy * comp).sum() / max(n_tok, 1)).item())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * weight
        grad_norm = self.step(self.cfg.lr)
        self.steps += 1
        return {**{k: self.replica_mean(v) for k, v in sums.items()}, "grad_norm": grad_norm,
                "train_ms": (time.perf_counter() - t0) * 1e3}

    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        """The policy's log-prob of each completion token (no training)."""
        with torch.no_grad():
            ids, comp = pack_batch(prompts, completions, self.cfg.pad_id, self.device)
            tok, _ = self.token_logprobs(ids)
        return [tok[i][comp[i]].tolist() for i in range(len(prompts))]

    def leave_weight_group(self) -> None:
        if self.sender is not None:
            try:
                self.sender.close()
            except Exception:  # a group broken by a dead member may not close cleanly
                pass
            self.sender = None

    def ready(self) -> int:
        """This incarnation's pid: a restarted learner answers with a new one."""
        import os

        return os.getpid()
