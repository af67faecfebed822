"""What every learner shares: the batch layout, the SFT warm-up step and the GRPO
step. A backend (transformers in hf_learner.py, megatron-core in megatron_learner.py)
supplies the model, per-token log-probs and the optimizer step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlloop.learner.grpo import LossInputs, Objective, token_weights, truncated_is
from rlloop.defaults import default
from rlloop.metrics import report
from rlloop.plugins import import_function


@dataclass
class Sample:
    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: list[float]
    advantage: float
    reward: float
    version_start: int
    version_end: int
    # per completion token: False where a tool or the environment wrote it (no loss);
    # None: the model wrote every token
    loss_mask: tuple[bool, ...] | None = None


ATTENTIONS = ("auto", "sdpa", "local", "te")  # megatron's core attention (attention.py)
RECOMPUTE = ("none", "selective", "full")  # megatron's activation recomputation


@dataclass(frozen=True)
class LearnerConfig:
    model: str
    lr: float = default("learner.lr")
    sft_lr: float = default("learner.sft_lr")
    weight_decay: float = 0.0
    max_grad_norm: float = default("learner.max_grad_norm")
    objective: Objective = Objective()
    # optimizer steps per batch (PPO mini-batches); the anchor stays fixed
    ppo_mini_batches: int = default("learner.ppo_mini_batches")
    seed: int = default("seed")
    num_threads: int = 1
    pad_id: int = 1
    device: str = "auto"  # auto: cuda when the actor was given a GPU, else cpu
    dtype: str = default("learner.dtype")  # parameters (and, on CPU, optimizer state); bfloat16 on GPU
    backend: str = default("learner.backend")  # hf: transformers, one process | megatron: TP x DP ranks
    tensor_parallel_size: int = default("learner.tensor_parallel_size")  # megatron only
    data_parallel_size: int = default("learner.data_parallel_size")  # megatron only
    # samples per forward/backward (gradients accumulate); 0: all at once
    micro_batch_size: int = default("learner.micro_batch_size")
    # > 0: micro-batches of length-sorted samples whose padded size (samples x longest)
    # stays within this many tokens; replaces micro_batch_size
    max_tokens_per_micro_batch: int = default("learner.max_tokens_per_micro_batch")
    attention: str = default("learner.attention")  # megatron: auto | sdpa | local | te (attention.py)
    recompute: str = default("learner.recompute")  # megatron on GPU: none | selective | full activations
    fp32_grads: bool = default("learner.fp32_grads")  # megatron on GPU: accumulate gradients in fp32
    # megatron on GPU: the share (0-1) of fp32 masters and Adam moments kept and stepped on the CPU
    optimizer_offload: float = default("learner.optimizer_offload")
    peak_tflops: float | None = default("learner.peak_tflops")  # MFU's denominator; null: by device name
    # "module:function" with policy_loss's signature: (LossInputs, Objective) -> (loss, metrics)
    loss: str = default("learner.loss")
    gpus: float = default("learner.gpus")  # per rank; 1: its own GPU, 0.5: half of one (shared with an engine)
    max_restarts: int = default("learner.max_restarts")  # a restarted learner reloads the last checkpoint
    node_resource: str | None = default("learner.node_resource")  # only nodes with this custom resource
    # glob patterns of HF tensor names not trained (and not sent: the update plan is partial)
    freeze: tuple[str, ...] = tuple(default("learner.freeze"))

    def __post_init__(self):
        for key, allowed in (("attention", ATTENTIONS), ("recompute", RECOMPUTE)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"learner.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if not 0 <= self.optimizer_offload <= 1:
            raise ValueError(f"learner.optimizer_offload must be within [0, 1], got {self.optimizer_offload}")
        if not all(isinstance(p, str) and p for p in self.freeze):
            raise ValueError(f"learner.freeze must be a list of glob patterns of tensor names, got {self.freeze!r}")
        if self.max_tokens_per_micro_batch < 0:
            raise ValueError(f"learner.max_tokens_per_micro_batch must be >= 0, got {self.max_tokens_per_micro_batch}")


def frozen_names(names: list[str], patterns: tuple[str, ...]) -> set[str]:
    """The tensor names (HF checkpoint names) that learner.freeze's glob patterns match.
    A pattern that matches nothing is a typo, and freezing everything trains nothing:
    both are refused."""
    import fnmatch

    hit: set[str] = set()
    for pattern in patterns:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise ValueError(f"learner.freeze: {pattern!r} matches no tensor of the model (names look like "
                             f"{names[:2]})")
        hit.update(matched)
    if hit and hit >= set(names):
        raise ValueError("learner.freeze matches every tensor of the model: nothing would train")
    return hit


def resolve_loss(spec: str):
    """The policy loss named "module:function"."""
    return import_function(spec, "loss")


def micro_batches(lengths: list[int], size: int, max_tokens: int) -> list[list[int]]:
    """Indices of each micro-batch. With a token budget: samples sorted longest first,
    each micro-batch as many as fit when padded to its longest (so little padding is
    computed); else consecutive groups of `size` (0: one group)."""
    n = len(lengths)
    if n == 0:
        return []
    if max_tokens <= 0:
        size = size or n
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    order = sorted(range(n), key=lambda i: -lengths[i])
    if lengths[order[0]] > max_tokens:
        raise ValueError(f"a sample of {lengths[order[0]]} tokens exceeds "
                         f"learner.max_tokens_per_micro_batch={max_tokens}")
    out: list[list[int]] = []
    for i in order:  # longest first: a micro-batch's first sample sets its padded width
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


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


def scatter(at: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`values` [K] of the positions `at` marks, laid out as `at` ([N, T-1]) with zeros
    elsewhere (differentiable)."""
    return torch.zeros(at.shape, dtype=values.dtype, device=values.device).masked_scatter(at, values)


