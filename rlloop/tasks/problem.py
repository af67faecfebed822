"""A problem of a verifiable-reward task, and the held-out split that is never trained on."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    id: str      # stable across runs: the file and line of a JSONL row (or its own "id"), the index of a generated one
    prompt: str  # the question as the user wrote it; rlloop/tasks/prompts.py makes the model's prompt of it
    answer: str  # the reference answer the reward compares against


class DatasetError(ValueError):
    """A data file that cannot be read as problems; the message names the file and line."""


def split_eval(problems: list[Problem], fraction: float, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Hold out `fraction` of the distinct prompts (seeded): (train, eval). Splitting by
    prompt, not by row, keeps a question that appears twice out of training entirely."""
    distinct = list(dict.fromkeys(p.prompt for p in problems))
    random.Random(seed).shuffle(distinct)
    held = set(distinct[:max(1, round(fraction * len(distinct)))])
    return without_prompts(problems, held), first_of_each([p for p in problems if p.prompt in held])


def without_prompts(problems: list[Problem], prompts: set[str]) -> list[Problem]:
    return [p for p in problems if p.prompt not in prompts]


def first_of_each(problems: list[Problem]) -> list[Problem]:
    """One problem per distinct prompt: an eval scores each question once."""
    return list({p.prompt: p for p in reversed(problems)}.values())[::-1]
