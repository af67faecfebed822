"""A single-process learner on a transformers model and a torch optimizer.

The quick learner for CPU runs and small models; megatron_learner.py is the one for
TP/DP. Both answer the learner contract (contract.py).
It is also the weight sender: rank 0 of the weight group, so weights flow straight
from the learner to the engines.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from rlloop.learner.hf_megatron import UnsupportedModel, arch_from_hf
from rlloop.learner.policy import LearnerConfig, PolicyLearner, frozen_names, scatter
from rlloop.weights.group import WeightGroupConfig
from rlloop.weights.protocol import (UpdatePlan, UpdateTicket, WeightUpdateRequest, make_plan, parameter_infos,
                                    resolve)
from rlloop.weights.sender import WeightSender, buckets_of


class HFLearner(PolicyLearner):
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
        if cfg.objective.kl_coef > 0:
            self.ref = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(self.device).eval()
        self.frozen = self._freeze(cfg.freeze)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        try:  # model FLOPs (MFU) for the families the formula covers
            self.arch = arch_from_hf(self.model.config)
        except UnsupportedModel:
            self.arch = None
        self._set_peak()
        self.sender = None
        self._plan: UpdatePlan | None = None
        self.steps = 0

    def _freeze(self, patterns: tuple[str, ...]) -> set[str]:
        """Stop training the tensors `patterns` match; returns their names. Tied tensors
        (one parameter under two names) are frozen together or not at all."""
        frozen = frozen_names(list(self.model.state_dict()), patterns)
        aliases: dict[int, list[str]] = {}
        params = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
            params[id(p)] = p
        for key, names in aliases.items():
            hit = frozen.intersection(names)
            if hit and len(hit) < len(names):
                raise ValueError(f"learner.freeze: {sorted(names)} are one tied tensor: freeze all of them or none")
            if hit:
                params[key].requires_grad_(False)
        return frozen

    def token_logprobs(self, ids: torch.Tensor, at: torch.Tensor, reference: bool = False):
        model = self.ref if reference else self.model
        hidden = model.base_model(input_ids=ids).last_hidden_state[:, :-1][at]  # [K, hidden]
        logp = torch.log_softmax(model.get_output_embeddings()(hidden).float(), dim=-1)
        tok = logp.gather(-1, ids[:, 1:][at][:, None])[:, 0]
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
        return scatter(at, tok), scatter(at, entropy)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self, lr: float) -> float:
        for g in self.opt.param_groups:
            g["lr"] = lr
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.opt.step()
        return grad_norm.item()

    # --- weights ----------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def weight_plan(self, bucket_bytes: int) -> UpdatePlan:
        """Computed once; every later update reuses it."""
        if self._plan is None:
            sent = [(n, t) for n, t in self._tensors().items() if n not in self.frozen]
            self._plan = make_plan(parameter_infos(sent), bucket_bytes, partial=bool(self.frozen))
        return self._plan

    def join_weight_group(self, cfg: WeightGroupConfig) -> None:
        self.sender = WeightSender(cfg, self.device, in_place=True)  # ipc: parameters are shared as they are

    def export(self, plan: UpdatePlan) -> Iterator[dict[str, torch.Tensor]]:
        """The parameters as `plan`'s buckets (no copies: the tensors themselves)."""
        return buckets_of(plan, self._tensors())

    def send_weights(self, update: WeightUpdateRequest | UpdateTicket) -> dict:
        """Send `update` (a ticket names the plan of `weight_plan`)."""
        request = resolve(update, {self._plan.key: self._plan} if self._plan else {})
        tensors = self._tensors()  # once: checked, then sent
        self.sender.check(request, tensors)
        sent = self.sender.send(request, buckets_of(request.plan, tensors))
        self.sent_version = request.version
        return sent

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
