"""Fault and load at once: many clients, three models on two engines, every variant, while
engines get killed and the config keeps changing.

Run as `.venv/bin/python bench/soak.py --seconds 60 --clients 32` (it starts its own
gateway in front of three tiny models with `server.max_engines = 2`, on loopback), or
import `run_soak` and point it at a running gateway started with `soak_models()` and
`SERVER` (tests/test_soak.py does, for a short run).

Concurrent aiohttp clients send a random mix, spread evenly over three models so that the
gateway evicts one engine for another all the time: chat and completions for `tiny`
(variants 512/2048/8192), `tiny-b` (2048) and `tiny-c` (4096), prompts of every size
class, streamed and not, streams that the client closes after a few events, streams with
a large `max_tokens` that force the larger variants and are closed early as well, streams
of a long answer that the client stops reading for SLOW_PAUSE (the gateway holds the
engine back) and then reads whole, chat
with `n` = 2-3 (streamed and not), chat and completions whose `n_predict` is larger than
their `max_tokens`, chat with a role string of 200-800 bytes, completions of a list of
2-3 prompts (not streamed: llama-server starts that stream with `data: null`), and now
and then a bad request (malformed JSON, an unknown model, `max_tokens: 0`). Every good
request fits the model's largest variant, its sequences (`n`, the prompts) together. A
killer SIGKILLs one of the running engines, at random, every 2-5 s; given the config
file, a reloader rewrites it every 0.7-2 s with the `tiny` model's engine arguments
alternating between two sets that change how the engine starts but not what it answers,
and POSTs /gateway/reload.

Then it checks, and `SoakReport.problems()` lists what failed:

- every good request got a complete, well-formed answer: JSON with one choice per `n` or
  prompt, each with text and a finish reason, no more completion tokens than its
  choices may have; or a stream whose events all parse, whose choices all finish, no
  choice longer than its limit, that ends with `data: [DONE]`. An error (a status or an
  event) is acceptable only when it is the gateway's own answer to an engine the killer
  killed (`KILLED`); an engine's error passed through, an HTTP 500, any other error, and
  with kills off any error at all, is a bad answer. A bad request gets its OpenAI-shaped
  error. No request took longer than `REQUEST_TIMEOUT`;
- no engine died that the killer did not kill (the gateway's crash, failed-start and
  frozen counters), the supervisor had no fault, every reload answered 200;
- afterwards no engine is left but the gateway's current ones, the gateway's open file
  descriptors did not grow beyond `FD_SLACK` over a baseline taken after warm-up, every
  engine's state machine history (polled during the run) has only legal, chained
  transitions, the gateway is healthy and serves all three models again (with the config
  it started with);
- at no poll did more engines run than `max_engines` (neither in /gateway/state nor as
  llama-server processes of the gateway);
- if `/metrics` exists: `llm_gateway_requests_total` counted at least the 200 answers the
  clients saw complete, `llm_gateway_evictions_total` and `llm_gateway_starts_total` agree
  with the gateway's own counters, and (when the polls saw every transition since the
  gateway started) each model's starts are its `start` transitions.

The report adds what the run did: engine starts, evictions (from /metrics) and each
model's transitions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from gateway.demo.harness import free_port, lua_config, spawn_gateway, stop_process, to_lua, wait_healthy
from gateway.demo.tinymodel import write_tiny_model
from gateway.supervisor.machine import HISTORY_LENGTH, TRANSITIONS

ROOT = Path(__file__).resolve().parent.parent

REQUEST_TIMEOUT = 30.0  # seconds one request may take, queueing and engine restarts included
SLOW_PAUSE = 1.5  # seconds a slow-stream client stops reading
FD_SLACK = 10  # open descriptors the gateway may have more than after warm-up
SETTLE_TIMEOUT = 30.0  # seconds for in-flight work, engines and descriptors to settle
KILL_INTERVAL = (2.0, 5.0)
KILL_ATTEMPTS = 8  # polls, POLL_INTERVAL apart, for an engine to kill
POLL_INTERVAL = 0.25  # /gateway/state polls: history, engine pids, descriptor peak
MAX_LISTED = 40  # problems of one kind kept in the report (all are counted)

RELOAD_INTERVAL = (0.7, 2.0)
RELOADED_MODEL = "tiny"
# Engine arguments the reloader adds to RELOADED_MODEL's, in turn: each reload changes
# how its engine starts (so the gateway drains and restarts it), never what it answers.
RELOAD_ARGS = (("--batch-size", "1024"), ("-ub", "256"))

VARIANTS = {"tiny": (512, 2048, 8192), "tiny-b": (2048,), "tiny-c": (4096,)}
MODELS = tuple(VARIANTS)  # requests spread evenly over them
LARGEST = {model: max(contexts) for model, contexts in VARIANTS.items()}
ALIASES = {"tiny": "tiny-chat"}
MAX_ENGINES = 2  # fewer than the models: requests keep evicting engines
SERVER = {"max_engines": MAX_ENGINES}  # the soak gateway's server settings (beside lua_config's)
BAD_MODELS = ("no-such-model", "tiny-d", "TINY", "tiny ")  # names the gateway does not serve
LEGAL = frozenset((source, dest, trigger) for trigger, sources, dest, _ in TRANSITIONS for source in sources)

# The gateway's own answers to an engine that died under a request: with the killer on, a
# good request may get these (code, HTTP status, message) and no other error.
KILLED = (
    (
        "engine_error",
        502,
        re.compile(
            r"the engine failed twice for this request; last: "
            r"(engine unreachable|engine failed before answering|counting failed)"
        ),
    ),
    ("engine_error", 502, re.compile(r"the engine failed mid-stream: ")),
    ("engine_error", 502, re.compile(r"\S+ exited with code -9 while starting")),
    ("service_unavailable", 503, re.compile(r"the engine \S+ keeps failing ")),
)

# Prompt sizes in bytes (one token per byte, as the tiny models tokenize). With at most
# 64 answer tokens and the template's ~25, "small" fits 512, "medium" 2048, "large" 8192.
SIZES = {"small": (1, 380), "medium": (600, 1900), "large": (2200, 7600)}
TEMPLATE_TOKENS = 40  # ChatML's own tokens around a message and the answer's start (~21), and slack
# (kind, copies): the clients take kinds, in turn, from one shuffled bag of these copies,
# refilled when empty; so the first 22 requests sent hold each kind as often as listed.
MIXES = [
    ("chat", 3),
    ("completion", 1),
    ("stream", 3),
    ("stream-cancel", 2),
    ("big-cancel", 1),
    ("slow-stream", 1),
    ("chat-n", 2),
    ("n-predict", 2),
    ("long-role", 2),
    ("prompts", 2),
    ("bad-json", 1),
    ("bad-model", 1),
    ("bad-max-tokens", 1),
]
BAD_STATUS = {"bad-json": 400, "bad-model": 404, "bad-max-tokens": 400}
WORDS = [
    *("the", "a", "of", "engine", "gateway", "token", "stream", "variant", "swap", "kill", "context"),
    "héllo",
    "日本",
]


# --- the report -------------------------------------------------------------------------------


@dataclass
class SoakReport:
    seed: int
    seconds: float
    clients: int
    kill_engines: bool
    wall_seconds: float = 0.0
    requests: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)  # complete, error, error-event, cancelled
    served: Counter[str] = field(default_factory=Counter)  # "tiny@512": answers with that context
    latency_ms: dict[str, float] = field(default_factory=dict)
    kills: list[int] = field(default_factory=list)  # pids the killer SIGKILLed
    kill_states: Counter[str] = field(default_factory=Counter)  # the state each kill hit
    reloads: int = 0  # POST /gateway/reload calls, the last one restoring the first config
    reload_failures: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # errors good requests got, by kind
    counters: dict[str, int] = field(default_factory=dict)  # the gateway's, at the end
    counter_growth: dict[str, int] = field(default_factory=dict)  # theirs during the run
    bad_answers: list[str] = field(default_factory=list)
    bad_answer_count: int = 0
    problem_kinds: Counter[str] = field(default_factory=Counter)  # bad answers, grouped
    hung: list[str] = field(default_factory=list)
    hung_count: int = 0
    leftover_engines: list[int] = field(default_factory=list)
    engines_seen: int = 0
    fd_baseline: int = 0
    fd_peak: int = 0
    fd_final: int = 0
    fd_slack: int = FD_SLACK
    transitions: int = 0
    transitions_by_model: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> trigger -> n
    history_complete: bool = False  # the polls saw every transition since the gateway started
    history_gaps: int = 0
    illegal_transitions: list[str] = field(default_factory=list)
    broken_chain: list[str] = field(default_factory=list)
    metrics_status: int | None = None
    metrics_200: float | None = None
    clients_200: int = 0  # complete 200 answers, warm-up and recovery included
    metrics_problem: str | None = None
    # From /metrics, grown from the baseline after warm-up to the end (recovery included).
    starts: dict[str, int] = field(default_factory=dict)  # model -> llm_gateway_starts_total
    evictions: dict[str, int] = field(default_factory=dict)  # "model/reason" -> llm_gateway_evictions_total
    max_engines: int | None = None
    peak_engines: int = 0
    peak_processes: int = 0
    crowded: list[str] = field(default_factory=list)
    health_after: int | None = None
    recovery_failures: list[str] = field(default_factory=list)
    shutdown: str | None = None  # main(): how the gateway it started ended

    def fd_growth(self) -> int:
        return self.fd_final - self.fd_baseline

    def problems(self) -> list[str]:
        out: list[str] = []
        if self.bad_answer_count:
            out.append(
                f"{self.bad_answer_count} malformed or unexpected answers, e.g. {self.bad_answers[:3]}"
            )
        if self.hung_count:
            out.append(f"{self.hung_count} requests took over {REQUEST_TIMEOUT:g}s: {self.hung[:3]}")
        out.extend(self.engine_problems())
        if self.reload_failures:
            out.append(f"{len(self.reload_failures)} reloads failed: {self.reload_failures[:3]}")
        if self.leftover_engines:
            out.append(f"engines left running besides the current one: {self.leftover_engines}")
        if self.fd_growth() > self.fd_slack:
            out.append(
                f"open descriptors grew from {self.fd_baseline} to {self.fd_final} (> {self.fd_slack})"
            )
        if self.crowded:
            out.append(f"{len(self.crowded)} polls saw more engines than max_engines: {self.crowded[:3]}")
        if self.illegal_transitions:
            out.append(f"illegal transitions: {self.illegal_transitions[:5]}")
        if self.broken_chain:
            out.append(f"history does not chain: {self.broken_chain[:5]}")
        if self.metrics_problem:
            out.append(self.metrics_problem)
        if self.health_after != 200:
            out.append(f"GET /health after the run: {self.health_after}")
        if self.recovery_failures:
            out.append(f"requests after the run failed: {self.recovery_failures}")
        if self.shutdown not in (None, "exit 0"):
            out.append(f"gateway shutdown: {self.shutdown}")
        return out

    def engine_problems(self) -> list[str]:
        """Engines the gateway saw die or freeze beyond those the killer killed."""
        grew = self.counter_growth
        out = []
        if grew.get("frozen"):
            out.append(f"{grew['frozen']} engines were killed as frozen")
        deaths = grew.get("crashes", 0) + grew.get("start_failures", 0)
        if deaths > len(self.kills):
            out.append(
                f"{deaths} engines died ({grew.get('crashes', 0)} crashes, "
                f"{grew.get('start_failures', 0)} failed starts), the killer killed {len(self.kills)}"
            )
        if grew.get("supervisor_faults"):
            out.append(f"{grew['supervisor_faults']} supervisor faults")
        return out

    def as_json(self) -> dict[str, Any]:
        out = {k: dict(v) if isinstance(v, Counter) else v for k, v in vars(self).items()}
        return {**out, "fd_growth": self.fd_growth(), "problems": self.problems()}

    def summary(self) -> str:
        lines = [
            f"soak: {self.seconds:g}s, {self.clients} clients, models {', '.join(MODELS)} on "
            f"max_engines {self.max_engines}, seed {self.seed}, "
            f"kills {'on' if self.kill_engines else 'off'}; wall {self.wall_seconds:.1f}s",
            f"requests   {self.requests}: {dict(sorted(self.kinds.items()))}",
            f"statuses   {dict(sorted(self.statuses.items()))}",
            f"outcomes   {dict(sorted(self.outcomes.items()))}",
            f"served     {dict(sorted(self.served.items()))}",
            f"latency ms {self.latency_ms}",
            f"killed     {len(self.kills)} engines (in {dict(self.kill_states)})",
            f"reloads    {self.reloads}, failed {len(self.reload_failures)}",
            f"counters   grew {dict(sorted(self.counter_growth.items()))}",
            f"engines    {self.engines_seen} seen, at once at most {self.peak_engines} in the state and "
            f"{self.peak_processes} processes (max_engines {self.max_engines}), "
            f"left over: {self.leftover_engines or 'none'}",
            f"starts     {sum(self.starts.values())}: {dict(sorted(self.starts.items()))}",
            f"evictions  {sum(self.evictions.values())}: {dict(sorted(self.evictions.items()))}",
            f"fds        baseline {self.fd_baseline}, peak {self.fd_peak}, final {self.fd_final} "
            f"(growth {self.fd_growth()}, allowed {self.fd_slack})",
            f"history    {self.transitions} transitions ({self.history_gaps} gaps, "
            f"{'complete' if self.history_complete else 'not all seen'}), "
            f"illegal {len(self.illegal_transitions)}, chain breaks {len(self.broken_chain)}",
            *(
                f"  {model:<8} {sum(triggers.values())}: {dict(sorted(triggers.items()))}"
                for model, triggers in sorted(self.transitions_by_model.items())
            ),
            f"metrics    /metrics {self.metrics_status}: 200s counted {self.metrics_200}, "
            f"seen complete {self.clients_200}",
            f"after      /health {self.health_after}, recovery failures {self.recovery_failures or 'none'}"
            + (f", shutdown {self.shutdown}" if self.shutdown else ""),
        ]
        for kind, count in self.errors.most_common(10):
            lines.append(f"error x{count}: {kind}")
        for kind, count in self.problem_kinds.most_common(10):
            lines.append(f"bad answer x{count}: {kind}")
        problems = self.problems()
        lines.append("PROBLEMS:\n  " + "\n  ".join(problems) if problems else "all checks passed")
        return "\n".join(lines)


# --- requests -----------------------------------------------------------------------------------


@dataclass
class Spec:
    kind: str
    model: str  # the name the client sends
    path: str = "/v1/chat/completions"
    data: bytes = b""
    stream: bool = False
    max_tokens: int = 0
    cancel_after: int | None = None  # close the stream after this many data events
    pause_after: int | None = None  # stop reading for SLOW_PAUSE after this many data events
    prompt_bytes: int = 0  # the largest prompt's
    n_predict: int = 0  # llama.cpp's own answer length, when sent
    role_bytes: int = 0  # a role string of this size instead of "user"
    choices: int = 1  # a good answer's: `n`, or one per prompt

    @property
    def answer_limit(self) -> int:
        """The tokens one choice may have."""
        return max(self.max_tokens, self.n_predict)

    def describe(self) -> str:
        extra = [
            *([f"n_predict={self.n_predict}"] if self.n_predict else []),
            *([f"role={self.role_bytes}B"] if self.role_bytes else []),
            *([f"choices={self.choices}"] if self.choices > 1 else []),
            *(["stream"] if self.stream else []),
        ]
        return " ".join(
            [f"{self.kind} {self.model} prompt={self.prompt_bytes}B max_tokens={self.max_tokens}", *extra]
        )


def text_of(rng: random.Random, size: int) -> str:
    """Words up to exactly `size` UTF-8 bytes."""
    out, length = [], 0
    while length < size:
        word = rng.choice(WORDS) + " "
        if length + len(word.encode()) > size:
            word = rng.choice(string.ascii_letters) * (size - length)
        out.append(word)
        length += len(word.encode())
    return "".join(out)


@dataclass
class Kinds:
    """The kinds of request to send, drawn from shuffled bags of MIXES."""

    rng: random.Random
    bag: list[str] = field(default_factory=list)

    def next(self) -> str:
        if not self.bag:
            self.bag = [kind for kind, copies in MIXES for _ in range(copies)]
            self.rng.shuffle(self.bag)
        return self.bag.pop()


def make_spec(rng: random.Random, kind: str) -> Spec:
    model = rng.choice(MODELS)
    name = ALIASES.get(model, model) if rng.random() < 0.2 else model
    spec = Spec(kind, name, stream=kind in ("stream", "stream-cancel", "big-cancel", "slow-stream"))
    spec.max_tokens = rng.randint(1, 64)
    body: dict[str, Any] = {"model": name}
    role = "user"
    if kind == "big-cancel":  # a large answer forces a large variant; closed after a few events
        spec.max_tokens = rng.choice([rng.randint(1000, 1600), rng.randint(3000, 7600)])
        if len(VARIANTS[model]) == 1:  # no larger variant to force: most of its context
            spec.max_tokens = rng.randint(int(LARGEST[model] * 0.3), int(LARGEST[model] * 0.78))
        spec.cancel_after = rng.randint(1, 4)
    elif kind == "stream-cancel":
        spec.cancel_after = rng.randint(1, 4)
    elif kind == "slow-stream":  # a long answer the client stops reading for a while, then reads whole
        spec.max_tokens = rng.randint(int(LARGEST[model] * 0.3), int(LARGEST[model] * 0.6))
        spec.pause_after = rng.randint(1, 5)
    elif kind == "chat-n":
        spec.choices = body["n"] = rng.randint(2, 3)
        spec.stream = rng.random() < 0.5
    elif kind == "n-predict":
        spec.n_predict = body["n_predict"] = rng.randint(spec.max_tokens + 1, 400)
        spec.stream = rng.random() < 0.3
        if rng.random() < 0.5:
            spec.path = "/v1/completions"
    elif kind == "long-role":
        role = text_of(rng, rng.randint(200, 800))
        spec.role_bytes = len(role.encode())
        spec.stream = rng.random() < 0.5
    elif kind in ("completion", "prompts"):
        spec.path = "/v1/completions"
        spec.choices = rng.randint(2, 3) if kind == "prompts" else 1
    # Every sequence (`n` answers, each prompt) holds its prompt and answer: together
    # they fit the model's largest variant.
    room = LARGEST[model] // spec.choices - TEMPLATE_TOKENS - spec.role_bytes - spec.answer_limit
    prompts = [text_of(rng, prompt_size(rng, room)) for _ in range(spec.choices if kind == "prompts" else 1)]
    spec.prompt_bytes = max(len(p.encode()) for p in prompts)
    body.update(max_tokens=spec.max_tokens, stream=spec.stream)
    if spec.path == "/v1/completions":
        body["prompt"] = prompts if kind == "prompts" else prompts[0]
    else:
        body["messages"] = [{"role": role, "content": prompts[0]}]
    if kind == "bad-model":
        body["model"] = rng.choice(BAD_MODELS)
    elif kind == "bad-max-tokens":
        spec.max_tokens = body["max_tokens"] = 0
    spec.data = json.dumps(body).encode()
    if kind == "bad-json":
        spec.data = spec.data[: rng.randint(1, len(spec.data) - 1)]  # cut short: never valid JSON
    return spec


def prompt_size(rng: random.Random, room: int) -> int:
    """A size in bytes from a random size class that starts within `room`, at most `room`."""
    low, high = SIZES[rng.choice([size for size, (least, _) in SIZES.items() if least <= room])]
    return rng.randint(low, min(high, room))


@dataclass
class Outcome:
    spec: Spec
    status: int | None = None
    result: str = ""  # complete, error, error-event, cancelled, hung, failed
    problem: str | None = None
    seconds: float = 0.0
    context: str | None = None  # X-Gateway-Context
    error: str | None = None  # a good request's error (a status or an event): its kind and verdict


def error_shape_problem(payload: Any) -> str | None:
    """None when `payload` is OpenAI's error shape."""
    if not isinstance(payload, dict) or not isinstance(payload.get("error"), dict):
        return f"not an error object: {str(payload)[:200]}"
    error = payload["error"]
    missing = [k for k in ("message", "type", "code", "param") if k not in error]
    if missing or not isinstance(error["message"], str) or not isinstance(error["type"], str):
        return f"error without {missing or 'string message/type'}: {str(payload)[:200]}"
    return None


