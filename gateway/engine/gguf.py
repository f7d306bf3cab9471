"""Reads the one fact of a GGUF file's vocabulary the gateway needs: its longest token.

A prompt of B bytes is at least B / (longest token in bytes) tokens long, a true lower
bound that rejects a hopelessly large prompt without starting (or swapping to) an engine
to count it. Only the metadata is read, key by key, up to the token list.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

_MAGIC = b"GGUF"
_TOKENS_KEY = b"tokenizer.ggml.tokens"
_STRING, _ARRAY = 8, 9
# Sizes of GGUF's fixed-size value types, by type id.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _NotGGUF(Exception):
    pass


def longest_token_bytes(path: str | Path) -> int | None:
    """The UTF-8 length of the vocabulary's longest token (an upper bound of the text any
    one token stands for), or None when the file is not a readable GGUF with a vocabulary."""
    try:
        with open(path, "rb") as f:
            return _longest_token(f)
    except (OSError, _NotGGUF, struct.error):
        return None


def _longest_token(f: BinaryIO) -> int | None:
    if f.read(4) != _MAGIC:
        raise _NotGGUF
    version, _tensors, keys = struct.unpack("<IQQ", _read(f, 20))
    if version < 2:
        raise _NotGGUF  # v1 used 32-bit counts; no current tool writes it
    for _ in range(keys):
        key = _string(f)
        kind = _u32(f)
        if key == _TOKENS_KEY and kind == _ARRAY and _u32(f) == _STRING:
            return max((len(_string(f)) for _ in range(_u64(f))), default=0) or None
        _skip(f, kind)
    return None


def _skip(f: BinaryIO, kind: int) -> None:
    if kind == _STRING:
        f.seek(_u64(f), 1)
    elif kind == _ARRAY:
        item, count = _u32(f), _u64(f)
        if item in _FIXED:
            f.seek(_FIXED[item] * count, 1)
        else:
            for _ in range(count):
                _skip(f, item)
    elif kind in _FIXED:
        f.seek(_FIXED[kind], 1)
    else:
        raise _NotGGUF


def _read(f: BinaryIO, size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise _NotGGUF
    return data


def _u32(f: BinaryIO) -> int:
    return int(struct.unpack("<I", _read(f, 4))[0])


def _u64(f: BinaryIO) -> int:
    return int(struct.unpack("<Q", _read(f, 8))[0])


def _string(f: BinaryIO) -> bytes:
    return _read(f, _u64(f))
