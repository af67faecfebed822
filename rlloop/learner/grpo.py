"""The GRPO family of policy objectives as pure functions (docs/objectives.md gives
each one's formula and paper).

The learner hands `policy_loss` one micro-batch as `LossInputs`: per-token log-probs
of the current policy (with grad), of the ratio's anchor, and of the behaviour policy
that sampled the tokens; per-sample advantages; and each token's weight in the loss
of the whole batch (`token_weights`, computed from counts summed over micro-batches
and data-parallel ranks, so the loss is exactly the global one however the batch is
split). `Objective` selects the variant:

  clip_low / clip_high   PPO clip range [1 - clip_low, 1 + clip_high]; clip_high >
                         clip_low is DAPO's clip-higher
  dual_clip              c > 1: for negative advantages the loss is at most c * |A|
                         (dual-clip PPO)
  ratio_level            token | sequence (GSPO: one length-normalised ratio per sample)
  aggregation            token-mean | sequence-mean | token-sum-norm (Dr. GRPO: token
                         sums over a constant, norm_tokens per sample)
  anchor                 behaviour: the ratio is current / behaviour and is itself the
                         importance correction | proximal (decoupled PPO): the ratio is
                         current / the policy before this step, and each token is
                         weighted by the truncated importance weight
                         min(proximal / behaviour, tis_cap) (`truncated_is`)
  kl_coef, kl_clamp      k3 KL to a reference policy, its log-ratio and value clamped
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlloop.defaults import default

AGGREGATIONS = ("token-mean", "sequence-mean", "token-sum-norm")
RATIO_LEVELS = ("token", "sequence")
ANCHORS = ("behaviour", "proximal")
KL_LOG_RATIO_CLAMP = 20.0  # exp(20) still fits float32 comfortably


@dataclass(frozen=True)
class Objective:
    clip_low: float = default("learner.clip_low")
    clip_high: float = default("learner.clip_high")
    dual_clip: float | None = default("learner.dual_clip")
    ratio_level: str = default("learner.ratio_level")
    aggregation: str = default("learner.loss_aggregation")
    # token-sum-norm: the constant per-sample length (the generation budget)
    norm_tokens: int = default("rollout.max_tokens")
    anchor: str = default("learner.anchor")
    tis_level: str = default("learner.tis_level")  # anchor=proximal: token or sequence importance weights
    tis_cap: float = default("learner.tis_cap")  # anchor=proximal: the truncation C
    kl_coef: float = default("learner.kl_coef")
    kl_clamp: float = default("learner.kl_clamp")  # the k3 value is clamped to [0, kl_clamp]

    def __post_init__(self):
        def need(ok: bool, what: str):
            if not ok:
                raise ValueError(what)

        need(0 <= self.clip_low < 1, f"clip_low must be in [0, 1), got {self.clip_low}")
        need(self.clip_high >= 0, f"clip_high must be >= 0, got {self.clip_high}")
        need(self.dual_clip is None or self.dual_clip > 1, f"dual_clip must be > 1 or null, got {self.dual_clip}")
        need(self.ratio_level in RATIO_LEVELS, f"ratio_level must be one of {RATIO_LEVELS}, got {self.ratio_level!r}")
        need(self.aggregation in AGGREGATIONS,
             f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        need(self.norm_tokens >= 1, f"norm_tokens must be >= 1, got {self.norm_tokens}")
        need(self.anchor in ANCHORS, f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        need(self.tis_level in RATIO_LEVELS, f"tis_level must be one of {RATIO_LEVELS}, got {self.tis_level!r}")
        need(self.tis_cap > 0, f"tis_cap must be > 0, got {self.tis_cap}")
        need(self.kl_coef >= 0, f"kl_coef must be >= 0, got {self.kl_coef}")
        need(self.kl_clamp > 0, f"kl_clamp must be > 0, got {self.kl_clamp}")


@dataclass
class LossInputs:
    """One micro-batch; [N, T] tensors are aligned with `mask` (completion tokens)."""
    logp: torch.Tensor  # current policy, with grad
    anchor_logp: torch.Tensor  # the ratio's denominator: behaviour or proximal
    behaviour_logp: torch.Tensor  # the engine's, under the weights that sampled each token
    advantages: torch.Tensor  # [N]
    mask: torch.Tensor  # bool
    token_weight: torch.Tensor  # each token's share of the whole batch's loss (0 off the mask)
    is_weight: torch.Tensor | None = None  # truncated importance weights (anchor=proximal), no grad
    ref_logp: torch.Tensor | None = None  # reference policy, for the KL term


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """rewards: [num_groups * group_size], grouped contiguously. normalize_std=False
    is Dr. GRPO's advantage (centred, not scaled)."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def token_weights(mask: torch.Tensor, aggregation: str, total_tokens: float, total_samples: float,
                  norm_tokens: int = 1) -> torch.Tensor:
    """Each completion token's weight in the loss of the whole batch, given the batch's
    token and sample counts (summed over micro-batches and data-parallel ranks)."""
    m = mask.to(torch.float64)  # the loss casts to its own dtype
    if aggregation == "token-mean":
        return m / max(total_tokens, 1)
    if aggregation == "sequence-mean":
        return m / (m.sum(1, keepdim=True).clamp(min=1) * max(total_samples, 1))
    if aggregation == "token-sum-norm":
        return m / (norm_tokens * max(total_samples, 1))
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over the completion tokens, [N]."""
    m = mask.to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def truncated_is(proximal_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor,
                 level: str, cap: float) -> tuple[torch.Tensor, dict]:
    """Decoupled PPO's off-policy correction: min(pi_proximal / pi_behaviour, cap) per
    token, or per sample from the product of its token ratios (level="sequence").
    No gradient. Metrics: the weights' mean and max, and the fraction capped."""
    with torch.no_grad():
        log_w = (proximal_logp - behaviour_logp).masked_fill(~mask.bool(), 0.0)
        if level == "sequence":
            log_w = log_w.sum(1, keepdim=True).expand_as(log_w)
        raw = torch.exp(log_w)  # a sequence's product may overflow to inf: capped next
        w = raw.clamp(max=cap)
        m = mask.bool()
        n = m.sum().clamp(min=1).double()
        metrics = {"is_weight_mean": (w[m].sum() / n).item(),
                   "is_weight_max": w[m].max().item() if m.any() else 0.0,
                   "is_capped_frac": ((raw > cap) & m).sum().item() / n.item()}
    return w * m, metrics


