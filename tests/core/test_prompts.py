from __future__ import annotations

import pytest

from dspark.errors import InvalidRequestError
from dspark.prompts import PromptFormat


class CharTokenizer:
    """Minimal tokenizer stand-in: one id per character, optional chat template."""

    def __init__(self, chat_template=None):
        self.chat_template = chat_template

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")
        return [ord(c) for c in text]


def decode(ids):
    return "".join(chr(i) for i in ids)


def test_plain_template_when_no_chat_template():
    fmt = PromptFormat()
    assert decode(fmt.encode(CharTokenizer(), "2+2?")) == "Question: 2+2?\nAnswer:"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert decode(fmt.encode(CharTokenizer(), msgs)) == "Question: a\nAnswer: b\n\nQuestion: c\nAnswer:"


def test_chat_template_used_when_present():
    assert decode(PromptFormat().encode(CharTokenizer("tpl"), "hi")) == "<user>hi<assistant>"
    assert decode(PromptFormat(mode="plain").encode(CharTokenizer("tpl"), "hi")).startswith("Question: hi")


def test_bad_prompts_and_formats():
    with pytest.raises(InvalidRequestError, match="empty prompt"):
        PromptFormat().encode(CharTokenizer(), "  ")
    with pytest.raises(InvalidRequestError, match="empty prompt"):
        PromptFormat().encode(CharTokenizer(), [])
    with pytest.raises(ValueError, match="no chat template"):
        PromptFormat(mode="chat").encode(CharTokenizer(), "x")
    with pytest.raises(ValueError, match="\\{prompt\\}"):
        PromptFormat(plain_template="no placeholder")
