"""A single-process learner on a transformers model and a torch optimizer.

It is the learner for CPU runs and small models until the Megatron learner (TP/DP,
rlloop/learner, issue 3) replaces it behind the same methods: `sft_step`,
`train_step`, `weight_plan`, `join_weight_group`, `send_weights`, `save`.
It is also the weight sender: rank 0 of the weight group, so weights flow straight
from the learner to the engines.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlloop.learner.grpo import grpo_loss
from rlloop.weights.group import WeightGroupConfig
from rlloop.weights.protocol import UpdatePlan, WeightUpdateRequest, make_plan, parameter_infos


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
    dtype: str = "float32"  # parameters and optimizer state; bfloat16 halves memory on GPU


class HFLearner:
    def __init__(self, cfg: LearnerConfig):
        from transformers import AutoModelForCausalLM

        from rlloop.weights.protocol import DTYPES

        torch.manual_seed(cfg.seed)
        torch.set_num_threads(cfg.num_threads)
        self.cfg = cfg
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
        dtype = DTYPES[cfg.dtype]
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(self.device)
        self.model.train()
        self.ref = None
        if cfg.kl_coef > 0:
            self.ref = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(self.device).eval()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sender = None
        self._plan: UpdatePlan | None = None
        self.steps = 0

    # --- batches ----------------------------------------------------------------------

    def _batch(self, prompts: list[list[int]], completions: list[list[int]]):
        """Right-padded input ids, attention mask and the completion-token mask that
        lines up with the shifted log-probs ([N, T-1])."""
        seqs = [p + c for p, c in zip(prompts, completions)]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.cfg.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        comp = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
        for i, (p, s) in enumerate(zip(prompts, seqs)):
            ids[i, :len(s)] = torch.tensor(s)
            attn[i, :len(s)] = 1
            comp[i, len(p) - 1:len(s) - 1] = True
        return ids.to(self.device), attn.to(self.device), comp.to(self.device)

    def _token_logprobs(self, model, ids, attn):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        tok = logp.gather(-1, ids[:, 1:, None])[..., 0]
        entropy = -(logp.exp() * logp).sum(-1)
        return tok, entropy

    # --- training ---------------------------------------------------------------------

    def sft_step(self, prompts: list[list[int]], targets: list[list[int]]) -> dict:
        """One supervised step on prompt -> target (warm-up before RL)."""
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.sft_lr
        ids, attn, comp = self._batch(prompts, targets)
        tok, _ = self._token_logprobs(self.model, ids, attn)
        loss = -(tok * comp).sum() / comp.sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.opt.step()
        return {"sft_loss": loss.item()}

    def train_step(self, samples: list[Sample]) -> dict:
        """One GRPO optimizer step over `samples` (advantages already computed)."""
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr
        t0 = time.perf_counter()
        ids, attn, comp = self._batch([s.prompt_ids for s in samples],
                                      [s.completion_ids for s in samples])
        behaviour = torch.zeros(comp.shape)
        comp_cpu = comp.cpu()
        for i, s in enumerate(samples):
            behaviour[i][comp_cpu[i]] = torch.tensor(s.behaviour_logprobs, dtype=behaviour.dtype)
        behaviour = behaviour.to(self.device)
        adv = torch.tensor([s.advantage for s in samples], device=self.device)
        logp, entropy = self._token_logprobs(self.model, ids, attn)
        ref_logp = None
        if self.ref is not None:
            with torch.no_grad():
                ref_logp, _ = self._token_logprobs(self.ref, ids, attn)
        loss, metrics = grpo_loss(logp, behaviour, adv, comp, self.cfg.clip_eps, self.cfg.aggregation,
                                  ref_logp, self.cfg.kl_coef, self.cfg.tis_cap)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.opt.step()
        self.steps += 1
        n = comp.sum().clamp(min=1)
        return {"loss": loss.item(), "grad_norm": grad_norm.item(),
                "entropy": ((entropy.detach() * comp).sum() / n).item(),
                "train_ms": (time.perf_counter() - t0) * 1e3, **metrics}

    # --- weights ----------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def weight_plan(self, bucket_bytes: int) -> UpdatePlan:
        """Computed once; every later update reuses it."""
        if self._plan is None:
            self._plan = make_plan(parameter_infos(self._tensors().items()), bucket_bytes)
        return self._plan

    def join_weight_group(self, cfg: WeightGroupConfig) -> None:
        from rlloop.weights.sender import WeightSender

        self.sender = WeightSender(cfg, self.device)

    def ready(self) -> int:
        """This incarnation's pid: a restarted learner answers with a new one."""
        import os

        return os.getpid()

    def leave_weight_group(self) -> None:
        if self.sender is not None:
            try:
                self.sender.close()
            except Exception:  # a group broken by a dead member may not close cleanly
                pass
            self.sender = None

    def send_weights(self, request: WeightUpdateRequest) -> dict:
        tensors = self._tensors()
        self.sender.check(request, tensors)
        return self.sender.send(request, tensors)

    def save(self, path: str) -> None:
        self.model.save_pretrained(path, safe_serialization=True)
        torch.save({"optimizer": self.opt.state_dict(), "steps": self.steps}, f"{path}/learner_state.pt")

    def load_checkpoint(self, path: str) -> int:
        """Weights and optimizer of a checkpoint (after a restart on the initial weights)."""
        import glob

        from safetensors.torch import load_file

        state = {}
        for f in sorted(glob.glob(f"{path}/*.safetensors")):
            state.update(load_file(f, device=str(self.device)))
        self.model.load_state_dict(state, strict=False)  # a tied head is stored once
        return self.load_optimizer(path)

    def load_optimizer(self, path: str) -> int:
        """Optimizer state and step count of a checkpoint whose weights this learner
        was started from (LearnerConfig.model = the checkpoint directory)."""
        extra = torch.load(f"{path}/learner_state.pt", weights_only=False)
        self.opt.load_state_dict(extra["optimizer"])
        self.steps = extra["steps"]
        return self.steps
