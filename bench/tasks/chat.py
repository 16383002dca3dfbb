"""How a model's own tokenizer frames a question: its chat template where it has one, plain text otherwise.

A prompt is assembled from token ids (the template's framing, the instruction, the haystack, the question, the
start of the answer), so its length is exact in the model's tokenizer whatever the text.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Stands for the user's message while the chat template is rendered; split on afterwards.
_SLOT = "\u0000PREFIXKV-USER-MESSAGE\u0000"


def encode(tokenizer, text: str) -> list[int]:
    """`text` as token ids, without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class PromptFormat:
    """Token ids around a user message: `before` (the template's opening, or the tokenizer's BOS) and `after` (the
    end of the user turn and the opening of the assistant's, or a newline). `chat` says whether a chat template
    framed it."""

    before: tuple[int, ...]
    after: tuple[int, ...]
    chat: bool

    @classmethod
    def of(cls, tokenizer) -> PromptFormat:
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": _SLOT}], tokenize=False, add_generation_prompt=True
            )
            head, found, tail = rendered.partition(_SLOT)
            if found:
                return cls(tuple(encode(tokenizer, head)), tuple(encode(tokenizer, tail)), True)
        with_specials = tokenizer("x", add_special_tokens=True)["input_ids"]
        plain = tokenizer("x", add_special_tokens=False)["input_ids"]
        bos = with_specials[: len(with_specials) - len(plain)] if with_specials[-len(plain):] == plain else []
        return cls(tuple(bos), tuple(encode(tokenizer, "\n")), False)
