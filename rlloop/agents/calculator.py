"""The built-in tool task: arithmetic with a calculator.

The model writes a call, `<calc>37*58</calc>`; the environment answers `=2146` and a
newline; the model continues, up to max_turns model turns, and its last turn is its
answer (scored by the run's reward, numeric_reward: the turn starts with the number).
`demonstration` is the SFT warm-up's target for a problem: a call, the environment's
answer (trained on during SFT only) and the final answer.
"""
from __future__ import annotations

import ast
import operator
from dataclasses import replace

CALL, END = "<calc>", "</calc>"
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


async def calculator(client, episode, sampling, max_turns: int) -> None:
    for _ in range(max_turns):
        if episode.room() <= 0:
            return
        turn = await client.complete(episode.context(), replace(sampling, max_tokens=episode.room(), stop=(END,)))
        episode.model(turn)
        if turn.stop != END:  # an answer, not a call
            return
        text = f"={evaluate(turn.text.rsplit(CALL, 1)[-1].removesuffix(END))}\n"
        episode.environment(client.tokens(text), text)


def evaluate(expression: str) -> str:
    """The value of + - * / over numbers and parentheses, or "error" (nothing else is
    evaluated: the model's text never reaches eval)."""
    def value(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        raise ValueError("not arithmetic")
    if len(expression) > 64:
        return "error"
    try:
        result = value(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return "error"
    return str(int(result)) if float(result).is_integer() else f"{result:.4g}"


def demonstration(question: str, answer: str) -> str:
    """'37*58=' -> '<calc>37*58</calc>=2146\\n2146'."""
    expression = question.rstrip("=").strip()
    return f"{CALL}{expression}{END}={evaluate(expression)}\n{answer}"
