"""Every objective of rlloop.learner.grpo against its written formula.

The references below follow the papers' formulas token by token with plain scalar
tensor ops (no masks, no vectorised tricks); rlloop's vectorised loss must give the
same loss and the same gradient to 1e-9 in float64 on seeded inputs with ratios far
outside the clip range, zero-variance groups and uneven lengths.
"""
import math
import statistics

import pytest
import torch

from rlloop.learner.grpo import (LossInputs, Objective, group_advantages, policy_loss, token_weights,
                                 truncated_is)

GROUPS, GROUP_SIZE, T = 8, 4, 12
N = GROUPS * GROUP_SIZE
TOL = 1e-9


def _batch(seed: int = 0):
    """Seeded float64 inputs: lengths 1-12, log-ratios between log(0.1) and log(8.4),
    groups 0 and 5 with zero reward variance."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[0], lengths[1] = 1, T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    behaviour = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3 - 0.05
    log_ratio = torch.empty(N, T, dtype=torch.float64).uniform_(math.log(0.1), math.log(8.4), generator=g)
    logp = (behaviour + log_ratio).requires_grad_()
    proximal = behaviour + torch.empty(N, T, dtype=torch.float64).uniform_(-1.5, 1.5, generator=g)
    ref = behaviour + torch.empty(N, T, dtype=torch.float64).uniform_(-2.5, 2.5, generator=g)
    ref[3, 0] = logp[3, 0].detach() + 25  # far beyond the KL clamp
    rewards = (torch.rand(N, generator=g) > 0.5).double()
    rewards[0:GROUP_SIZE] = 1.0
    rewards[5 * GROUP_SIZE:6 * GROUP_SIZE] = 0.0
    return logp, behaviour, proximal, ref, rewards, mask, lengths.tolist()


def _advantages_reference(rewards, normalize_std):
    out = []
    for k in range(GROUPS):
        group = rewards[k * GROUP_SIZE:(k + 1) * GROUP_SIZE].tolist()
        mean = sum(group) / len(group)
        std = statistics.stdev(group)
        out += [(r - mean) / (std + 1e-6) if normalize_std else r - mean for r in group]
    return out


def _reference_loss(logp, anchor, adv, lengths, obj: Objective, is_weight=None, ref=None):
    """The objective token by token. For one sample i with tokens t < L_i:
      r_it = pi(t) / pi_anchor(t)     (GSPO: s_i = exp(mean_t log r_it) for every t)
      pg_it = -min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i)
      dual clip (A_i < 0): pg_it = min(pg_it, c |A_i|)
      decoupled: pg_it *= w_it = min(pi_prox / pi_behaviour, C)  (sequence: product over t)
      KL: + beta * min(exp(d) - d - 1, kl_clamp), d = clamp(log ref - log pi, +-20)
      token-mean: sum_it / sum_i L_i; sequence-mean: mean_i (sum_t / L_i);
      token-sum-norm (Dr. GRPO): sum_it / (N * norm_tokens)."""
    total = logp.new_zeros(())
    seq_terms = []
    for i, length in enumerate(lengths):
        a = adv[i]
        if obj.ratio_level == "sequence":
            mean_log = sum(logp[i, t] - anchor[i, t] for t in range(length)) / length
            s = torch.exp(mean_log)
        row = logp.new_zeros(())
        for t in range(length):
            r = s if obj.ratio_level == "sequence" else torch.exp(logp[i, t] - anchor[i, t])
            pg = -torch.minimum(r * a, torch.clamp(r, 1 - obj.clip_low, 1 + obj.clip_high) * a)
            if obj.dual_clip is not None and a < 0:
                pg = torch.minimum(pg, torch.tensor(-obj.dual_clip * a, dtype=pg.dtype))
            if is_weight is not None:
                pg = pg * is_weight[i][t]
            if ref is not None:
                d = torch.clamp(ref[i, t] - logp[i, t], -20, 20)
                pg = pg + obj.kl_coef * torch.clamp(torch.exp(d) - d - 1, max=obj.kl_clamp)
            row = row + pg
        total = total + row
        seq_terms.append(row / length)
    if obj.aggregation == "token-mean":
        return total / sum(lengths)
    if obj.aggregation == "sequence-mean":
        return sum(seq_terms) / len(lengths)
    return total / (len(lengths) * obj.norm_tokens)


def _reference_is_weights(proximal, behaviour, lengths, level, cap):
    out = []
    for i, length in enumerate(lengths):
        ratios = [math.exp(proximal[i, t] - behaviour[i, t]) for t in range(length)]
        if level == "sequence":
            ratios = [math.prod(ratios)] * length
        out.append([min(r, cap) for r in ratios])
    return out


def _ours(logp, anchor, behaviour, adv, mask, obj, is_weight=None, ref=None):
    weight = token_weights(mask, obj.aggregation, mask.sum().item(), mask.shape[0], obj.norm_tokens)
    return policy_loss(LossInputs(logp, anchor, behaviour, adv, mask, weight.double(), is_weight, ref), obj)


OBJECTIVES = {
    "grpo": Objective(),
    "grpo-sequence-mean": Objective(aggregation="sequence-mean"),
    "dapo-clip-higher": Objective(clip_low=0.2, clip_high=0.28),
    "dual-clip": Objective(dual_clip=3.0),
    "dr-grpo": Objective(aggregation="token-sum-norm", norm_tokens=T),
    "gspo": Objective(ratio_level="sequence", clip_low=3e-4, clip_high=4e-4, aggregation="sequence-mean"),
    "kl": Objective(kl_coef=0.05),
    "decoupled-token": Objective(anchor="proximal", tis_level="token", tis_cap=2.0),
    "decoupled-sequence": Objective(anchor="proximal", tis_level="sequence", tis_cap=2.0),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_matches_its_written_formula(name):
    obj = OBJECTIVES[name]
    logp, behaviour, proximal, ref, rewards, mask, lengths = _batch(seed=1)
    normalize = name != "dr-grpo"  # Dr. GRPO also drops the std normalisation
    adv = group_advantages(rewards, GROUP_SIZE, normalize_std=normalize)
    adv_ref = _advantages_reference(rewards, normalize)
    assert max(abs(a - b) for a, b in zip(adv.tolist(), adv_ref)) < TOL
    anchor = proximal if obj.anchor == "proximal" else behaviour
    is_weight = is_ref = None
    if obj.anchor == "proximal":
        is_weight, metrics = truncated_is(proximal, behaviour, mask, obj.tis_level, obj.tis_cap)
        is_ref = _reference_is_weights(proximal, behaviour, lengths, obj.tis_level, obj.tis_cap)
        for i, length in enumerate(lengths):
            assert torch.allclose(is_weight[i, :length], torch.tensor(is_ref[i], dtype=torch.float64),
                                  atol=TOL, rtol=0)
        assert 0 < metrics["is_capped_frac"] < 1 and metrics["is_weight_max"] == pytest.approx(obj.tis_cap)
    use_ref = ref if obj.kl_coef > 0 else None
    loss, _ = _ours(logp, anchor, behaviour, adv, mask, obj, is_weight, use_ref)
    (grad,) = torch.autograd.grad(loss, logp)
    want = _reference_loss(logp, anchor, adv_ref, lengths, obj, is_ref, use_ref)
    (want_grad,) = torch.autograd.grad(want, logp)
    assert abs(loss.item() - want.item()) < TOL, (loss.item(), want.item())
    assert (grad - want_grad).abs().max().item() < TOL
    assert grad[~mask].abs().max().item() == 0  # padding gets no gradient
    assert grad.abs().sum() > 0


def test_truncated_is_weights_an_unclipped_token_once():
    """r = 1.5 against the behaviour policy, cap C = 2, A = -1 (the clip does not bind):
    the gradient weight is r = 1.5, never r * min(r, C) = 2.25. Decoupled, with the
    proximal policy equal to the current one and pi_prox / pi_behaviour = 1.5, the
    weight is min(1.5, C) = 1.5 too."""
    behaviour = torch.zeros(1, 1, dtype=torch.float64)
    logp = torch.full((1, 1), math.log(1.5), dtype=torch.float64, requires_grad=True)
    adv, mask = torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool)
    loss, _ = _ours(logp, behaviour, behaviour, adv, mask, Objective())
    (g,) = torch.autograd.grad(loss, logp)
    assert g.item() == pytest.approx(1.5, abs=TOL)

    obj = Objective(anchor="proximal", tis_cap=2.0)
    proximal = logp.detach().clone()
    w, _ = truncated_is(proximal, behaviour, mask, "token", obj.tis_cap)
    loss, _ = _ours(logp, proximal, behaviour, adv, mask, obj, w)
    (g,) = torch.autograd.grad(loss, logp)
    assert g.item() == pytest.approx(1.5, abs=TOL)


def test_clip_fraction_counts_binding_clips_only():
    """Ratios outside the clip range bind only where the advantage pushes further out:
    A > 0 with r > 1 + eps, A < 0 with r < 1 - eps."""
    ratio = torch.tensor([[2.0, 0.5, 0.5, 0.5, 1.0]], dtype=torch.float64)  # 4 of 5 outside the range
    behaviour = torch.zeros_like(ratio)
    logp = ratio.log().requires_grad_()
    mask = torch.ones_like(ratio, dtype=torch.bool)
    for a, binding in ((1.0, 0.2), (-1.0, 0.6)):
        _, m = _ours(logp, behaviour, behaviour, torch.tensor([a], dtype=torch.float64), mask, Objective())
        assert m["clip_frac"] == pytest.approx(binding)


def test_kl_is_clamped_far_from_the_reference():
    logp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[30.0, 0.5]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    obj = Objective(kl_coef=1.0, kl_clamp=10.0)
    loss, m = _ours(logp, logp.detach(), logp.detach(), torch.zeros(1, dtype=torch.float64), mask, obj, ref=ref)
    (g,) = torch.autograd.grad(loss, logp)
    k3 = math.exp(0.5) - 0.5 - 1
    assert m["kl_ref"] == pytest.approx((10.0 + k3) / 2)
    assert math.isfinite(loss.item()) and g[0, 0] == 0  # the clamped token pulls no further


def test_micro_batches_add_up_to_the_whole_batch():
    """Token weights from the batch's counts make micro-batch losses (any split,
    uneven lengths) sum to the whole batch's loss and gradient, for every aggregation."""
    logp, behaviour, _, _, rewards, mask, _ = _batch(seed=2)
    adv = group_advantages(rewards, GROUP_SIZE)
    for aggregation in ("token-mean", "sequence-mean", "token-sum-norm"):
        obj = Objective(aggregation=aggregation, norm_tokens=T)
        whole, _ = _ours(logp, behaviour, behaviour, adv, mask, obj)
        (g_whole,) = torch.autograd.grad(whole, logp)
        total_tokens, total = mask.sum().item(), 0
        for part in (slice(0, 3), slice(3, 17), slice(17, N)):
            w = token_weights(mask[part], aggregation, total_tokens, N, T).double()
            loss, _ = policy_loss(LossInputs(logp[part], behaviour[part], behaviour[part], adv[part],
                                             mask[part], w), obj)
            total = total + loss
        (g_parts,) = torch.autograd.grad(total, logp)
        assert abs(total.item() - whole.item()) < TOL and (g_parts - g_whole).abs().max() < TOL


