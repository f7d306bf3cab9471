"""What the bench sections share: a process's CPU and memory from /proc, one cheaply
parsed stream, and many streams at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


async def fast_stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One stream, parsed cheaply (hundreds of them share this process's one core): time
    to its first content chunk, its content chunks, or its error."""
    start = time.perf_counter()
    ttft = None
    chunks = 0
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                return {"error": f"{resp.status} {(await resp.text())[:200]}"}
            async for raw in resp.content:
                if raw.startswith(b"data: {") and b'"content":"' in raw:
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
    except (TimeoutError, aiohttp.ClientError) as exc:
        return {"error": repr(exc)}
    if chunks == 0 or ttft is None:
        return {"error": "no content chunks"}
    end = time.perf_counter()
    return {"ttft_ms": ttft * 1000, "chunks": chunks, "total_ms": (end - start) * 1000, "end": end}


async def sample_rss(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], status_kb(pid, "VmRSS"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.01)


@dataclass
class Load:
    """Streams run at once: what came back, and what the watched process spent."""

    results: list[dict[str, Any]]
    wall_s: float
    cpu_s: float | None  # of the watched process
    rss_before_mb: float | None
    peak_rss_mb: float | None  # sampled every 10 ms

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.results if "error" not in r]

    @property
    def errors(self) -> list[str]:
        return [r["error"] for r in self.results if "error" in r]

    @property
    def chunks(self) -> int:
        return sum(r["chunks"] for r in self.ok)

    def counts(self) -> dict[str, Any]:
        """What every section reports of it."""
        return {
            "requests": len(self.results),
            "errors": len(self.errors),
            "error_samples": self.errors[:3],
            "chunks": self.chunks,
            "wall_s": self.wall_s,
        }


async def concurrently(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], clients: int, each: int, pid: int | None
) -> Load:
    """`clients` streams at once, `each` one after another per client; `pid`, the process
    whose CPU and memory are watched meanwhile."""
    results: list[dict[str, Any]] = []
    gate = asyncio.Event()

    async def client() -> None:
        await gate.wait()
        for _ in range(each):
            results.append(await fast_stream(session, url, body))

    tasks = [asyncio.ensure_future(client()) for _ in range(clients)]
    await asyncio.sleep(0)
    peak, stop = [0], asyncio.Event()
    sampler = asyncio.ensure_future(sample_rss(pid, peak, stop)) if pid else None
    rss_before = status_kb(pid, "VmRSS") / 1024 if pid else None
    cpu_before = cpu_seconds(pid) if pid else 0.0
    start = time.perf_counter()
    gate.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    cpu = cpu_seconds(pid) - cpu_before if pid else None
    stop.set()
    if sampler is not None:
        await sampler
    return Load(results, wall, cpu, rss_before, peak[0] / 1024 if pid else None)
