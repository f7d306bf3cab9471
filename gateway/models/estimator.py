"""Estimates a prompt's token count before any engine of its model runs.

Learns tokens-per-byte from the exact counts seen for each model and keeps the
largest recent ratio, so an estimate errs towards a larger variant.
"""

from __future__ import annotations

import math
from collections import deque

from gateway.models.needs import PromptShape

# Before any exact count: English text in common BPE vocabularies runs at 0.2-0.3
# tokens per byte; 0.5 leaves room for code and non-Latin scripts.
DEFAULT_TOKENS_PER_BYTE = 0.5
MARGIN = 1.10  # on top of the learned ratio
TEMPLATE_TOKENS_PER_MESSAGE = 8  # role markers and separators of common chat templates
MIN_SAMPLE_BYTES = 256  # shorter prompts are dominated by template overhead
SAMPLES_KEPT = 64


class TokenEstimator:
    """Per-model token estimates from a learned tokens-per-byte ratio."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[float]] = {}
        self.learned = 0  # exact counts recorded so far: estimates change when it does

    def observe(self, model: str, shape: PromptShape, tokens: int) -> None:
        """Record an exact count for a prompt of this shape."""
        if shape.text_bytes < MIN_SAMPLE_BYTES:
            return
        text_tokens = max(0, tokens - shape.token_ids - shape.messages * TEMPLATE_TOKENS_PER_MESSAGE)
        ratio = text_tokens / shape.text_bytes
        self._samples.setdefault(model, deque(maxlen=SAMPLES_KEPT)).append(ratio)
        self.learned += 1

    def ratio(self, model: str) -> float | None:
        """The learned tokens-per-byte ratio (largest recent), if any exact count was seen."""
        samples = self._samples.get(model)
        return max(samples) if samples else None

    def estimate(self, model: str, shape: PromptShape) -> int:
        learned = self.ratio(model)
        ratio = learned * MARGIN if learned is not None else DEFAULT_TOKENS_PER_BYTE
        overhead = shape.messages * TEMPLATE_TOKENS_PER_MESSAGE
        return math.ceil(shape.text_bytes * ratio) + shape.token_ids + overhead
