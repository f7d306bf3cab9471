"""The request body reader: what it refuses, in its own words. Pure."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequest
from gateway.server.body import read_json_object


class _Body:
    """Just what read_json_object uses of a request."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.headers: dict[str, str] = {}  # no Content-Encoding

    async def read(self) -> bytes:
        return self.raw


@pytest.mark.parametrize("depth", range(850, 1050))
async def test_a_deep_body_with_a_lone_surrogate_is_a_400_at_any_depth(depth: int) -> None:
    # Every depth near the recursion limit: the parser and the surrogate check must not
    # disagree where one of them runs out of stack (that was a 500).
    raw = b'{"a":' + b"[" * depth + b'"\\ud800"' + b"]" * depth + b"}"
    with pytest.raises(InvalidRequest):
        await read_json_object(_Body(raw))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "refused"),
    [
        (b'{"model":"a","messages":[],"model":"b"}', True),
        (b'{"model":"a","tools":[{"model":"x"},{"model":"y"}]}', False),  # nested ones are theirs
        (b'{"model":"a","messages":[{"content":"\\"model\\" and \\"model\\""}]}', False),
    ],
)
async def test_a_body_naming_model_twice_is_refused(body: bytes, refused: bool) -> None:
    if refused:
        with pytest.raises(InvalidRequest, match="more than once") as info:
            await read_json_object(_Body(body))  # type: ignore[arg-type]
        assert info.value.param == "model"
    else:
        parsed, _ = await read_json_object(_Body(body))  # type: ignore[arg-type]
        assert parsed["model"] == "a"
