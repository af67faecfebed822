"""Verifiable-reward tasks: the built-in arithmetic task (generated in code) and
GSM8K-style question/answer prompts from a local JSONL file."""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)")
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


def jsonl_problems(path: str | Path, prompt_template: str = "{question}\nAnswer: ") -> list[Problem]:
    """GSM8K-style lines: {"question": ..., "answer": "... #### 42"} (or a bare number)."""
    problems = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if "question" not in row or "answer" not in row:
            raise ValueError(f"{path}:{i + 1}: needs 'question' and 'answer' keys")
        answer = str(row["answer"])
        m = _GSM_ANSWER.search(answer)
        final = (m.group(1) if m else answer).replace(",", "").strip()
        problems.append(Problem(prompt_template.format(question=row["question"]), final))
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def numeric_reward(completion: str, answer: str) -> float:
    """1.0 when the completion starts with the answer's number, else 0.0."""
    m = _NUMBER.match(completion)
    if not m:
        return 0.0
    try:
        return float(abs(float(m.group(1)) - float(answer)) < 1e-6)
    except ValueError:
        return 0.0
