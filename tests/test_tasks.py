"""The tasks' problems and reward checkers, and GRPO's group advantages."""
import json

import pytest
import torch

from rlloop.learner.grpo import group_advantages
from rlloop.tasks.arithmetic import arithmetic_problems
from rlloop.tasks.jsonl import jsonl_problems
from rlloop.tasks.problem import split_eval
from rlloop.tasks.prompts import PromptEncoder, PromptFormat
from rlloop.tasks.rewards import (FORMAT_WEIGHT, format_reward, math_format_reward, math_reward, numeric_reward,
                                  resolve_reward)


def test_group_advantages_are_centred_per_group():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(r, 4)
    assert torch.allclose(adv.view(2, 4).mean(1), torch.zeros(2), atol=1e-6)
    assert adv[0] > 0 > adv[1] and torch.all(adv[4:] == 0)
    assert torch.allclose(group_advantages(r, 4, normalize_std=False)[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_numeric_reward_and_tasks(tmp_path):
    assert numeric_reward("7", "7") == 1 and numeric_reward(" 12 apples", "12") == 1
    assert numeric_reward("71", "7") == 0 and numeric_reward("x", "7") == 0
    probs = arithmetic_problems(50, seed=3)
    assert all(numeric_reward(str(eval(p.prompt[:-1])), p.answer) == 1 for p in probs)
    f = tmp_path / "gsm.jsonl"
    f.write_text(json.dumps({"question": "2 and 3?", "answer": "2+3=5\n#### 1,005"}) + "\n")
    (p,) = jsonl_problems(f)
    assert (p.id, p.prompt, p.answer) == ("gsm.jsonl:1", "2 and 3?", "1005")
    f.write_text(json.dumps({"q": 1}) + "\n")
    with pytest.raises(ValueError, match="question"):
        jsonl_problems(f)


@pytest.mark.parametrize("completion, answer, reward", [
    ("3 + 4 = 7 apples, so 2 more is 9.\n#### 9", "9", 1.0),
    ("Adding them: $1{,}000 + 5$.\n#### 1,005", "1005", 1.0),
    ("so the total is \\boxed{42}", "42", 1.0),
    ("The answer is 42.", "42", 1.0),
    ("halve it: \\boxed{\\frac{3}{4}}", "0.75", 1.0),
    ("first 12, then 30, so 42", "42", 1.0),     # the last number
    ("The answer is 41.", "42", 0.0),
    ("42 is tempting, but it is 43", "42", 0.0),  # an earlier number is not the answer
    ("I do not know", "42", 0.0),
    ("\\boxed{", "42", 0.0),                      # malformed
    ("", "42", 0.0),
])
def test_math_reward_checks_the_final_answer_in_any_format(completion, answer, reward):
    assert math_reward(completion, answer) == reward


def test_rewards_are_named_by_module_and_function():
    assert resolve_reward("rlloop.tasks.rewards:math_reward") is math_reward
    for bad in ("rlloop.tasks.rewards:nope", "no_such_module:f", "rlloop.tasks.rewards"):
        with pytest.raises(ValueError, match="module:function"):
            resolve_reward(bad)


def test_format_rewards_pay_for_a_marked_final_answer():
    assert format_reward("so #### 12", "7") == 1 and format_reward("\\boxed{x+1}", "7") == 1
    assert format_reward("The answer is 5.", "7") == 1 and format_reward("it is 7", "7") == 0
    assert format_reward("\\boxed{}", "7") == 0
    assert math_format_reward("so #### 7", "7") == 1.0
    assert math_format_reward("so #### 8", "7") == FORMAT_WEIGHT
    assert math_format_reward("no idea", "7") == 0.0


def test_the_eval_split_holds_out_whole_questions_and_is_seeded():
    problems = arithmetic_problems(300, seed=0)  # 100 distinct sums, drawn with repeats
    train, held = split_eval(problems, 0.2, seed=1)
    assert not {p.prompt for p in train} & {p.prompt for p in held}, "a held-out question is never trained on"
    assert len(held) == len({p.prompt for p in held}) == round(0.2 * len({p.prompt for p in problems}))
    assert len(train) + sum(p.prompt == h.prompt for h in held for p in problems) == len(problems)
    assert [p.id for p in split_eval(problems, 0.2, seed=1)[1]] == [p.id for p in held]
    assert [p.id for p in split_eval(problems, 0.2, seed=2)[1]] != [p.id for p in held]


def test_prompts_follow_the_tokenizer_chat_template_or_the_raw_format(own_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(own_model[0])
    chat = PromptEncoder(tok, PromptFormat(system_prompt="Be brief."))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.text("2+2?") == want == "<s><|system|>\nBe brief.</s>\n<|user|>\n2+2?</s>\n<|assistant|>\n"
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert chat.ids("2+2?") == list(ids) and chat.ids("2+2?")[0] == tok.bos_token_id
    raw = PromptEncoder(tok, PromptFormat(template="Q: {question}\nA: ", chat_template="none"))
    assert raw.text("2+2?") == "Q: 2+2?\nA: "
    own = PromptEncoder(tok, PromptFormat(chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}"))
    assert own.text("2+2?") == "[2+2?]"
