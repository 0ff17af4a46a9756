"""Prompt formatting: the tokenizer's chat template when it has one, else a plain template.

The embedded Gemma 3 270M is a base model without a chat template, so it gets a plain
``Question: ...\\nAnswer:`` format by default. Training, evaluation and serving all go
through :class:`PromptFormat` so a drafter sees the same token layout everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from dspark.errors import InvalidRequestError

Message = dict[str, str]
DEFAULT_PLAIN_TEMPLATE = "Question: {prompt}\nAnswer:"


@dataclass(frozen=True)
class PromptFormat:
    """How user messages become prompt token ids.

    mode: ``auto`` uses the chat template if the tokenizer has one, else ``plain``.
    plain_template: must contain ``{prompt}``; used per user turn in ``plain`` mode.
    turn_separator: joins earlier turns (with their assistant replies) in ``plain`` mode.
    """

    mode: Literal["auto", "chat", "plain"] = "auto"
    plain_template: str = DEFAULT_PLAIN_TEMPLATE
    turn_separator: str = "\n\n"

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "chat", "plain"):
            raise ValueError(f"prompt_format.mode must be auto, chat or plain, got {self.mode!r}")
        if "{prompt}" not in self.plain_template:
            raise ValueError(
                f"prompt_format.plain_template must contain '{{prompt}}', got {self.plain_template!r}"
            )

    def uses_chat_template(self, tokenizer: Any) -> bool:
        has = getattr(tokenizer, "chat_template", None) is not None
        if self.mode == "chat" and not has:
            raise ValueError("prompt_format.mode=chat but the tokenizer has no chat template")
        return self.mode == "chat" or (self.mode == "auto" and has)

    def render_plain(self, messages: list[Message]) -> str:
        parts: list[str] = []
        for m in messages:
            role, content = m.get("role"), m.get("content", "")
            if role == "user":
                parts.append(self.plain_template.format(prompt=content))
            elif role == "assistant":
                if not parts:
                    raise InvalidRequestError("an assistant message must follow a user message")
                parts[-1] += " " + content
            elif role == "system":
                parts.append(content)
            else:
                raise InvalidRequestError(f"unknown message role {role!r}")
        return self.turn_separator.join(parts)

    def encode(self, tokenizer: Any, prompt: str | list[Message]) -> list[int]:
        """Token ids of a prompt (a plain string is one user turn), ready for generation."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not messages or not any(m.get("content", "").strip() for m in messages):
            raise InvalidRequestError("empty prompt: give at least one non-empty message")
        if messages[-1].get("role") != "user":
            raise InvalidRequestError("the last message must be a user turn")
        if self.uses_chat_template(tokenizer):
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in tokenizer(self.render_plain(messages))["input_ids"]]