def judge_error(outcome: Outcome, payload: Any, status: int | None, kills: bool) -> None:
    """A good request's error, as an HTTP `status` or (None) an event in its stream: its
    kind goes in `outcome.error`; a problem unless it is the gateway's own answer to an
    engine the killer killed."""
    error = payload.get("error") if isinstance(payload, dict) else None
    error = error if isinstance(error, dict) else {}
    message = str(error.get("message", "")).split("\n", 1)[0]  # a failed start adds engine output
    where = "event" if status is None else f"HTTP {status}"
    killed = kills and any(
        error.get("code") == code and status in (None, code_status) and pattern.match(message)
        for code, code_status, pattern in KILLED
    )
    shown = re.sub(r"\d+", "N", message)[:120]
    outcome.error = f"{'killer' if killed else 'BAD'}: {where} {error.get('code')!r}: {shown}"
    if not killed:
        cause = "not the killer's doing" if kills else "no engine was killed"
        outcome.problem = f"{where} error for a good request ({cause}): {json.dumps(payload)[:300]}"
    else:
        outcome.problem = error_shape_problem(payload)


def text_of_choice(spec: Spec, choice: dict[str, Any], key: str) -> Any:
    """A choice's text: `text` in completions, `message` or `delta` content in chat."""
    if spec.path == "/v1/completions":
        return choice.get("text")
    part = choice.get(key)
    return part.get("content") if isinstance(part, dict) else None


