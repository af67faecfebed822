"""What the model sees: a problem's question as a chat (the tokenizer's own template,
or one given in config) or as raw text through `rollout.prompt_template`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptFormat:
    template: str = "{question}"    # without a chat template: the prompt text of a question
    chat_template: str = "auto"     # auto: the tokenizer's own, if it has one | none: raw | Jinja text
    system_prompt: str | None = None  # with a chat template: a system message before the question


class PromptEncoder:
    """A problem -> its prompt text and token ids, the same for rollout, SFT and eval."""

    def __init__(self, tokenizer, fmt: PromptFormat):
        self.tokenizer, self.fmt = tokenizer, fmt
        template = {"auto": tokenizer.chat_template, "none": None}.get(fmt.chat_template, fmt.chat_template)
        self.chat_template: str | None = template

    def text(self, question: str) -> str:
        if self.chat_template is None:
            return self.fmt.template.format(question=question)
        messages = [{"role": "user", "content": question}]
        if self.fmt.system_prompt:
            messages.insert(0, {"role": "system", "content": self.fmt.system_prompt})
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def ids(self, question: str) -> list[int]:
        # The template's text already holds its special tokens (BOS, role markers).
        return self.tokenizer(self.text(question), add_special_tokens=False).input_ids
