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
    prompts: int = 1  # prompts that run as separate sequences (a list of prompts); the largest is sized


@dataclass(frozen=True)
class Needs:
    """Context a request needs: its prompt tokens plus the answer's reserve."""

    prompt_tokens: int
    reserve: int
    # "exact": counted by the model's tokenizer; "bound": a proven upper bound;
    # "estimate": a guess, to be counted exactly on an engine of the model before use;
    # "unbounded": the body's size, which bounds nothing the engine's template adds (it
    # then runs alone on a shared cache; the engine's own count upgrades it if need be).
    method: str = "exact"
    # Sequences the engine runs for it (`n` answers, several prompts): each holds its
    # prompt (the largest one's tokens stand for all) and its answer's reserve.
    sequences: int = 1

    @property
    def total(self) -> int:
        """Context one sequence needs: what one slot must hold."""
        return self.prompt_tokens + self.reserve

    def shared_total(self, slots: int) -> int:
        """Context its sequences hold together on a unified KV cache; the engine runs at
        most `slots` of them at once."""
        return self.total * min(self.sequences, max(slots, 1))

    @property
    def exact(self) -> bool:
        """Good enough to decide on: counted, or bounded from above."""
        return self.method != "estimate"


@dataclass(frozen=True)
class Room:
    """The context an engine gives requests: per sequence, and in all.

    llama-server's default unified KV cache lets every slot use the whole context, but
    all sequences in flight share it; an explicit `-np N` without `--kv-unified` gives
    each of the N slots a cache of its own instead.
    """

    slot_context: int  # what one sequence may use
    shared: int | None = None  # the unified cache all slots share; None: each slot has its own
    slots: int = 1  # sequences the engine runs at once

    def fits(self, needs: Needs) -> bool:
        """Whether the request, alone on the engine, fits it."""
        if needs.total > self.slot_context:
            return False
        return self.shared is None or needs.shared_total(self.slots) <= self.shared

    def reservation(self, needs: Needs) -> int:
        """What it takes of the shared cache while it runs: all of it when it runs alone."""
        if self.alone(needs):
            return self.shared or 0
        return needs.shared_total(self.slots)

    def slot_use(self, needs: Needs) -> int:
        """The engine slots its sequences take at once (all, when it runs alone)."""
        if self.alone(needs):
            return max(self.slots, 1)
        return min(needs.sequences, max(self.slots, 1))

    def alone(self, needs: Needs) -> bool:
        """Whether it must have a shared cache to itself: its size is unknown (a body the
        engine renders through a template the gateway cannot see), or it has several
        sequences (the engine's idle slots are cleared for them, see clear_idle_slots)."""
        return self.shared is not None and (needs.method == "unbounded" or needs.sequences > 1)


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


def token_floor(shape: PromptShape, longest_token: int) -> int:
    """A lower bound of the prompt's tokens: no token stands for more bytes than the
    vocabulary's longest (whatever the template adds comes on top)."""
    return -(-shape.text_bytes // max(longest_token, 1)) + shape.token_ids
