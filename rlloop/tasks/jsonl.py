"""GSM8K-style problems from a local JSONL file: one {"question": ..., "answer": ...}
object per line (an optional "id" names the row). The answer is its final number after
"####" when it has one (GSM8K's format), else the whole string."""
from __future__ import annotations

import json
import re
from pathlib import Path

from rlloop.tasks.problem import DatasetError, Problem

_GSM_ANSWER = re.compile(r"####\s*(-?[\d,]+(?:\.\d+)?)")


def jsonl_problems(path: str | Path) -> list[Problem]:
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
        problems.append(Problem(str(row.get("id", f"{Path(path).name}:{i}")), str(row["question"]), final))
    if not problems:
        raise DatasetError(f"{path}: no problems (the file has no JSON lines)")
    return problems
