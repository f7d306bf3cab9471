"""The longest token of a GGUF vocabulary, read by the gateway's own metadata reader,
against the gguf package's full reader on the models the project generates."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader

from gateway.engine.gguf import longest_token_bytes


def _oracle(path: Path) -> int:
    field = GGUFReader(str(path)).fields["tokenizer.ggml.tokens"]
    return max(len(bytes(field.parts[i])) for i in field.data)


@pytest.mark.parametrize("name", ["tiny", "tiny-b"])
def test_the_longest_token_matches_the_gguf_reader(tiny_models: dict[str, Path], name: str) -> None:
    path = tiny_models[name]
    assert longest_token_bytes(path) == _oracle(path)
    assert longest_token_bytes(path) == len(b"<|endoftext|>")  # the demo vocabulary's longest


def test_files_that_are_not_a_whole_gguf_give_none(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    data = tiny_models["tiny"].read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[:2000])  # ends inside the metadata
    other = tmp_path / "other.bin"
    other.write_bytes(b"not a model at all")
    assert longest_token_bytes(truncated) is None
    assert longest_token_bytes(other) is None
    assert longest_token_bytes(tmp_path / "missing.gguf") is None
