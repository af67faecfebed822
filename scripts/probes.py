"""Code the benchmarks run inside an engine or a learner to measure it, kept out of
the classes a run uses:

- the wire's floor: a plan's bytes sent as they are (no gather, conversion or
  packing) and received without loading (`FloorEngine.receive_raw`, `send_floor`);
- the learner's full logits and its argmax agreement with an engine's greedy output.

Imported by scripts next to it; Ray ships these by value (no import on the actors).
"""
from __future__ import annotations

import sys
import time

import torch
from ray import cloudpickle

from rlloop.actors.engine import GenerationEngine
from rlloop.weights.group import broadcast_async, synchronize
from rlloop.weights.protocol import UpdatePlan, WeightUpdateError, WeightUpdateRequest


class FloorEngine(GenerationEngine):
    async def receive_raw(self, request: WeightUpdateRequest) -> dict:
        """Receive the plan's bytes without loading them; no pause. The plan must have
        been prepared (an update of it ran)."""
        results = await self.llm.collective_rpc(
            "rl_receive", args=(request.plan.key, request.version, self.config.receive_mode), kwargs={"load": False})
        return results[0]


def send_floor(sender, plan: UpdatePlan) -> dict:
    """The plan's buckets as they are, from a WeightSender (shared wires: nothing to
    send; the workers' copy out of the region is the floor)."""
    if sender is None:  # a learner rank that does not send
        return {}
    t0 = time.perf_counter()
    if sender.in_place:
        raise WeightUpdateError("an in-place sender shares tensors, not buckets: no raw floor")
    if sender.shared:
        sender.publish(plan)
    else:
        bufs = sender._buffers_for(plan)
        for i, bucket in enumerate(plan.buckets):
            broadcast_async(sender.group, bufs[i % len(bufs)][:bucket.nbytes]).wait()
    synchronize(sender.device)
    return {"send_ms": (time.perf_counter() - t0) * 1e3, "bytes": plan.bucket_bytes}


def learner_send_floor(learner, plan: UpdatePlan) -> dict:
    """send_floor from inside a learner rank (LearnerGroup.apply)."""
    return send_floor(learner.sender, plan)


def full_logits(learner, ids: list[list[int]]) -> torch.Tensor:
    """A megatron learner's all-gathered logits over the real vocabulary, on CPU."""
    import torch.distributed as dist

    with torch.no_grad():
        local = learner.logits(torch.tensor(ids)).float().contiguous()
        parts = [torch.empty_like(local) for _ in range(learner.tp_size)]
        dist.all_gather(parts, local, group=learner.tp_group)
    return torch.cat(parts, dim=-1)[..., :learner.arch.vocab_size].cpu()


def greedy_agreement(learner, prompts: list[list[int]], completions: list[list[int]]) -> float:
    """Fraction of completion tokens that are the learner's argmax given the tokens
    before them: 1.0 for an engine's greedy output on the same weights."""
    hits, total = 0, 0
    for p, c in zip(prompts, completions):
        pred = full_logits(learner, [p + c])[0, len(p) - 1:-1].argmax(-1)
        hits += int((pred == torch.tensor(c)).sum())
        total += len(c)
    return hits / total


cloudpickle.register_pickle_by_value(sys.modules[__name__])