def check_answer(spec: Spec, payload: Any) -> str | None:
    """None when a non-streamed 200 answer is complete and well formed."""
    if not isinstance(payload, dict):
        return f"answer is not an object: {str(payload)[:200]}"
    choices = payload.get("choices")
    count = len(choices) if isinstance(choices, list) else None
    if count != spec.choices:
        return f"{count} choices, not {spec.choices}: {str(payload)[:200]}"
    if {c.get("index") if isinstance(c, dict) else None for c in choices} != set(range(spec.choices)):
        return f"choices are not indexed 0 to {spec.choices - 1}: {str(choices)[:200]}"
    for choice in choices:
        if not isinstance(text_of_choice(spec, choice, "message"), str):
            return f"choice without text: {str(choice)[:200]}"
        if choice.get("finish_reason") not in ("length", "stop"):
            return f"finish_reason {choice.get('finish_reason')!r}"
    used = (payload.get("usage") or {}).get("completion_tokens")
    if not isinstance(used, int) or used > spec.choices * spec.answer_limit:
        return f"completion_tokens {used!r} for {spec.choices} choices of at most {spec.answer_limit}"
    if payload.get("model") != spec.model:
        return f"model {payload.get('model')!r}, asked for {spec.model!r}"
    return None


@dataclass
class StreamSeen:
    """What a stream's events said so far, per choice."""

    tokens: Counter[int] = field(default_factory=Counter)  # events with text
    finished: set[int] = field(default_factory=set)


