"""The model-addressed endpoints: how each one's body is validated and sized. Pure."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidRequest
from gateway.models import PromptShape

Body = dict[str, Any]


@dataclass(frozen=True)
class Endpoint:
    path: str
    kind: str  # chat, completion, embedding, rerank, other
    # The answer's length (llama.cpp reads its own `n_predict` too): the largest present is
    # reserved; the first is the one the gateway sets when none is. () = no answer.
    reserve_fields: tuple[str, ...]
    validate: Callable[[Body], None]
    shape: Callable[[Body, bytes], PromptShape]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(t) for t in value)


def _is_prompt(value: Any) -> bool:
    """A string, token ids, or a non-empty list of either."""
    if isinstance(value, str) or _is_token_ids(value):
        return True
    return (
        isinstance(value, list) and bool(value) and all(isinstance(p, str) or _is_token_ids(p) for p in value)
    )


def _require(ok: bool, param: str, what: str) -> None:
    if not ok:
        raise InvalidRequest(f"'{param}' must be {what}", param=param)


def _objects(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


def _validate_messages(body: Body) -> None:
    """The fields the gateway reads to size a chat prompt; the engine checks the rest."""
    messages = body.get("messages")
    _require(isinstance(messages, list) and bool(messages), "messages", "a non-empty array of messages")
    assert isinstance(messages, list)
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        _require(
            isinstance(message, dict) and isinstance(message.get("role"), str),
            at,
            "an object with a string 'role'",
        )
        content = message.get("content")
        _require(
            content is None or isinstance(content, str | list),
            f"{at}.content",
            "a string, an array of parts, or null",
        )
        for j, part in enumerate(content if isinstance(content, list) else []):
            _validate_part(part, f"{at}.content[{j}]")
        _require(message.get("name") is None or isinstance(message["name"], str), f"{at}.name", "a string")
        if "tool_calls" in message and message["tool_calls"] is not None:
            _require(_objects(message["tool_calls"]), f"{at}.tool_calls", "an array of objects")
    if body.get("tools") is not None:
        _require(_objects(body["tools"]), "tools", "an array of objects")


def _validate_part(part: Any, at: str) -> None:
    _require(
        isinstance(part, dict) and isinstance(part.get("type"), str), at, "an object with a string 'type'"
    )
    if part["type"] == "text":
        _require(isinstance(part.get("text"), str), f"{at}.text", "a string")


def _validate_field(name: str) -> Callable[[Body], None]:
    def validate(body: Body) -> None:
        if name not in body:
            raise InvalidRequest(f"'{name}' is required", param=name)
        if not _is_prompt(body[name]):
            raise InvalidRequest(
                f"'{name}' must be a string, an array of token ids, or an array of those",
                param=name,
            )

    return validate


def _no_validation(body: Body) -> None:
    return None


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


# Roles whose markup the template overhead measured at start covers; a template wraps
# others (tool results, say) in text of its own.
_MEASURED_ROLES = frozenset({"system", "user", "assistant"})


def _chat_shape(body: Body, raw: bytes) -> PromptShape:
    text, bounded = 0, True
    for message in body["messages"]:
        text += _utf8_len(message["role"])  # the template renders it, whatever its length
        bounded = bounded and message["role"] in _MEASURED_ROLES
        content = message.get("content")
        if isinstance(content, str):
            text += _utf8_len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    text += _utf8_len(part["text"]) + 1  # llama.cpp joins parts with "\n"
                else:
                    bounded = False  # images, audio: their tokens are not bytes
        extra = {k: v for k, v in message.items() if k not in ("role", "content")}
        if extra:  # tool calls, names: the template renders them in its own way
            text += len(json.dumps(extra))
            bounded = False
    if body.get("tools"):
        text += len(json.dumps(body["tools"]))
        bounded = False
    return PromptShape(text_bytes=text, messages=len(body["messages"]), bounded=bounded)


def _prompt_shape(field: str) -> Callable[[Body, bytes], PromptShape]:
    def shape(body: Body, raw: bytes) -> PromptShape:
        prompts = body[field]
        if isinstance(prompts, str) or _is_token_ids(prompts):
            prompts = [prompts]
        # Several prompts run as separate sequences: the largest one must fit.
        texts = [_utf8_len(p) for p in prompts if isinstance(p, str)]
        ids = [len(p) for p in prompts if isinstance(p, list)]
        return PromptShape(
            text_bytes=max(texts, default=0), token_ids=max(ids, default=0), prompts=len(prompts)
        )

    return shape


def _raw_shape(body: Body, raw: bytes) -> PromptShape:
    # No tokenizer call for these: the body's length bounds the text it carries.
    return PromptShape(text_bytes=len(raw), bounded=False)


# Every name llama-server reads as the answer's length, on any of its endpoints.
_LIMIT_NAMES = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n_predict")


def _answer_limits(own: str) -> tuple[str, ...]:
    """The endpoint's own name first (the one the gateway sets), then the others."""
    return (own, *(name for name in _LIMIT_NAMES if name != own))


_chat = Endpoint(
    "/v1/chat/completions",
    "chat",
    _answer_limits("max_tokens"),
    _validate_messages,
    _chat_shape,
)
_completion = Endpoint(
    "/v1/completions",
    "completion",
    _answer_limits("max_tokens"),
    _validate_field("prompt"),
    _prompt_shape("prompt"),
)
_embedding = Endpoint("/v1/embeddings", "embedding", (), _validate_field("input"), _prompt_shape("input"))

ENDPOINTS: dict[str, Endpoint] = {
    e.path: e
    for e in (
        _chat,
        _completion,
        _embedding,
        Endpoint("/v1/responses", "other", _answer_limits("max_output_tokens"), _no_validation, _raw_shape),
        Endpoint("/v1/messages", "other", _answer_limits("max_tokens"), _validate_messages, _raw_shape),
        Endpoint("/v1/messages/count_tokens", "other", (), _validate_messages, _raw_shape),
        Endpoint("/v1/rerank", "rerank", (), _no_validation, _raw_shape),
        Endpoint("/v1/reranking", "rerank", (), _no_validation, _raw_shape),
    )
}

# Endpoints of the OpenAI API that llama-server does not serve.
UNSUPPORTED_PREFIXES = ("/v1/images", "/v1/audio", "/v1/files", "/v1/fine_tuning", "/v1/batches")


def reserve(endpoint: Endpoint, body: Body, default: int) -> int:
    """The answer's tokens: the largest limit the request sets, else the model's default."""
    limits = [_positive(body, name) for name in endpoint.reserve_fields if body.get(name) is not None]
    return max(limits, default=default if endpoint.reserve_fields else 0)


def limit_answer(endpoint: Endpoint, body: Body, reserve: int) -> Body:
    """The body with the answer's length set to its reserve when the client set none, so
    that the engine never generates past what the gateway reserved for it."""
    fields = endpoint.reserve_fields
    if not fields or any(body.get(name) is not None for name in fields):
        return body
    return {**body, fields[0]: reserve}


def copies(body: Body) -> int:
    """Answers asked for each prompt: OpenAI's `n`, llama.cpp's `n_cmpl`."""
    return max((_positive(body, name) for name in ("n", "n_cmpl") if body.get(name) is not None), default=1)


def _positive(body: Body, name: str) -> int:
    value = body[name]
    if not _is_int(value) or value <= 0:
        raise InvalidRequest(f"'{name}' must be a positive integer", param=name)
    return int(value)


def check_common(body: Body) -> None:
    """Fields every model-addressed endpoint shares."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    copies(body)
