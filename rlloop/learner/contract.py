"""What the coordinator asks of a learner: the methods every rank of HFLearner
(transformers, one process) and MegatronLearner (megatron-core, TP x DP ranks)
answers, called through LearnerGroup's typed methods. A call runs on every rank;
ranks take part in the same collectives."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch

from rlloop.learner.policy import Sample
from rlloop.weights.group import WeightGroupConfig
from rlloop.weights.protocol import UpdatePlan, UpdateTicket, WeightUpdateRequest


@runtime_checkable
class Learner(Protocol):
    def ready(self) -> int:
        """This incarnation's pid: a restarted rank answers with a new one."""

    def placement(self) -> dict:
        """{"node": id, "gpus": [ids]}: where the rank runs (weights.backend=auto)."""

    def sft_step(self, prompts: list[list[int]], targets: list[list[int]]) -> dict:
        """One supervised step; {"sft_loss": ...}."""

    def train_step(self, samples: list[Sample]) -> dict:
        """One policy update on samples with advantages; its metrics."""

    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        """The policy's log-prob of each completion token."""

    def weight_plan(self, bucket_bytes: int) -> UpdatePlan:
        """The update plan in the engines' names and shapes, computed once."""

    def export(self, plan: UpdatePlan) -> Iterator[dict[str, torch.Tensor]]:
        """The weights as `plan`'s buckets, in order (WeightSender.send consumes it)."""

    def join_weight_group(self, cfg: WeightGroupConfig) -> None: ...

    def leave_weight_group(self, token: str | None = None, plan_key: str | None = None) -> None: ...

    def send_weights(self, update: WeightUpdateRequest | UpdateTicket) -> dict:
        """Export and send an update of the plan (a ticket names it); the sender's stats."""

    def save(self, path: str) -> None:
        """An HF directory engines can start from, plus the optimizer state."""

    def load_checkpoint(self, path: str) -> int:
        """Weights and optimizer of a checkpoint; the optimizer steps it had taken."""

    def load_optimizer(self, path: str) -> int:
        """The optimizer of a checkpoint whose weights this learner started from."""
