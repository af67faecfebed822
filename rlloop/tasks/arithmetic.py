"""The built-in arithmetic task, generated in code: "a+b=" -> the number. Its reward is
rewards.numeric_reward."""
from __future__ import annotations

import random

from rlloop.tasks.problem import Problem


def arithmetic_problems(n: int, seed: int, max_operand: int = 9, ops: str = "+") -> list[Problem]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        out.append(Problem(f"arithmetic:{i}", f"{a}{op}{b}=", str(value)))
    return out
