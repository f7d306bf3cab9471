"""What a request asks of a context window, before and after its tokens are counted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptShape:
    """The size facts of a request's prompt that need no tokenizer.

    `text_bytes` is the UTF-8 length of every text the engine will tokenize (message
    contents, tool definitions, the completion prompt); `token_ids` counts prompt
    tokens given as ids, which are exact already.
    """

    text_bytes: int
    messages: int = 0
    token_ids: int = 0
    bounded: bool = True  # False when the prompt has parts no byte bound covers (tools, images)


@dataclass(frozen=True)
class Needs:
    """Context a request needs: its prompt tokens plus the answer's reserve."""

    prompt_tokens: int
    reserve: int
    # "exact": counted by the model's tokenizer; "bound": a proven upper bound;
    # "estimate": a guess, to be counted exactly on an engine of the model before use.
    method: str = "exact"

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.reserve

    @property
    def exact(self) -> bool:
        """Good enough to decide on: counted, or bounded from above."""
        return self.method != "estimate"


# Tokens a tokenizer may add beyond one per byte of text: BOS, EOS, a leading space marker.
BOUND_SLACK = 4


def byte_bound(kind: str, shape: PromptShape, template_bound: Callable[[int, int], int] | None) -> int | None:
    """An upper bound on the prompt's tokens for tokenizers that spend at least one byte
    per token (byte-level BPE, SentencePiece with byte fallback), or None.

    Chat prompts also carry the chat template's own tokens: `template_bound(text_bytes,
    messages)` bounds them, as measured on the running engine.
    """
    if not shape.bounded:
        return None
    if kind == "chat":
        return template_bound(shape.text_bytes, shape.messages) if template_bound else None
    return shape.text_bytes + shape.token_ids + BOUND_SLACK
