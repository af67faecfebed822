"""The KV gap meter's bookkeeping: which requests are re-scored, which tokens count."""
import asyncio

from rlloop.actors.kv_gap import KvGapMeter


def _meter(version, per_update=2):
    async def score(ids):  # every token's log-prob is -1 under the "current" weights
        return [-1.0] * (len(ids) - 1)

    return KvGapMeter(per_update, score, lambda: version[0])


def test_tokens_after_the_update_are_re_scored_for_at_most_per_update_requests():
    async def run():
        version = [1]
        meter = _meter(version)
        assert meter.update_landed(1, {"a": 3, "b": 0, "c": 5}) == {"tokens": 0, "mean": None, "max": None}
        meter.finished("a", [7, 7], [1, 2, 3, 4, 5], [-1.0, -1.0, -1.0, -1.5, -3.0], version=1)
        meter.finished("b", [7], [1, 2], [-1.25, -1.25], version=1)
        meter.finished("c", [7], [1, 2, 3], [-9.0] * 3, version=1)  # not marked: over per_update
        await meter.settle()
        assert meter.measured() == {"tokens": 4, "mean": (0.5 + 2.0 + 0.25 + 0.25) / 4, "max": 2.0}
        version[0] = 2
        assert meter.update_landed(2, {})["tokens"] == 4 and meter.measured()["tokens"] == 0
    asyncio.run(run())


def test_a_request_a_later_update_landed_in_again_or_without_logprobs_is_not_scored():
    async def run():
        version = [1]
        meter = _meter(version)
        meter.update_landed(1, {"a": 1, "b": 1})
        version[0] = 2
        meter.finished("a", [7], [1, 2, 3], [-2.0] * 3, version=2)  # landed at 1, finished at 2
        meter.finished("b", [7], [1, 2, 3], [], version=1)  # no log-probs reported
        await meter.settle()
        assert meter.measured()["tokens"] == 0
    asyncio.run(run())