def check_chunk(spec: Spec, payload: Any, seen: StreamSeen) -> str | None:
    """None when a stream event is well formed and keeps its choices within their limits."""
    if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list):
        return f"event without choices: {str(payload)[:200]}"
    if payload.get("model") != spec.model:
        return f"event model {payload.get('model')!r}, asked for {spec.model!r}"
    for choice in payload["choices"]:
        index = choice.get("index") if isinstance(choice, dict) else None
        if index not in range(spec.choices) or index in seen.finished:
            return f"event for choice {index!r} (of {spec.choices}, finished {sorted(seen.finished)})"
        if text_of_choice(spec, choice, "delta"):
            seen.tokens[index] += 1  # the engine sends a token per event, or fewer
            if seen.tokens[index] > spec.answer_limit:
                return f"choice {index} streamed over {spec.answer_limit} tokens"
        reason = choice.get("finish_reason")
        if reason is not None:
            if reason not in ("length", "stop"):
                return f"finish_reason {reason!r}"
            seen.finished.add(index)
    return None


async def send(session: aiohttp.ClientSession, url: str, spec: Spec, kills: bool) -> Outcome:
    """One request and the judgement of its answer; `kills`: whether the killer runs."""
    outcome = Outcome(spec)
    started = time.monotonic()
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            await _exchange(session, url, spec, outcome, kills)
    except TimeoutError:
        outcome.result, outcome.problem = "hung", f"no end within {REQUEST_TIMEOUT:g}s"
    except (aiohttp.ClientError, ConnectionError) as exc:
        outcome.result = "failed"
        outcome.problem = f"connection failed: {type(exc).__name__}: {exc}"
    outcome.seconds = time.monotonic() - started
    return outcome


