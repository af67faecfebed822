"""Multi-turn rollouts, token in and token out.

An agent (`rollout.agent=module:function`) is an async function
`agent(client, episode, sampling, max_turns)` that runs one episode inside the engine
actor (`episode.problem` is what it is about): it asks
`client.complete(episode.context(), sampling)` for each model turn,
records it with `episode.model(turn)`, and adds what a tool or environment answers
with `episode.environment(client.tokens(text), text)`. The next turn's prompt is the previous prompt plus
exactly the tokens that were sampled and inserted, never a re-tokenised transcript,
so the learner trains on what the model saw. Environment tokens carry no loss
(`loss_mask` False) and log-prob 0; the episode's text, which the reward scores, is
the model's last turn.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlloop.actors.engine_io import Generation, Sampling
from rlloop.plugins import import_function


@dataclass(frozen=True)
class Turn:
    """One model turn as sampled."""
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str | None
    stop: str | None  # the stop string that ended it, if one did
    version_start: int
    version_end: int


class TurnClient:
    """An agent's view of the engine it runs on."""

    def __init__(self, engine, tokenizer):
        self._engine, self.tokenizer = engine, tokenizer

    async def complete(self, prompt_ids: list[int], sampling: Sampling) -> Turn:
        final = None
        async for out, start in self._engine._run(list(prompt_ids), sampling):
            final = (out, start)
        out, start = final
        gen = self._engine._generation(prompt_ids, out, start)
        stop = out.outputs[0].stop_reason
        return Turn(gen.token_ids, gen.logprobs, gen.text, gen.finish_reason, stop if isinstance(stop, str) else None,
                    gen.version_start, gen.version_end)

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids


class Episode:
    """`problem`: what the prompt asks (rlloop.tasks.problem.Problem: id, prompt,
    answer), for an environment that needs it; the model sees only the prompt."""

    def __init__(self, prompt_ids: list[int], max_tokens: int, problem=None):
        self.prompt_ids, self.max_tokens, self.problem = list(prompt_ids), max_tokens, problem
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.loss_mask: list[bool] = []
        self.conversation: list[dict] = []
        self.turns: list[Turn] = []

    def context(self) -> list[int]:
        """The prompt of the next model turn: the first prompt and every token since."""
        return self.prompt_ids + self.token_ids

    def room(self) -> int:
        """Tokens the episode may still add (rollout.max_tokens for all turns together)."""
        return self.max_tokens - len(self.token_ids)

    def model(self, turn: Turn) -> None:
        self.turns.append(turn)
        self.token_ids += turn.token_ids
        self.logprobs += turn.logprobs or [0.0] * len(turn.token_ids)
        self.loss_mask += [True] * len(turn.token_ids)
        self.conversation.append({"role": "assistant", "content": turn.text, "token_ids": turn.token_ids,
                                  "logprobs": turn.logprobs, "version": turn.version_end})

    def environment(self, token_ids: list[int], text: str, role: str = "tool") -> None:
        self.token_ids += token_ids
        self.logprobs += [0.0] * len(token_ids)
        self.loss_mask += [False] * len(token_ids)
        self.conversation.append({"role": role, "content": text, "token_ids": token_ids})

    def generation(self) -> Generation:
        if not self.turns:
            raise ValueError("the agent returned an episode without a model turn")
        last = self.turns[-1]
        return Generation(self.prompt_ids, self.token_ids, last.text, self.logprobs, last.finish_reason,
                          self.turns[0].version_start, last.version_end, self.loss_mask, self.conversation)


async def run_agent(agent: str, client: TurnClient, prompt_ids: list[int], sampling: Sampling,
                    max_turns: int, problem=None) -> Generation:
    episode = Episode(prompt_ids, sampling.max_tokens, problem)
    await import_function(agent, "agent")(client, episode, sampling, max_turns)
    return episode.generation()
