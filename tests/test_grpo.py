"""GRPO pieces as pure functions, and the tasks' reward checkers."""
import json

import pytest
import torch

from rlloop.learner.grpo import group_advantages, grpo_loss
from rlloop.tasks.arithmetic import arithmetic_problems, jsonl_problems, numeric_reward


def test_group_advantages_are_centred_per_group():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(r, 4)
    assert torch.allclose(adv.view(2, 4).mean(1), torch.zeros(2), atol=1e-6)
    assert adv[0] > 0 > adv[1] and torch.all(adv[4:] == 0)
    assert torch.allclose(group_advantages(r, 4, normalize_std=False)[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_loss_gradient_raises_logprob_of_advantaged_tokens():
    logp = torch.log(torch.full((2, 3), 0.5)).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    loss, m = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask)
    loss.backward()
    assert torch.all(logp.grad[0, :2] < 0) and torch.all(logp.grad[1] > 0) and logp.grad[0, 2] == 0
    assert m["clip_frac"] == 0 and abs(m["ratio_mean"] - 1) < 1e-6


def test_clipping_stops_gradient_beyond_the_trust_region():
    behaviour = torch.zeros(1, 2)
    logp = torch.tensor([[0.5, 0.0]], requires_grad=True)  # ratio e^0.5 > 1.2 on token 0
    loss, m = grpo_loss(logp, behaviour, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool))
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] < 0 and m["clip_frac"] == 0.5


def test_aggregations_differ_on_uneven_lengths_and_unknown_is_refused():
    logp = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, 0.5])
    tok, _ = grpo_loss(logp, logp.detach(), adv, mask, aggregation="token-mean")
    seq, _ = grpo_loss(logp, logp.detach(), adv, mask, aggregation="sequence-mean")
    assert tok.item() == pytest.approx(-(1 + 4 * 0.5) / 5) and seq.item() == pytest.approx(-(1 + 0.5) / 2)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(logp, logp.detach(), adv, mask, aggregation="sum")


def test_kl_to_reference_is_zero_at_reference_and_positive_elsewhere():
    ref = torch.log_softmax(torch.randn(2, 5), -1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    _, m0 = grpo_loss(ref.clone(), ref, torch.zeros(2), mask, ref_logp=ref, kl_coef=0.1)
    _, m1 = grpo_loss(ref + 0.3, ref, torch.zeros(2), mask, ref_logp=ref, kl_coef=0.1)
    assert m0["kl_ref"] == pytest.approx(0, abs=1e-7) and m1["kl_ref"] > 0


def test_numeric_reward_and_tasks(tmp_path):
    assert numeric_reward("7", "7") == 1 and numeric_reward(" 12 apples", "12") == 1
    assert numeric_reward("71", "7") == 0 and numeric_reward("x", "7") == 0
    probs = arithmetic_problems(50, seed=3)
    assert all(numeric_reward(str(eval(p.prompt[:-1])), p.answer) == 1 for p in probs)
    f = tmp_path / "gsm.jsonl"
    f.write_text(json.dumps({"question": "2 and 3?", "answer": "2+3=5\n#### 1,005"}) + "\n")
    (p,) = jsonl_problems(f)
    assert p.answer == "1005" and "2 and 3?" in p.prompt
    f.write_text(json.dumps({"q": 1}) + "\n")
    with pytest.raises(ValueError, match="question"):
        jsonl_problems(f)
