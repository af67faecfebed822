"""GRPO as pure functions: group-normalised advantages and the clipped policy loss
over per-token log-probs. Backend-agnostic: the learner supplies new log-probs."""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """rewards: [num_groups * group_size], grouped contiguously."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def grpo_loss(logp: torch.Tensor, behaviour_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, aggregation: str = "token-mean",
              ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
              tis_cap: float | None = None) -> tuple[torch.Tensor, dict]:
    """PPO-style clipped objective with GRPO advantages.

    logp, behaviour_logp, mask: [N, T] (mask marks completion tokens); advantages: [N].
    behaviour_logp are the engine's log-probs of the sampled tokens under the weights
    that sampled them, so the ratio also corrects for in-flight staleness. With
    `tis_cap`, the ratio is additionally truncated-importance-weighted (cap on the
    detached ratio), as in truncated IS for off-policy rollouts.
    """
    mask = mask.to(logp.dtype)
    log_ratio = logp - behaviour_logp
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if tis_cap is not None:
        per_token = per_token * torch.clamp(ratio.detach(), max=tis_cap)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        # k3 estimator of KL(pi || ref), non-negative and unbiased.
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + kl_coef * kl
    loss = _aggregate(per_token, mask, aggregation)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clip_frac = (((ratio - 1).abs() > clip_eps).to(mask.dtype) * mask).sum() / n
        metrics = {"clip_frac": clip_frac.item(),
                   "ratio_mean": ((ratio * mask).sum() / n).item(),
                   "kl_behaviour": ((-log_ratio * mask).sum() / n).item(),
                   "kl_ref": ((kl * mask).sum() / n).item()}
    return loss, metrics


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    if aggregation == "token-mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if aggregation == "sequence-mean":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        return per_seq.mean()
    raise ValueError(f"loss aggregation {aggregation!r} not in ('token-mean', 'sequence-mean')")