def policy_loss(x: LossInputs, obj: Objective) -> tuple[torch.Tensor, dict]:
    """This micro-batch's part of the batch loss (a sum with `x.token_weight`) and its
    metrics as token means over the micro-batch."""
    mask = x.mask.bool()
    log_ratio = x.logp - x.anchor_logp
    if obj.ratio_level == "sequence":
        # GSPO: s_i = exp(mean_t log-ratio), taken as sg[s_i] * pi_t / sg[pi_t] per token,
        # whose value is s_i and whose gradient is s_i * grad log pi_t.
        seq = masked_mean(log_ratio, mask).detach()
        log_ratio = seq[:, None] + x.logp - x.logp.detach()
    ratio = torch.exp(log_ratio)
    adv = x.advantages[:, None].to(ratio.dtype)
    low, high = 1 - obj.clip_low, 1 + obj.clip_high
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, low, high) * adv)
    dual_bound = torch.zeros_like(mask)
    if obj.dual_clip is not None:
        # Dual clip: with A < 0 a huge ratio would make the loss unbounded; cap it at c|A|.
        cap = -obj.dual_clip * adv
        dual_bound = (adv < 0) & (per_token > cap)
        per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
    if x.is_weight is not None:
        per_token = per_token * x.is_weight
    kl = torch.zeros_like(x.logp)
    if x.ref_logp is not None and obj.kl_coef > 0:
        # k3 estimator of KL(pi || ref), non-negative and unbiased; its log-ratio and
        # value are clamped so a token far from the reference cannot dominate the step.
        d = (x.ref_logp - x.logp).clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
        kl = (torch.exp(d) - d - 1).clamp(max=obj.kl_clamp)
        per_token = per_token + obj.kl_coef * kl
    loss = (per_token * x.token_weight.to(per_token.dtype)).sum()
    with torch.no_grad():
        n = mask.sum().clamp(min=1).double()
        # A clip binds where the min picks the clipped term with a zero gradient.
        binding = ((adv > 0) & (ratio > high)) | ((adv < 0) & (ratio < low))
        metrics = {"clip_frac": ((binding & mask).sum() / n).item(),
                   "dual_clip_frac": ((dual_bound & mask).sum() / n).item(),
                   "ratio_mean": (ratio[mask].sum() / n).item(),
                   "ratio_max": ratio[mask].max().item() if mask.any() else 0.0,
                   "kl_behaviour": ((x.behaviour_logp - x.logp)[mask].sum() / n).item(),
                   "kl_ref": (kl[mask].sum() / n).item()}
    return loss, metrics
