"""Verifiable-reward tasks: the built-in arithmetic task (generated in code) and
GSM8K-style question/answer prompts from a local JSONL file. Their rewards are in
rewards.py."""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

_GSM_ANSWER = re.compile(r"####\s*(-?[\d,]+(?:\.\d+)?)")


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str  # the number a correct completion starts with


def arithmetic_problems(n: int, seed: int, max_operand: int = 9, ops: str = "+") -> list[Problem]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        out.append(Problem(f"{a}{op}{b}=", str(value)))
    return out


class DatasetError(ValueError):
    """A data file that cannot be read as problems; the message names the file and line."""


def jsonl_problems(path: str | Path, prompt_template: str = "{question}\nAnswer: ") -> list[Problem]:
    """GSM8K-style lines: {"question": ..., "answer": "... #### 42"} (or a bare number)."""
    problems = []
    for i, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{i}: expected a JSON object with 'question' and 'answer', "
                               f"got {type(row).__name__}")
        missing = [k for k in ("question", "answer") if k not in row]
        if missing:
            raise DatasetError(f"{path}:{i}: missing {' and '.join(repr(k) for k in missing)}")
        answer = str(row["answer"])
        m = _GSM_ANSWER.search(answer)
        final = (m.group(1) if m else answer).replace(",", "").strip()
        problems.append(Problem(prompt_template.format(question=row["question"]), final))
    if not problems:
        raise DatasetError(f"{path}: no problems (the file has no JSON lines)")
    return problems
