"""What each endpoint takes from a body: validation, the prompt's shape, the reserve. Pure."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequest
from gateway.models import PromptShape
from gateway.server.endpoints import ENDPOINTS, check_common, copies, limit_answer, reserve

CHAT = ENDPOINTS["/v1/chat/completions"]
COMPLETION = ENDPOINTS["/v1/completions"]
EMBEDDING = ENDPOINTS["/v1/embeddings"]


def test_chat_shape_counts_utf8_bytes_of_every_text() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "é" * 10},  # 2 bytes each
            {"role": "user", "content": [{"type": "text", "text": "abc"}, {"type": "text", "text": "de"}]},
            {"role": "assistant", "content": None},
        ]
    }
    roles = len("system") + len("user") + len("assistant")  # the template renders them too
    joins = 2  # llama.cpp joins text parts with a newline each
    assert CHAT.shape(body, b"") == PromptShape(text_bytes=25 + roles + joins, messages=3, bounded=True)


def test_roles_count_in_the_byte_bound_and_unmeasured_ones_lose_it() -> None:
    # A role's bytes are rendered by the template: the bound must cover them, or a
    # request granted on the bound overflows the engine's shared cache.
    shape = CHAT.shape({"messages": [{"role": "system", "content": "hi"}]}, b"")
    assert shape.bounded and shape.text_bytes == 8
    # A template wraps roles it was not measured with (tool results, a 600-byte role) in
    # text of its own: such a prompt is counted on the engine, never bounded.
    for role in ("tool", "r" * 600):
        shape = CHAT.shape({"messages": [{"role": role, "content": "hi"}]}, b"")
        assert not shape.bounded and shape.text_bytes == len(role) + 2


def test_many_text_parts_count_their_joins() -> None:
    parts = [{"type": "text", "text": "a"}] * 100
    assert CHAT.shape({"messages": [{"role": "user", "content": parts}]}, b"").text_bytes == 4 + 200


def test_tools_images_and_tool_calls_count_but_lose_the_byte_bound() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with_tools = CHAT.shape({"messages": [{"role": "user", "content": "hi"}], "tools": tools}, b"")
    assert with_tools.text_bytes > 2 and not with_tools.bounded
    image = {"type": "image_url", "image_url": {"url": "data:..."}}
    assert not CHAT.shape({"messages": [{"role": "user", "content": [image]}]}, b"").bounded
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": {"name": "f"}}]}
    shape = CHAT.shape({"messages": [call]}, b"")
    assert shape.text_bytes > 0 and not shape.bounded


@pytest.mark.parametrize(
    ("prompt", "text_bytes", "token_ids"),
    [
        ("hello", 5, 0),
        (["a", "abcd", "ab"], 4, 0),  # several prompts: the largest must fit
        ([1, 2, 3], 0, 3),
        ([[1, 2], [1, 2, 3, 4]], 0, 4),
        (["abc", [1, 2, 3, 4, 5]], 3, 5),
    ],
)
def test_completion_prompt_shapes(prompt, text_bytes: int, token_ids: int) -> None:
    shape = COMPLETION.shape({"prompt": prompt}, b"")
    assert (shape.text_bytes, shape.token_ids) == (text_bytes, token_ids)
    several = isinstance(prompt, list) and not all(isinstance(t, int) for t in prompt)
    assert shape.prompts == (len(prompt) if several else 1)
    assert EMBEDDING.shape({"input": prompt}, b"") == shape


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": []},  # empty messages
        {"messages": "hi"},
        {"messages": [{"content": "no role"}]},
        {"messages": [{"role": 1, "content": "x"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": ["not an object"]},
    ],
)
def test_invalid_chat_bodies(body) -> None:
    with pytest.raises(InvalidRequest) as info:
        CHAT.validate(body)
    assert info.value.param is not None and info.value.param.startswith("messages")


@pytest.mark.parametrize("prompt", [None, 5, [], [1.5], [True], {"a": 1}, [[]], [["a"]]])
def test_invalid_prompts(prompt) -> None:
    with pytest.raises(InvalidRequest):
        COMPLETION.validate({"prompt": prompt})


def test_reserve_takes_the_largest_limit_given_else_the_default() -> None:
    assert reserve(CHAT, {}, 256) == 256
    assert reserve(CHAT, {"max_tokens": 10}, 256) == 10
    assert reserve(CHAT, {"max_completion_tokens": 20, "max_tokens": 10}, 256) == 20
    assert reserve(CHAT, {"max_completion_tokens": 5, "max_tokens": 10}, 256) == 10
    # llama.cpp's own n_predict sets the answer's length too, whatever max_tokens says,
    # and it reads every name of the limit on every endpoint.
    assert reserve(CHAT, {"max_tokens": 1, "n_predict": 1000}, 256) == 1000
    assert reserve(COMPLETION, {"max_tokens": 1, "n_predict": 700}, 256) == 700
    assert reserve(COMPLETION, {"max_tokens": 5, "max_completion_tokens": 300}, 256) == 300
    responses = ENDPOINTS["/v1/responses"]
    assert reserve(responses, {"max_output_tokens": 5, "max_completion_tokens": 300}, 256) == 300
    assert reserve(CHAT, {"max_tokens": None}, 256) == 256
    assert reserve(EMBEDDING, {"max_tokens": 10}, 256) == 0  # no answer to reserve
    for name in ("max_tokens", "max_completion_tokens", "n_predict"):
        for bad in (0, -1, 1.5, "10", True, 1e30):
            with pytest.raises(InvalidRequest) as info:
                reserve(CHAT, {name: bad}, 256)
            assert info.value.param == name


def test_a_request_without_a_limit_gets_its_reserve_as_the_limit() -> None:
    assert limit_answer(CHAT, {"messages": []}, 64) == {"messages": [], "max_tokens": 64}
    assert limit_answer(COMPLETION, {"prompt": "x"}, 64) == {"prompt": "x", "max_tokens": 64}
    given = {"prompt": "x", "n_predict": 5}
    assert limit_answer(COMPLETION, given, 64) is given
    assert limit_answer(EMBEDDING, {"input": "x"}, 0) == {"input": "x"}


def test_copies_reads_n_and_n_cmpl() -> None:
    assert copies({}) == 1
    assert copies({"n": 3}) == 3
    assert copies({"n_cmpl": 4, "n": 2}) == 4
    for bad in ({"n_cmpl": 0}, {"n_cmpl": "2"}, {"n": 1.0}):
        with pytest.raises(InvalidRequest):
            copies(bad)


@pytest.mark.parametrize("body", [{"stream": "yes"}, {"stream": 1}, {"n": 0}, {"n": "2"}, {"n": True}])
def test_common_fields(body) -> None:
    with pytest.raises(InvalidRequest):
        check_common(body)
    check_common({"stream": True, "n": 2})
