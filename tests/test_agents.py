"""Multi-turn episodes without an engine: the calculator's arithmetic and format, an
episode's bookkeeping, and the learner giving tool tokens no loss at all."""
import dataclasses

import pytest
import torch

from rlloop.agents.calculator import demonstration, evaluate
from rlloop.agents.episode import Episode, Turn
from rlloop.learner.hf_learner import HFLearner
from rlloop.learner.policy import LearnerConfig, Sample
from rlloop.models.tiny import build_tiny_model


@pytest.mark.parametrize("expression, value", [
    ("37*58", "2146"), ("3*(4+5)", "27"), ("7/2", "3.5"), ("-4+1", "-3"), ("10/0", "error"), ("2**100", "error"),
    ("__import__('os')", "error"), ("1+", "error"), ("x*2", "error"), ("9" * 70, "error")])
def test_the_calculator_evaluates_arithmetic_and_nothing_else(expression, value):
    assert evaluate(expression) == value


def test_a_demonstration_calls_reads_and_answers():
    assert demonstration("12*3=", "36") == "<calc>12*3</calc>=36\n36"


def _turn(ids, text, stop=None, versions=(1, 2)):
    return Turn(ids, [-0.5] * len(ids), text, "stop", stop, *versions)


def test_an_episode_keeps_every_token_in_order_and_masks_the_environment():
    ep = Episode([7, 8], max_tokens=20)
    ep.model(_turn([1, 2, 3], "<c>", stop="</c>", versions=(1, 1)))
    assert ep.context() == [7, 8, 1, 2, 3] and ep.room() == 17
    ep.environment([4, 5], "=9")
    ep.model(_turn([6], "9", versions=(1, 2)))
    g = ep.generation()
    assert g.token_ids == [1, 2, 3, 4, 5, 6] and g.loss_mask == [True] * 3 + [False] * 2 + [True]
    assert g.logprobs == [-0.5] * 3 + [0.0, 0.0] + [-0.5] and g.text == "9"  # the reward reads the last turn
    assert (g.version_start, g.version_end) == (1, 2)
    assert [t["role"] for t in g.conversation] == ["assistant", "tool", "assistant"]
    with pytest.raises(ValueError, match="without a model turn"):
        Episode([1], 4).generation()


def test_tool_tokens_carry_zero_loss_weight(tmp_path):
    """One GRPO step from the same weights: changing what the behaviour log-probs say
    about the environment's tokens changes nothing; changing one model token's does."""
    model = build_tiny_model(tmp_path / "m", seed=0)
    prompt, tokens = [5, 6, 7], [10, 11, 12, 13, 14, 15, 16, 17]
    mask = (True, True, True, False, False, False, True, True)

    def stepped(logprobs):
        learner = HFLearner(LearnerConfig(model=str(model), lr=1e-2, seed=0, device="cpu"))
        samples = [Sample(prompt, tokens, logprobs, 1.0, 1.0, 0, 0, mask),
                   Sample(prompt, tokens[:4], logprobs[:4], -1.0, 0.0, 0, 0, mask[:4])]
        metrics = learner.train_step(samples)
        return torch.cat([p.detach().flatten() for p in learner.model.parameters()]), metrics

    base = [-2.0, -1.5, -1.0, -3.0, -3.0, -3.0, -0.5, -0.25]
    reference, _ = stepped(base)
    env_changed, _ = stepped([*base[:3], -9.0, 0.0, -0.1, *base[6:]])
    model_changed, _ = stepped([*base[:6], -4.0, base[7]])
    assert torch.equal(reference, env_changed)
    assert not torch.equal(reference, model_changed)


def test_a_sample_without_a_mask_trains_every_completion_token(tmp_path):
    model = build_tiny_model(tmp_path / "m", seed=0)
    learner = HFLearner(LearnerConfig(model=str(model), seed=0, device="cpu"))
    s = Sample([5, 6], [10, 11, 12], [-1.0] * 3, 1.0, 1.0, 0, 0)
    _, comp, behaviour, _ = learner._batch([s, dataclasses.replace(s, loss_mask=(True, False, True))])
    assert comp[0].sum() == 3 and comp[1].tolist()[1:4] == [True, False, True]
    assert behaviour[1, 1:4].tolist() == [-1.0, -1.0, -1.0]