async def _exchange(
    session: aiohttp.ClientSession, url: str, spec: Spec, outcome: Outcome, kills: bool
) -> None:
    headers = {"Content-Type": "application/json"}
    async with session.post(url + spec.path, data=spec.data, headers=headers) as resp:
        outcome.status = resp.status
        outcome.context = resp.headers.get("X-Gateway-Context")
        is_sse = "text/event-stream" in resp.headers.get("Content-Type", "")
        if resp.status == 200 and is_sse and spec.stream:
            await _read_stream(resp, spec, outcome, kills)
            return
        raw = await resp.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            outcome.result, outcome.problem = "error", f"HTTP {resp.status}, not JSON: {raw[:200]!r}"
            return
        expected = BAD_STATUS.get(spec.kind)
        if expected is not None:
            outcome.result = "error"
            if resp.status != expected:
                outcome.problem = f"HTTP {resp.status} (expected {expected}): {raw[:200]!r}"
            else:
                outcome.problem = error_shape_problem(payload)
        elif resp.status == 200:
            outcome.result = "complete"
            if spec.stream:
                outcome.problem = f"a stream was answered as {resp.headers.get('Content-Type')}"
            else:
                outcome.problem = check_answer(spec, payload)
        else:
            outcome.result = "error"
            judge_error(outcome, payload, resp.status, kills)


async def _read_stream(resp: aiohttp.ClientResponse, spec: Spec, outcome: Outcome, kills: bool) -> None:
    """Parse the events as they come; close early for cancelling kinds."""
    events = 0
    seen = StreamSeen()
    ended: str | None = None  # "done" or "error"
    while True:
        line = await resp.content.readline()
        if not line:
            break
        line = line.rstrip(b"\r\n")
        if not line or line.startswith(b":"):
            continue  # event separator, or a keep-alive comment
        if ended is not None:
            outcome.problem = f"data after the stream's end: {line[:200]!r}"
            break
        if not line.startswith(b"data: "):
            outcome.problem = f"not an SSE data line: {line[:200]!r}"
            break
        data = line[6:]
        if data == b"[DONE]":
            ended = "done"
            continue
        try:
            payload = json.loads(data)
        except ValueError:
            outcome.problem = f"event is not JSON: {data[:200]!r}"
            break
        if isinstance(payload, dict) and "error" in payload:
            ended = "error"
            judge_error(outcome, payload, None, kills)
            continue
        outcome.problem = check_chunk(spec, payload, seen)
        if outcome.problem:
            break
        events += 1
        if events == spec.pause_after:
            await asyncio.sleep(SLOW_PAUSE)  # what the engine sends meanwhile fills every buffer
        if spec.cancel_after is not None and events >= spec.cancel_after:
            resp.close()  # the client goes away mid-stream
            outcome.result = "cancelled"
            return
    if ended == "done":
        outcome.result = "complete"
        unfinished = sorted(set(range(spec.choices)) - seen.finished)
        if unfinished and not outcome.problem:
            outcome.problem = f"the stream ended without a finish_reason for choices {unfinished}"
    elif ended == "error":
        outcome.result = "error-event"
    else:
        outcome.result = "failed"
        outcome.problem = outcome.problem or f"the stream ended after {events} events without [DONE]"


# --- watching the gateway -------------------------------------------------------------------------


def listening_pid(port: int) -> int | None:
    """The process that listens on a loopback TCP port (ours: same user)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                cols = row.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":
                    inodes.add(f"socket:[{cols[9]}]")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(proc.name)
    return None


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(command, state, parent pid) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    return comm, fields[0], int(fields[1])


def start_time(pid: int) -> int | None:
    """When a process started (clock ticks since boot), None when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def engine_children(gateway_pid: int) -> set[int]:
    """llama-server processes (zombies too) whose parent is the gateway."""
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            stat = proc_stat(int(proc.name))
            if stat and stat[0] == "llama-server" and stat[2] == gateway_pid:
                found.add(int(proc.name))
    return found


