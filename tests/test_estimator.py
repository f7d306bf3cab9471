"""TokenEstimator: a conservative tokens-per-byte guess, learned from exact counts."""

from __future__ import annotations

import math

from gateway.models import PromptShape, TokenEstimator
from gateway.models.estimator import (
    DEFAULT_TOKENS_PER_BYTE,
    MARGIN,
    MIN_SAMPLE_BYTES,
    TEMPLATE_TOKENS_PER_MESSAGE,
)


def test_default_ratio_before_any_observation() -> None:
    estimator = TokenEstimator()
    assert estimator.ratio("m") is None
    shape = PromptShape(text_bytes=1000, messages=2, token_ids=5)
    expected = math.ceil(1000 * DEFAULT_TOKENS_PER_BYTE) + 5 + 2 * TEMPLATE_TOKENS_PER_MESSAGE
    assert estimator.estimate("m", shape) == expected == 521


def test_learned_ratio_after_an_observation() -> None:
    estimator = TokenEstimator()
    # 1000 bytes, 1 message: 8 template tokens + 250 text tokens -> 0.25 tokens per byte.
    estimator.observe("m", PromptShape(text_bytes=1000, messages=1), 258)
    assert estimator.ratio("m") == 0.25
    estimate = estimator.estimate("m", PromptShape(text_bytes=2000))
    assert estimate == math.ceil(2000 * 0.25 * MARGIN) == 550
    assert estimate < math.ceil(2000 * DEFAULT_TOKENS_PER_BYTE)


def test_token_ids_are_not_counted_as_text() -> None:
    estimator = TokenEstimator()
    estimator.observe("m", PromptShape(text_bytes=1000, token_ids=100), 300)
    assert estimator.ratio("m") == 0.2


def test_ratios_are_per_model() -> None:
    estimator = TokenEstimator()
    estimator.observe("a", PromptShape(text_bytes=1000), 200)
    assert estimator.ratio("b") is None
    shape = PromptShape(text_bytes=1000)
    assert estimator.estimate("b", shape) == 500
    assert estimator.estimate("a", shape) == math.ceil(1000 * 0.2 * MARGIN)


def test_conservative_keeps_the_largest_recent_ratio() -> None:
    estimator = TokenEstimator()
    estimator.observe("m", PromptShape(text_bytes=1000), 200)
    estimator.observe("m", PromptShape(text_bytes=1000), 400)
    estimator.observe("m", PromptShape(text_bytes=1000), 300)
    estimator.observe("m", PromptShape(text_bytes=1000), 100)
    assert estimator.ratio("m") == 0.4
    assert estimator.estimate("m", PromptShape(text_bytes=1000)) == math.ceil(1000 * 0.4 * MARGIN)


def test_old_samples_age_out() -> None:
    estimator = TokenEstimator()
    estimator.observe("m", PromptShape(text_bytes=1000), 900)
    for _ in range(200):
        estimator.observe("m", PromptShape(text_bytes=1000), 250)
    assert estimator.ratio("m") == 0.25


def test_short_prompts_are_ignored() -> None:
    estimator = TokenEstimator()
    estimator.observe("m", PromptShape(text_bytes=MIN_SAMPLE_BYTES - 1), 10_000)
    assert estimator.ratio("m") is None
    estimator.observe("m", PromptShape(text_bytes=1000), 200)
    estimator.observe("m", PromptShape(text_bytes=10), 5_000)
    assert estimator.ratio("m") == 0.2
    estimator.observe("m", PromptShape(text_bytes=MIN_SAMPLE_BYTES), MIN_SAMPLE_BYTES)
    assert estimator.ratio("m") == 1.0


def test_count_below_template_overhead_gives_zero_not_negative() -> None:
    estimator = TokenEstimator()
    estimator.observe("m", PromptShape(text_bytes=1000, messages=100), 10)
    assert estimator.ratio("m") == 0.0
    shape = PromptShape(text_bytes=1000, messages=1)
    assert estimator.estimate("m", shape) == TEMPLATE_TOKENS_PER_MESSAGE
