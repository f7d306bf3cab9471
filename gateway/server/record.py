"""RequestRecord: one finished model request, as the dashboard's activity table shows it.

The handler fills in what it learns on the way (the alias, the context it ran on, how
its prompt was counted, its requeues), the proxy what the engine reported (tokens
generated, its speed), and the metrics middleware the outcome and the timings.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    request_id: str
    model: str
    alias: str  # the name the client used
    endpoint: str
    stream: bool
    at: float = field(default_factory=time.time)  # arrival, wall clock
    status: int | None = None  # 499: the client left
    prompt_tokens: int | None = None
    counted: str | None = None  # how prompt_tokens was found: exact, bound, estimate, ...
    completion_tokens: int | None = None
    context: int | None = None  # of the variant it ran on
    ttft: float | None = None  # seconds to the first token (the whole answer, unstreamed)
    tokens_per_second: float | None = None
    duration: float | None = None
    requeues: int = 0
    waited_for_start: bool = False  # its engine was started (a swap, an upgrade) while it waited

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)  # its fields are plain values (asdict would deep-copy each)

    def read_usage(self, answer: bytes) -> None:
        """Tokens generated and speed from an answer's JSON (or a stream's last events):
        OpenAI's `usage`, llama.cpp's `timings`."""
        for value in reversed(_json_values(answer)):
            usage = value.get("usage") if isinstance(value.get("usage"), dict) else {}
            timings = value.get("timings") if isinstance(value.get("timings"), dict) else {}
            completion = usage.get("completion_tokens", timings.get("predicted_n"))
            if isinstance(completion, int):
                self.completion_tokens = completion
                speed = timings.get("predicted_per_second")
                self.tokens_per_second = round(speed, 2) if isinstance(speed, int | float) else None
                return

    def finish(self, status: int, ttft: float, duration: float) -> None:
        self.status, self.ttft, self.duration = status, round(ttft, 5), round(duration, 5)
        if self.tokens_per_second is None and self.completion_tokens and duration > ttft:
            self.tokens_per_second = round(self.completion_tokens / (duration - ttft), 2)


def _json_values(answer: bytes) -> list[dict[str, Any]]:
    """The JSON objects of a body, or of an event stream's `data:` lines that report usage."""
    lines = [line for line in answer.splitlines() if line.startswith(b"data:")]
    texts = [line[5:] for line in lines if b'"usage"' in line or b'"timings"' in line] if lines else [answer]
    values = []
    for text in texts:
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if isinstance(value, dict):
            values.append(value)
    return values
