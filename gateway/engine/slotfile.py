"""The token prefix a llama.cpp slot file holds, read from its header.

llama-server's `POST /slots/N?action=save` writes the slot's tokens, then its KV cache
state. The header (build b11434, file version 4): the magic "ggsq" (0x67677371), the
version, the number W of 32-bit words that follow, then the words: -1, 1, the token
count n, the n tokens, and one more word. Anything else is not read: the file is then
not used (a later llama.cpp may change the layout; the gateway pins the engine build).
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from pathlib import Path

MAGIC = 0x67677371
VERSION = 4
_HEAD = struct.Struct("<III")


class UnreadableSlotFile(Exception):
    """Not a slot file of the layout this gateway reads."""


def read_tokens(path: Path) -> array[int]:
    """The tokens a slot file holds (raises UnreadableSlotFile or OSError)."""
    with path.open("rb") as file:
        head = file.read(_HEAD.size)
        if len(head) < _HEAD.size:
            raise UnreadableSlotFile(f"{path.name}: too short")
        magic, version, words = _HEAD.unpack(head)
        if magic != MAGIC or version != VERSION:
            raise UnreadableSlotFile(
                f"{path.name}: magic {magic:#x} version {version}, not a v{VERSION} slot file"
            )
        data = array("i")
        data.frombytes(file.read(4 * words))
    if len(data) != words or words < 4 or data[0] != -1 or data[1] != 1 or data[2] != words - 4:
        raise UnreadableSlotFile(f"{path.name}: its token block does not have the expected layout")
    return data[3 : 3 + data[2]]


def as_tokens(values: list[int]) -> array[int] | None:
    """Token ids as a slot file holds them (32-bit), or None when one does not fit: a
    prompt with such an id shares nothing with any saved one."""
    try:
        return array("i", values)
    except OverflowError:
        return None


def digest(tokens: array[int] | list[int]) -> str:
    """A hash of a token sequence (its count is part of it)."""
    packed = tokens if isinstance(tokens, array) else array("i", tokens)
    return hashlib.blake2b(packed.tobytes(), digest_size=16).hexdigest()


def common_prefix(a: array[int] | list[int], b: array[int] | list[int]) -> int:
    """How many leading tokens two sequences share (a binary search over C compares)."""
    x = memoryview(array("i", a).tobytes())
    y = memoryview(array("i", b).tobytes())
    low, high = 0, min(len(x), len(y)) // 4 + 1  # a prefix of `low` is shared, of `high` not
    while high - low > 1:
        mid = (low + high) // 2
        if x[: 4 * mid] == y[: 4 * mid]:
            low = mid
        else:
            high = mid
    return low
