"""How far an update moves the log-probs of the requests it lands in the middle of.

With weights.kv_after_update=keep, a request in flight keeps the KV cache the old
weights computed: its next tokens come from the new weights attending to old keys and
values, a mix no single version would sample. The meter re-scores a few such requests
when they finish: one prefill of prompt + tokens on the weights now loaded, and the gap
between the log-prob the engine reported for each token generated after the update and
the log-prob those weights give it. With recompute the gap is rounding only; with keep
it is what the mix cost. Tokens generated before the update were sampled by the old
weights and are not counted: their gap is the update itself, not the KV cache.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class _Landed:
    version: int  # the update that landed while the request was in flight
    generated: int  # tokens the request had generated when it landed


class KvGapMeter:
    """`per_update`: requests re-scored per update (weights.kv_gap_requests; 0 is off).
    `score(token_ids)`: the current weights' log-prob of each token after the first;
    `version_now()`: the engine's weight version."""

    def __init__(self, per_update: int, score: Callable[[list[int]], Awaitable[list[float]]],
                 version_now: Callable[[], int]):
        self.per_update = per_update
        self._score, self._version_now = score, version_now
        self._landed: dict[str, _Landed] = {}  # request id -> the latest update it spanned
        self._tasks: set[asyncio.Task] = set()
        self._gaps: list[float] = []  # per token, measured since the last update

    def update_landed(self, version: int, generated: dict[str, int]) -> dict:
        """An update to `version` has loaded while `generated` (request id -> tokens out)
        were in flight; mark up to per_update of them. Returns what was measured for
        the requests the previous update landed in (see `measured`) and starts over."""
        for request_id, n in list(generated.items())[:self.per_update]:
            self._landed[request_id] = _Landed(version, n)
        measured, self._gaps = self.measured(), []
        return measured

    def finished(self, request_id: str, prompt_ids: list[int], token_ids: list[int],
                 logprobs: list[float], version: int) -> None:
        """A request is done: re-score it in the background if an update landed in it,
        it reported log-probs and no later update has landed since."""
        landed = self._landed.pop(request_id, None)
        if landed is None or landed.version != version or not logprobs or landed.generated >= len(token_ids):
            return
        task = asyncio.create_task(self._measure(landed, prompt_ids, token_ids, logprobs, version))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _measure(self, landed: _Landed, prompt_ids, token_ids, logprobs, version) -> None:
        now = await self._score(list(prompt_ids) + list(token_ids))
        if self._version_now() != version:  # an update landed during the prefill: mixed again
            return
        after = now[len(prompt_ids) - 1:]  # log-probs of the generated tokens
        self._gaps.extend(abs(after[i] - logprobs[i]) for i in range(landed.generated, len(token_ids)))

    def measured(self) -> dict:
        """Tokens re-scored since the last update, and their mean and largest gap."""
        gaps = self._gaps
        return {"tokens": len(gaps), "mean": sum(gaps) / len(gaps) if gaps else None,
                "max": max(gaps, default=None)}

    async def settle(self) -> None:
        """Wait for the re-scorings under way (before the engine core goes away)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
