"""Byte counts as people read them."""

from __future__ import annotations

MiB = 1 << 20
GiB = 1 << 30


def human_bytes(count: int) -> str:
    """GiB from 1 GiB on, else MiB, with one decimal: "1.5 GiB", "0.4 MiB"."""
    return f"{count / GiB:.1f} GiB" if count >= GiB else f"{count / MiB:.1f} MiB"
