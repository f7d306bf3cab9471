"""What a request asks of a context window, before and after its tokens are counted."""

from __future__ import annotations

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
