"""Rewards a run can name in config (`rollout.reward=module:function`): any function
`(completion: str, answer: str) -> float`. The built-in arithmetic task's default is
`numeric_reward` (the completion starts with the number); `math_reward` finds a
final answer anywhere in a reasoning completion and checks it with math-verify (the
verifier TRL and open-r1 use)."""
from __future__ import annotations

import re
from collections.abc import Callable

from rlloop.plugins import import_function

Reward = Callable[[str, str], float]

_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)")
_GSM_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_MARKED = re.compile(r"####\s*-?[\d,]*\.?\d|\\boxed\{[^{}]*\S[^{}]*\}|answer is\s*:?\s*\$?-?[\d.,]*\d", re.IGNORECASE)
FORMAT_WEIGHT = 0.1  # math_format_reward: the share of the reward paid for the format alone
# A final answer sits at the end of a completion; parsing only the tail bounds the
# verifier's work (it runs without its signal timeout, which needs the main thread).
_TAIL_CHARS = 512


def numeric_reward(completion: str, answer: str) -> float:
    """1.0 when the completion starts with the answer's number, else 0.0."""
    m = _NUMBER.match(completion)
    if not m:
        return 0.0
    try:
        return float(abs(float(m.group(1)) - float(answer)) < 1e-6)
    except ValueError:
        return 0.0


def math_reward(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer equals `answer` mathematically: a GSM8K
    `#### N` line, else what math-verify extracts (`\\boxed{...}`, "the answer is N",
    the last number or expression), compared as numbers or expressions."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    tail = completion[-_TAIL_CHARS:]
    final = _GSM_FINAL.findall(tail)
    if final:
        tail = final[-1].replace(",", "")
    found = parse(tail, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)
    if not found:
        return 0.0
    gold = parse(answer, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)
    return float(bool(gold) and verify(gold, found, timeout_seconds=None))


def format_reward(completion: str, answer: str) -> float:
    """1.0 when the completion marks a final answer (`#### N`, `\\boxed{...}` or "the
    answer is N"), right or wrong; `answer` is unused."""
    return float(bool(_MARKED.search(completion[-_TAIL_CHARS:])))


def math_format_reward(completion: str, answer: str) -> float:
    """math_reward, with FORMAT_WEIGHT of it paid for a marked final answer: 1.0 right,
    0.1 marked but wrong, 0.0 neither."""
    correct = math_reward(completion, answer)
    return correct if correct else FORMAT_WEIGHT * format_reward(completion, answer)


def resolve_reward(spec: str) -> Reward:
    """The reward named "module:function"; ValueError if it does not import."""
    return import_function(spec, "reward")