def test_gradient_raises_the_logprob_of_advantaged_tokens_only():
    logp = torch.log(torch.full((2, 3), 0.5, dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    loss, m = _ours(logp, logp.detach(), logp.detach(), torch.tensor([1.0, -1.0], dtype=torch.float64), mask,
                    Objective())
    loss.backward()
    assert torch.all(logp.grad[0, :2] < 0) and torch.all(logp.grad[1] > 0) and logp.grad[0, 2] == 0
    assert m["clip_frac"] == 0 and m["ratio_mean"] == pytest.approx(1)


@pytest.mark.parametrize("bad", [dict(clip_low=1.0), dict(dual_clip=1.0), dict(ratio_level="group"),
                                 dict(aggregation="sum"), dict(anchor="old"), dict(tis_cap=0.0)])
def test_bad_objective_is_refused_naming_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=f"^{field} must"):
        Objective(**bad)


def test_token_budget_micro_batches_sort_by_length_and_never_exceed_the_budget():
    from rlloop.learner.policy import micro_batches

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 300, (200,), generator=g).tolist()
    batches = micro_batches(lengths, size=0, max_tokens=1024)
    assert sorted(i for b in batches for i in b) == list(range(200))  # every sample exactly once
    padded = [len(b) * max(lengths[i] for i in b) for b in batches]
    assert max(padded) <= 1024
    # longest first: little padding is computed (here under 5% of the padded tokens)
    assert 1 - sum(lengths) / sum(padded) < 0.05
    assert micro_batches([5, 9, 3], size=2, max_tokens=0) == [[0, 1], [2]]  # no budget: consecutive
    assert micro_batches([], size=0, max_tokens=64) == []
    with pytest.raises(ValueError, match="sample of 70 tokens exceeds learner.max_tokens_per_micro_batch=64"):
        micro_batches([10, 70], size=0, max_tokens=64)


def test_model_flops_of_a_step_count_matmuls_and_causal_attention():
    from rlloop.learner.flops import matmul_params, peak_flops, step_flops
    from rlloop.learner.hf_megatron import Arch

    # Qwen2.5-1.5B's shape: 1.31e9 matmul weights in the layers, 0.23e9 in the head
    arch = Arch(num_layers=28, hidden_size=1536, num_heads=12, num_kv_heads=2, head_dim=128,
                ffn_hidden_size=8960, vocab_size=151936, rms_eps=1e-6, rope_theta=1e6, max_positions=32768,
                tied=True, qkv_bias=True, qk_norm=False)
    n = matmul_params(arch)
    assert n == 28 * (1536 * (1536 + 2 * 256) + 1536 * 1536 + 3 * 1536 * 8960) + 1536 * 151936
    s = 1000
    one = step_flops(arch, [s])
    assert one == pytest.approx(3 * (2 * n * s + 2 * 28 * s * s * 1536))
    assert step_flops(arch, [s], extra_forwards=1) == pytest.approx(one * 4 / 3)
    assert peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "float32") is None  # no fp32 peak in the table
    assert peak_flops("cpu", "float32", 1.5) == 1.5e12