def live(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[1] != "Z"


def _key(entry: dict[str, Any]) -> tuple[float, str, str, str, str]:
    return (entry["monotonic"], entry["model"], entry["from"], entry["to"], entry["trigger"])


@dataclass
class Watch:
    """What the monitor collects while the soak runs."""

    gateway_pid: int
    history: dict[tuple[float, str, str, str, str], dict[str, Any]] = field(default_factory=dict)
    gaps: list[float] = field(default_factory=list)  # monotonic times before which entries may be lost
    # pid -> its start time: a pid the machine reuses later is another process
    engines: dict[int, int | None] = field(default_factory=dict)
    fd_peak: int = 0
    kills: list[int] = field(default_factory=list)
    kill_states: Counter[str] = field(default_factory=Counter)
    # Whether the first poll held the whole history since the gateway started (it was not
    # full); with no gaps after it, the polls saw every transition.
    from_start: bool | None = None
    peak_engines: int = 0  # engines in /gateway/state that were not idle or crashed, at once
    peak_processes: int = 0  # live llama-server children of the gateway, at once
    crowded: list[str] = field(default_factory=list)  # polls that saw more than max_engines

    def absorb(self, state: dict[str, Any]) -> None:
        entries = state.get("history") or []
        known = max((key[0] for key in self.history), default=None)
        if self.from_start is None:
            self.from_start = len(entries) < HISTORY_LENGTH
        if (
            known is not None
            and len(entries) >= HISTORY_LENGTH
            and entries[0]["monotonic"] > known
            and _key(entries[0]) not in self.history
        ):
            self.gaps.append(entries[0]["monotonic"])
        for entry in entries:
            self.history[_key(entry)] = entry
        for engine in state.get("engines", []):
            if engine["pid"] and int(engine["pid"]) not in self.engines:
                self.engines[int(engine["pid"])] = start_time(int(engine["pid"]))
        with contextlib.suppress(OSError):
            self.fd_peak = max(self.fd_peak, fd_count(self.gateway_pid))
        self.count_engines(state)

    def count_engines(self, state: dict[str, Any]) -> None:
        """More engines at once than max_engines allows, in the state or as processes."""
        limit = (state.get("memory") or {}).get("max_engines")
        active = [e for e in state.get("engines", []) if e["state"] not in ("idle", "crashed")]
        processes = sorted(p for p in engine_children(self.gateway_pid) if live(p))
        self.peak_engines = max(self.peak_engines, len(active))
        self.peak_processes = max(self.peak_processes, len(processes))
        if limit is not None and (len(active) > limit or len(processes) > limit):
            shown = ", ".join(f"{e['model']} {e['state']} pid {e['pid']}" for e in active)
            self.crowded.append(f"max_engines {limit}: state [{shown}], llama-server processes {processes}")


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return await resp.json()


async def monitor(session: aiohttp.ClientSession, url: str, watch: Watch, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            watch.absorb(await get_json(session, url + "/gateway/state"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), POLL_INTERVAL)


async def killer(
    session: aiohttp.ClientSession, url: str, watch: Watch, rng: random.Random, stop: asyncio.Event
) -> None:
    """SIGKILL the running engine at random moments (only a llama-server child of the gateway).

    When no engine runs at that moment (idle, starting), it tries again shortly after."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(*KILL_INTERVAL))
        for _ in range(KILL_ATTEMPTS):
            if stop.is_set():
                return
            if await kill_running_engine(session, url, watch):
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_INTERVAL)


async def kill_running_engine(session: aiohttp.ClientSession, url: str, watch: Watch) -> bool:
    try:
        state = await get_json(session, url + "/gateway/state")
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False
    watch.absorb(state)
    running = [engine for engine in state["engines"] if engine["pid"]]
    if not running:
        return False
    engine = random.choice(running)
    pid = int(engine["pid"])
    stat = proc_stat(pid)
    if not stat or stat[0] != "llama-server" or stat[2] != watch.gateway_pid or stat[1] == "Z":
        return False
    os.kill(pid, signal.SIGKILL)
    watch.kills.append(pid)
    watch.kill_states[engine["state"]] += 1
    return True


def with_engine_args(config_text: str, model: str, args: tuple[str, ...]) -> str:
    """The config, then Lua that appends `args` to the engine arguments of `model`."""
    return config_text + (
        "\nfor _, model in ipairs(models) do\n"
        f"  if model.name == {to_lua(model)} then\n"
        f"    for _, arg in ipairs({to_lua(args)}) do table.insert(model.args, arg) end\n"
        "  end\n"
        "end\n"
    )


async def reloader(
    session: aiohttp.ClientSession,
    url: str,
    config_path: Path,
    rng: random.Random,
    stop: asyncio.Event,
    report: SoakReport,
) -> None:
    """Rewrite the config with RELOADED_MODEL's engine arguments changed and reload it, at
    random moments; at the end the config the gateway started with is back."""
    original = config_path.read_text()
    texts = [with_engine_args(original, RELOADED_MODEL, args) for args in RELOAD_ARGS]
    try:
        for turn in itertools.count():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.uniform(*RELOAD_INTERVAL))
            if stop.is_set():
                return
            await reload(session, url, config_path, texts[turn % len(texts)], report)
    finally:
        await reload(session, url, config_path, original, report)


async def reload(
    session: aiohttp.ClientSession, url: str, config_path: Path, text: str, report: SoakReport
) -> None:
    """Write the config (whole: replaced, never half written) and POST /gateway/reload."""
    written = config_path.with_name(config_path.name + ".soak")
    written.write_text(text)
    written.replace(config_path)
    report.reloads += 1
    try:
        async with session.post(url + "/gateway/reload", timeout=aiohttp.ClientTimeout(total=60)) as resp:
            body = await resp.read()
            if resp.status != 200:
                report.reload_failures.append(f"HTTP {resp.status}: {body[:300]!r}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        report.reload_failures.append(f"{type(exc).__name__}: {exc}")


async def client(
    session: aiohttp.ClientSession,
    url: str,
    rng: random.Random,
    deadline: float,
    kinds: Kinds,
    out: list[Outcome],
    kills: bool,
) -> None:
    while time.monotonic() < deadline:
        out.append(await send(session, url, make_spec(rng, kinds.next()), kills))
        await asyncio.sleep(rng.uniform(0, 0.05))


# --- the run and its checks -------------------------------------------------------------------------


def run_soak(
    gateway_url: str,
    seconds: float = 60,
    clients: int = 32,
    kill_engines: bool = True,
    seed: int | None = None,
    gateway_pid: int | None = None,
    config_path: Path | None = None,
) -> SoakReport:
    """Run the soak against a gateway on this machine and check what it left behind.

    Given the gateway's config file, the reloader rewrites it and reloads it during the
    run; the file gets its first content back at the end."""
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 31)
    if gateway_pid is None:
        gateway_pid = listening_pid(int(gateway_url.rsplit(":", 1)[1].split("/")[0]))
        if gateway_pid is None:
            raise RuntimeError(f"no process of ours listens at {gateway_url}")
    report = SoakReport(seed=seed, seconds=seconds, clients=clients, kill_engines=kill_engines)
    asyncio.run(_soak(gateway_url.rstrip("/"), report, gateway_pid, config_path))
    return report


async def _soak(url: str, report: SoakReport, gateway_pid: int, config_path: Path | None) -> None:
    rng = random.Random(report.seed)
    watch = Watch(gateway_pid)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        outcomes = await warm_up(session, url, rng)
        await settle(session, url)
        report.fd_baseline = fd_count(gateway_pid)
        counters_before = (await get_json(session, url + "/gateway/state")).get("counters", {})
        metrics_before = await get_metrics(session, url)
        watch.fd_peak = report.fd_baseline
        started = time.monotonic()
        deadline = started + report.seconds
        stop = asyncio.Event()
        side = [asyncio.create_task(monitor(session, url, watch, stop))]
        if report.kill_engines:
            side.append(asyncio.create_task(killer(session, url, watch, random.Random(rng.random()), stop)))
        if config_path is not None:
            side.append(
                asyncio.create_task(
                    reloader(session, url, config_path, random.Random(rng.random()), stop, report)
                )
            )
        results: list[Outcome] = []
        kinds = Kinds(random.Random(rng.random()))
        await asyncio.gather(
            *(
                client(
                    session, url, random.Random(rng.random()), deadline, kinds, results, report.kill_engines
                )
                for _ in range(report.clients)
            )
        )
        stop.set()
        await asyncio.gather(*side)
        report.wall_seconds = time.monotonic() - started
        outcomes += results
        await settle(session, url)
        outcomes += await recover(session, url, report)
        state = await get_json(session, url + "/gateway/state")
        watch.absorb(state)
        report.counters = state.get("counters", {})
        report.counter_growth = {
            name: grown
            for name, value in report.counters.items()
            if (grown := value - counters_before.get(name, 0))
        }
        report.health_after = await status_of(session, url + "/health")
        report.max_engines = (state.get("memory") or {}).get("max_engines")
        metrics = await check_metrics(session, url, report, outcomes)
    tally(report, results, outcomes)
    report.kills = watch.kills
    report.kill_states = watch.kill_states
    report.engines_seen = len(watch.engines)
    report.peak_engines, report.peak_processes = watch.peak_engines, watch.peak_processes
    report.crowded = watch.crowded[:MAX_LISTED]
    check_history(report, watch)
    if metrics is not None:
        check_engine_metrics(report, metrics, metrics_before or "", report.counters)
    await check_leftovers(report, watch, {int(e["pid"]) for e in state["engines"] if e["pid"]})
    await check_descriptors(report, watch)


async def warm_up(session: aiohttp.ClientSession, url: str, rng: random.Random) -> list[Outcome]:
    """Every model, a stream and a cancelled stream, so pools and caches exist for the baseline."""
    out = []
    for model in reversed(MODELS):
        out.append(await send(session, url, _good_chat(model), kills=False))
    for kind in ("chat", "stream", "stream-cancel", "completion"):
        out.append(await send(session, url, make_spec(random.Random(rng.random()), kind), kills=False))
    return out


def _good_chat(model: str, stream: bool = False) -> Spec:
    body = {"model": model, "messages": [{"role": "user", "content": "warm"}], "max_tokens": 4}
    body["stream"] = stream
    return Spec(
        "stream" if stream else "chat", model, data=json.dumps(body).encode(), stream=stream, max_tokens=4
    )


async def recover(session: aiohttp.ClientSession, url: str, report: SoakReport) -> list[Outcome]:
    """After the storm every model answers again, plain and streamed."""
    out = []
    for model, stream in [*((m, False) for m in MODELS), *((m, True) for m in reversed(MODELS))]:
        outcome = await send(session, url, _good_chat(model, stream), kills=False)
        out.append(outcome)
        if outcome.result != "complete" or outcome.problem:
            report.recovery_failures.append(
                f"{model} stream={stream}: HTTP {outcome.status} {outcome.result} {outcome.problem}"
            )
    return out


async def status_of(session: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def settle(session: aiohttp.ClientSession, url: str) -> None:
    """Wait (bounded) until nothing is in flight or queued and no engine is on its way
    (starting, draining, stopping): each is ready, or down (idle, or crashed with nobody
    asking for it since)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            state = await get_json(session, url + "/gateway/state")
            if (
                not state["in_flight"]
                and not state["queued"]["count"]
                and all(engine["state"] in ("ready", "idle", "crashed") for engine in state["engines"])
            ):
                return
        await asyncio.sleep(0.1)


def tally(report: SoakReport, results: list[Outcome], outcomes: list[Outcome]) -> None:
    report.requests = len(results)
    report.kinds = Counter(o.spec.kind for o in results)
    report.statuses = Counter(o.status or 0 for o in results)
    report.outcomes = Counter(o.result for o in results)
    report.errors = Counter(o.error for o in results if o.error)
    report.served = Counter(
        f"{o.spec.model.replace('-chat', '')}@{o.context}" for o in results if o.status == 200 and o.context
    )
    times = sorted(o.seconds * 1000 for o in results)
    if times:
        report.latency_ms = {
            "median": round(statistics.median(times), 1),
            "p95": round(times[int(0.95 * (len(times) - 1))], 1),
            "max": round(times[-1], 1),
        }
    for o in outcomes:
        if o.result == "hung":
            report.hung_count += 1
            if len(report.hung) < MAX_LISTED:
                report.hung.append(f"{o.spec.describe()}: {o.problem}")
        elif o.problem:
            report.bad_answer_count += 1
            report.problem_kinds[f"HTTP {o.status} {o.result}: " + re.sub(r"\d+", "N", o.problem)[:140]] += 1
            if len(report.bad_answers) < MAX_LISTED:
                report.bad_answers.append(f"{o.spec.describe()}: HTTP {o.status} {o.result}: {o.problem}")


def check_history(report: SoakReport, watch: Watch) -> None:
    entries = [watch.history[key] for key in sorted(watch.history)]
    report.transitions = len(entries)
    report.history_gaps = len(watch.gaps)
    for entry in entries:
        step = (entry["from"], entry["to"], entry["trigger"])
        if step not in LEGAL:
            report.illegal_transitions.append(f"{step[0]} -{step[2]}-> {step[1]} ({entry.get('reason')})")
    report.history_complete = complete = bool(watch.from_start) and not watch.gaps
    by_model: dict[str, Counter[str]] = {}
    for entry in entries:
        by_model.setdefault(entry["model"], Counter())[entry["trigger"]] += 1
    report.transitions_by_model = {model: dict(triggers) for model, triggers in sorted(by_model.items())}
    for model in sorted({entry["model"] for entry in entries}):
        chain = [entry for entry in entries if entry["model"] == model]
        if complete and chain[0]["from"] != "idle":
            report.broken_chain.append(f"{model}'s history starts in {chain[0]['from']!r}, not 'idle'")
        _check_chain(report, watch, chain)


def _check_chain(report: SoakReport, watch: Watch, entries: list[dict[str, Any]]) -> None:
    """One engine's transitions follow each other (unless the poll missed some)."""
    for before, after in itertools.pairwise(entries):
        if after["from"] != before["to"] and not any(
            before["monotonic"] < g <= after["monotonic"] for g in watch.gaps
        ):
            report.broken_chain.append(
                f"{before['from']}->{before['to']} ({before['trigger']}) then "
                f"{after['from']}->{after['to']} ({after['trigger']})"
            )


async def check_leftovers(report: SoakReport, watch: Watch, current: set[int]) -> None:
    """No engine but the current ones: neither a child of the gateway nor an engine we saw
    (the same process: same pid and start time; tests running beside may reuse pids)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        seen = {p for p, started in watch.engines.items() if started is not None and start_time(p) == started}
        others = {p for p in engine_children(watch.gateway_pid) | seen if p not in current}
        # a zombie still holds a pid: it was not reaped yet
        left = sorted(p for p in others if proc_stat(p) is not None and proc_stat(p)[0] == "llama-server")
        if not left or time.monotonic() > deadline:
            report.leftover_engines = left
            return
        await asyncio.sleep(0.2)


async def check_descriptors(report: SoakReport, watch: Watch) -> None:
    """Idle keep-alive connections may take a while to close: the lowest count within the bound."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    report.fd_peak = watch.fd_peak
    report.fd_final = fd_count(watch.gateway_pid)
    while report.fd_growth() > report.fd_slack and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        report.fd_final = min(report.fd_final, fd_count(watch.gateway_pid))


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The (labels, value) samples of one metric in Prometheus' text format."""
    out = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match["name"] == name:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
            out.append((labels, float(match["value"])))
    return out


def requests_total_200(text: str) -> float:
    """The sum of `llm_gateway_requests_total` samples labelled status="200"."""
    return sum(
        v for labels, v in samples(text, "llm_gateway_requests_total") if labels.get("status") == "200"
    )


def by_labels(text: str, name: str, *labels: str) -> Counter[str]:
    """A counter's samples summed by the given labels ("a/b" keys)."""
    out: Counter[str] = Counter()
    for found, value in samples(text, name):
        out["/".join(found.get(label, "") for label in labels)] += int(value)
    return out


def grown(after: Counter[str], before: Counter[str]) -> dict[str, int]:
    return {key: n for key, value in sorted(after.items()) if (n := value - before.get(key, 0))}


def check_engine_metrics(report: SoakReport, text: str, before: str, counters: dict[str, int]) -> None:
    """Starts and evictions during the run from /metrics; they agree with the gateway's own
    counters and, when the polls saw every transition, with each model's `start` edges."""
    starts = by_labels(text, "llm_gateway_starts_total", "model")
    evictions = by_labels(text, "llm_gateway_evictions_total", "model", "reason")
    report.starts = grown(starts, by_labels(before, "llm_gateway_starts_total", "model"))
    report.evictions = grown(evictions, by_labels(before, "llm_gateway_evictions_total", "model", "reason"))
    problems = []
    for name, metric in (("starts", starts), ("evictions", evictions)):
        if sum(metric.values()) != counters.get(name, 0):
            problems.append(
                f"llm_gateway_{name}_total sums to {sum(metric.values())}, /gateway/state's counters "
                f"say {counters.get(name, 0)}"
            )
    if report.history_complete:
        for model, triggers in report.transitions_by_model.items():
            if triggers.get("start", 0) != starts.get(model, 0):
                problems.append(
                    f"{model}: {triggers.get('start', 0)} start transitions, "
                    f"llm_gateway_starts_total says {starts.get(model, 0)}"
                )
    if problems:
        report.metrics_problem = "; ".join(filter(None, [report.metrics_problem, *problems]))


async def get_metrics(session: aiohttp.ClientSession, url: str) -> str | None:
    """The /metrics text, None when there is none."""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status == 200:
                return await resp.text()
    return None


async def check_metrics(
    session: aiohttp.ClientSession, url: str, report: SoakReport, outcomes: list[Outcome]
) -> str | None:
    """Counted 200s >= the complete 200 answers we saw (cancelled and cut streams left out).
    The /metrics text, when there is one."""
    report.clients_200 = sum(1 for o in outcomes if o.status == 200 and o.result == "complete")
    try:
        async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            report.metrics_status = resp.status
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        report.metrics_problem = f"GET /metrics failed: {exc}"
        return None
    if resp.status == 404:
        return None  # not built yet: nothing to compare
    if resp.status != 200:
        report.metrics_problem = f"GET /metrics: HTTP {resp.status}: {text[:200]}"
        return None
    report.metrics_200 = requests_total_200(text)
    if report.metrics_200 < report.clients_200:
        report.metrics_problem = (
            f"llm_gateway_requests_total counts {report.metrics_200:g} answers with status 200, "
            f"the clients saw {report.clients_200} complete ones"
        )
    return text


# --- main: its own gateway ----------------------------------------------------------------------------


def soak_models(models: dict[str, Path]) -> list[dict[str, Any]]:
    """The soak's three models: the two demo models (tiny with three variants, tiny-b) and
    tiny-c, one 4096 variant (on `models["tiny-c"]`, else on tiny-b's file)."""
    if str(ROOT) not in sys.path:  # `python bench/soak.py`: tests/ is importable from the root
        sys.path.insert(0, str(ROOT))
    from tests.conftest import tiny_model_config

    tiny_c = {
        "name": "tiny-c",
        "args": ["-m", str(models.get("tiny-c", models["tiny-b"])), "-t", "1"],
        "default_max_tokens": 64,
        "request": {"defaults": {"temperature": 0}},
        "variants": [{"context": context} for context in VARIANTS["tiny-c"]],
    }
    return [*tiny_model_config(models), tiny_c]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-kill", action="store_true", help="load only, no engine kills")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="llm-gateway-soak-"))
    models = {
        "tiny": write_tiny_model(folder / "tiny.gguf", seed=1),
        "tiny-b": write_tiny_model(folder / "tiny-b.gguf", seed=2),
        "tiny-c": write_tiny_model(folder / "tiny-c.gguf", seed=3),
    }
    port = free_port()
    config = folder / "soak.cfg.lua"
    config.write_text(lua_config(port, soak_models(models), **SERVER))
    log_path = folder / "gateway.log"
    process = spawn_gateway(config, log_path)
    url = f"http://127.0.0.1:{port}"
    report = None
    try:
        wait_healthy(url, process)
        report = run_soak(url, args.seconds, args.clients, not args.no_kill, args.seed, process.pid, config)
    finally:
        shutdown = stop_and_check(process)
        if report is None:  # the run raised: say how the gateway ended, and where it logged
            print(f"the soak did not finish; gateway {shutdown}; gateway log: {log_path}")
        else:
            report.shutdown = shutdown
    print(report.summary())
    if args.json:
        args.json.write_text(json.dumps(report.as_json(), indent=2, default=str))
    if report.problems():
        print(f"gateway log: {log_path}")
        return 1
    shutil.rmtree(folder, ignore_errors=True)
    return 0


def stop_and_check(process: subprocess.Popen[bytes], timeout: float = 30) -> str:
    """SIGTERM, bounded; then no engine of the gateway may be left."""
    children = engine_children(process.pid)
    code = stop_process(process, timeout)
    deadline = time.monotonic() + 5
    while any(live(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [p for p in children if live(p)]
    if code == -signal.SIGKILL:
        return f"did not stop in {timeout:g}s after SIGTERM (killed)"
    if alive:
        return f"exit {code}, engines still alive: {alive}"
    return f"exit {code}"


if __name__ == "__main__":
    sys.exit(main())
