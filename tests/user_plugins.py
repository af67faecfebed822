"""A user's own reward and rollout, named in config as module:function
(tests/test_plugins.py runs them)."""
from rlloop.rollout import Rollouts
from rlloop.tasks.rewards import numeric_reward


def doubled_reward(completion: str, answer: str) -> float:
    return 2.0 * numeric_reward(completion, answer)


class InOrderRollouts(Rollouts):
    """The training problems in their order, cycling, instead of drawn at random."""

    def __init__(self, cfg, fleet, tokenizer):
        super().__init__(cfg, fleet, tokenizer)
        self.drawn = 0

    def draw(self, n: int):
        problems = self.cfg.problems
        batch = [problems[(self.drawn + i) % len(problems)] for i in range(n)]
        self.drawn += n
        return batch