def _length(s: Sample) -> int:
    return len(s.prompt_ids) + len(s.completion_ids)


class PolicyLearner:
    """Subclasses set self.cfg, self.device, self.steps and implement the hooks below."""

    cfg: LearnerConfig
    device: torch.device
    steps: int
    sender = None  # a WeightSender on the rank that broadcasts to the engines

    def token_logprobs(self, ids: torch.Tensor, at: torch.Tensor, reference: bool = False):
        """(log-prob of each next token [N, T-1] with grad, entropy [N, T-1] without) at
        the positions `at` [N, T-1] marks (the completion tokens), zero elsewhere: only
        those positions are computed over the vocabulary."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    def step(self, lr: float) -> float:
        """Clip and apply the accumulated gradients at `lr`; the norm before clipping."""
        raise NotImplementedError

    def my_share(self, items: list) -> list:
        """This rank's part of a batch (data parallelism); everything on one rank."""
        return items

    dp_size = 1  # data-parallel ranks; each one's gradients are averaged over them
    sent_version: int | None = None  # version of the weights this learner last sent (and still holds)

    def dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over data-parallel ranks; one rank: itself."""
        return t

    def dp_max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    arch = None  # the model's Arch (hf_megatron.py) when known: model FLOPs and MFU
    world_size = 1  # processes (GPUs) the step runs on
    peak: float | None = None  # FLOP/s of one of them

    def _micro_batches(self, lengths: list[int]) -> list[list[int]]:
        return micro_batches(lengths, self.cfg.micro_batch_size, self.cfg.max_tokens_per_micro_batch)

    def _set_peak(self) -> None:
        """MFU's denominator: the configured peak, else the device's from the table."""
        from rlloop.learner.flops import peak_flops

        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.peak = peak_flops(name, self.cfg.dtype, self.cfg.peak_tflops)

    def _speed(self, lengths: list[int], extra_forwards: int, ms: float) -> dict:
        """learner_tflops (model FLOP/s per process) and learner_mfu (over its peak)."""
        if self.arch is None:
            return {}
        from rlloop.learner.flops import step_flops

        per_process = step_flops(self.arch, lengths, extra_forwards) / self.world_size / (ms / 1e3)
        out = {"learner_tflops": per_process / 1e12}
        if self.peak:
            out["learner_mfu"] = per_process / self.peak
        return out

    def _backward(self, loss: torch.Tensor) -> None:
        """Backward of this rank's part of a loss that is already normalised over the
        whole batch: gradients are averaged over DP ranks, so scale by their number to
        make the average the global sum."""
        (loss * self.dp_size).backward()

    def sft_step(self, prompts: list[list[int]], targets: list[list[int]]) -> dict:
        """One supervised step on prompt -> target (warm-up before RL): the mean
        negative log-likelihood over every target token of the batch."""
        prompts, targets = self.my_share(prompts), self.my_share(targets)
        total = self.dp_sum(torch.tensor(float(sum(map(len, targets))), dtype=torch.float64)).item()
        self.zero_grad()
        loss_sum = 0.0
        for mb in self._micro_batches([len(p) + len(t) for p, t in zip(prompts, targets)]):
            ids, comp = pack_batch([prompts[i] for i in mb], [targets[i] for i in mb], self.cfg.pad_id, self.device)
            tok, _ = self.token_logprobs(ids, comp)
            loss = -(tok * comp).sum() / total
            self._backward(loss)
            loss_sum += loss.item()
        self.step(self.cfg.sft_lr)
        return {"sft_loss": self.dp_sum(torch.tensor(loss_sum, dtype=torch.float64)).item()}

    def _batch(self, part: list[Sample]):
        """ids [N, T], completion mask and behaviour log-probs [N, T-1], advantages [N]."""
        ids, comp = pack_batch([s.prompt_ids for s in part], [s.completion_ids for s in part],
                               self.cfg.pad_id, "cpu")
        behaviour = torch.zeros(comp.shape)
        for i, s in enumerate(part):
            behaviour[i][comp[i]] = torch.tensor(s.behaviour_logprobs, dtype=behaviour.dtype)
            if s.loss_mask is not None:  # environment tokens: context only, never a loss term
                at = comp[i].nonzero()[:, 0]
                comp[i, at[~torch.tensor(s.loss_mask, dtype=torch.bool)]] = False
        adv = torch.tensor([s.advantage for s in part])
        return ids.to(self.device), comp.to(self.device), behaviour.to(self.device), adv.to(self.device)

    def train_step(self, samples: list[Sample]) -> dict:
        """A GRPO-family update on `samples` (advantages already computed): one optimizer
        step per PPO mini-batch, each over micro-batches whose losses add up to the
        mini-batch's loss over all data-parallel ranks (token and sample counts are
        summed across ranks before any micro-batch runs). With anchor=proximal the
        policy's own log-probs before the first step anchor the ratio and give the
        truncated importance weights."""
        t0 = time.perf_counter()
        obj = self.cfg.objective
        loss_fn = resolve_loss(self.cfg.loss)
        mine = self.my_share(samples)
        k = self.cfg.ppo_mini_batches
        minis = [mine[i * len(mine) // k:(i + 1) * len(mine) // k] for i in range(k)]
        parts = [[[mini[i] for i in mb] for mb in self._micro_batches([_length(s) for s in mini])]
                 for mini in minis]
        proximal = None
        if obj.anchor == "proximal":
            with torch.no_grad():
                proximal = [[self.token_logprobs(*self._batch(p)[:2])[0] for p in mini] for mini in parts]
        sums: dict[str, float] = {}
        maxes: dict[str, float] = {}
        grad_norms = []
        gap = torch.zeros(2, dtype=torch.float64)  # sum and count of logprob_gap's tokens
        for j, mini in enumerate(parts):
            counts = self.dp_sum(torch.tensor([float(sum(len(s.completion_ids) for s in minis[j])),
                                               float(len(minis[j]))], dtype=torch.float64))
            total_tokens, total_samples = counts.tolist()
            self.zero_grad()
            for i, part in enumerate(mini):
                ids, comp, behaviour, adv = self._batch(part)
                logp, entropy = self.token_logprobs(ids, comp)
                if j == 0:
                    gap += self._logprob_gap(part, logp, behaviour, comp)
                anchor, is_weight, metrics = behaviour, None, {}
                if proximal is not None:
                    anchor = proximal[j][i]
                    is_weight, metrics = truncated_is(anchor, behaviour, comp, obj.tis_level, obj.tis_cap)
                ref_logp = None
                if obj.kl_coef > 0:
                    with torch.no_grad():
                        ref_logp, _ = self.token_logprobs(ids, comp, reference=True)
                weight = token_weights(comp, obj.aggregation, total_tokens, total_samples, obj.norm_tokens)
                loss, m = loss_fn(LossInputs(logp, anchor, behaviour, adv, comp, weight, is_weight, ref_logp), obj)
                self._backward(loss)
                n_tok = comp.sum().item()
                metrics.update(m, entropy=((entropy * comp).sum() / max(n_tok, 1)).item())
                # Token means over the micro-batch -> token means over the mini-batch.
                share = n_tok / max(total_tokens, 1) / k
                for key, v in metrics.items():
                    if key.endswith("_max"):
                        maxes[key] = max(maxes.get(key, v), v)
                    else:
                        sums[key] = sums.get(key, 0.0) + v * share
                sums["loss"] = sums.get("loss", 0.0) + loss.item() / k
            grad_norms.append(self.step(self.cfg.lr))
        self.steps += 1
        out = {}
        if sums:
            keys = sorted(sums)
            out.update(zip(keys, self.dp_sum(torch.tensor([sums[x] for x in keys], dtype=torch.float64)).tolist()))
        if maxes:
            keys = sorted(maxes)
            out.update(zip(keys, self.dp_max(torch.tensor([maxes[x] for x in keys], dtype=torch.float64)).tolist()))
        gap_sum, gap_n = self.dp_sum(gap).tolist()
        if gap_n:
            out["logprob_gap"] = gap_sum / gap_n
        train_ms = (time.perf_counter() - t0) * 1e3
        extra_forwards = (proximal is not None) + (obj.kl_coef > 0)
        result = {**out, "grad_norm": sum(grad_norms) / k, "train_ms": train_ms,
                  "learner_tok_s": sum(len(s.completion_ids) for s in samples) / train_ms * 1e3,
                  **self._speed([_length(s) for s in samples], extra_forwards, train_ms)}
        report(learner_step_ms=train_ms, grad_norm=result["grad_norm"], learner_steps=self.steps,
               learner_tok_s=result["learner_tok_s"], learner_tflops=result.get("learner_tflops"),
               learner_mfu=result.get("learner_mfu"))
        return result

    def _logprob_gap(self, part: list[Sample], logp, behaviour, comp) -> torch.Tensor:
        """(sum, count) of |learner - engine| token log-probs over the samples generated
        wholly under the weights this learner holds (its last send): the numerical drift
        between the two stacks (bf16 kernels), with no policy change mixed in."""
        fresh = torch.tensor([s.version_start == s.version_end == self.sent_version for s in part],
                             device=comp.device)
        mask = comp & fresh[:, None]
        gap = ((logp.detach() - behaviour).abs() * mask).sum()
        return torch.stack([gap.double().cpu(), mask.sum().double().cpu()])

    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        """The policy's log-prob of each completion token (no training)."""
        with torch.no_grad():
            ids, comp = pack_batch(prompts, completions, self.cfg.pad_id, self.device)
            tok, _ = self.token_logprobs(ids, comp)
        return [tok[i][comp[i]].tolist() for i in range(len(prompts))]

    def leave_weight_group(self, token: str | None = None, plan_key: str | None = None) -> None:
        """Close this rank's sender; given the group's token and plan key, also remove a
        shared region that a predecessor of this rank (killed, restarted) left behind."""
        if self.sender is not None:
            try:
                self.sender.close()
            except Exception:  # a group broken by a dead member may not close cleanly
                pass
            self.sender = None
        if token is not None:
            from rlloop.weights.shared import remove_region

            remove_region(token, plan_key, getattr(self, "tp_rank", 0))  # a sharded group: a region per TP rank

    def apply(self, fn, *args):
        """`fn(self, *args)`: a test's or a benchmark's own code run on this rank."""
        return fn(self, *args)

    def placement(self) -> dict:
        from rlloop.actors.weight_sync import placement

        return placement()

    def ready(self) -> int:
        """This incarnation's pid: a restarted learner answers with a new one."""
        import os

        return os.getpid()
