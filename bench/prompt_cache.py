"""Benchmark section 8: a conversation grown across the variants, with and without the
prompt cache. Each step needs a larger variant than the one before (an upgrade); the
engine reports how many prompt tokens it processed (`timings.prompt_n`) and took from
its cache (`cache_n`)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

from gateway.demo.harness import free_port, lua_config, spawn_gateway, stop_process, wait_healthy

STEPS = [1000, 4000, 12000, 30000]  # the conversation's prompt tokens at each step, about
VARIANTS = [2048, 8192, 16384, 32768]
ANSWER = 16
THREADS = 1


def config(port: int, tiny: Path, cache: bool) -> str:
    model = {
        "name": "tiny",
        "args": ["-m", str(tiny), "-t", str(THREADS)],
        "default_max_tokens": ANSWER,
        "request": {"defaults": {"temperature": 0}},
        "variants": [{"context": c} for c in VARIANTS],
    }
    return lua_config(port, [model], engine_startup_timeout=60, prompt_cache=cache)


async def turn(session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    """One streamed turn: its time to first token, and the engine's timings."""
    body = {"model": "tiny", "messages": messages, "max_tokens": ANSWER, "stream": True}
    start = time.perf_counter()
    ttft = None
    text, timings, context = "", {}, ""
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        context = resp.headers.get("X-Gateway-Context", "")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            delta = (event.get("choices") or [{}])[0].get("delta", {})
            if delta.get("content"):
                ttft = ttft or time.perf_counter() - start
                text += delta["content"]
            timings = event.get("timings", timings)
    return {
        "context": int(context or 0),
        "ttft_ms": (ttft or time.perf_counter() - start) * 1000,
        "prompt_n": timings.get("prompt_n"),
        "cache_n": timings.get("cache_n"),
        "answer": text,
    }


async def grow(session: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    messages: list[dict[str, str]] = []
    rows = []
    total = 0
    for step in STEPS:
        words = max(1, (step - total) // 5)  # "word " is 5 tokens on the demo model (one a byte)
        messages.append({"role": "user", "content": "word " * words})
        row = await turn(session, url, messages)
        messages.append({"role": "assistant", "content": row.pop("answer")})
        total = (row["prompt_n"] or 0) + (row["cache_n"] or 0)
        row["prompt_tokens"] = total
        rows.append(row)
    return rows


async def prompt_cache(
    session: aiohttp.ClientSession, folder: Path, models: dict[str, Path]
) -> dict[str, Any]:
    """Starts a gateway with the prompt cache and one without, grows one conversation on
    each, stops them."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    out: dict[str, Any] = {"steps": STEPS, "variants": VARIANTS, "answer_tokens": ANSWER}
    try:
        for name, cache in (("with the prompt cache", True), ("without", False)):
            port = free_port()
            path = folder / f"prompt-cache-{cache}.cfg.lua"
            path.write_text(config(port, models["tiny"], cache))
            procs[name] = spawn_gateway(path, folder / f"gateway-prompt-cache-{cache}.log", "warning")
            url = f"http://127.0.0.1:{port}"
            await asyncio.to_thread(wait_healthy, url, procs[name], 30)
            out[name] = await grow(session, url)
            out.setdefault("exit_codes", {})[name] = await asyncio.to_thread(
                stop_process, procs.pop(name), 10
            )
    finally:
        for name, proc in procs.items():
            out.setdefault("exit_codes", {})[name] = await asyncio.to_thread(stop_process, proc, 10)
    return out


def markdown(p: dict[str, Any], t: str) -> list[str]:
    """Section 8 of docs/benchmarks.md."""
    lines = [
        f"## 8. The prompt cache across upgrades (one conversation grown in {len(p['steps'])} steps, {t})",
        "",
        "Each step adds a user turn so that the prompt needs the next variant "
        f"({', '.join(str(v) for v in p['variants'])} tokens): every step after the first is an upgrade",
        "to a new engine. With the prompt cache the stopping engine's slot is saved and the new one",
        "restores it before the request runs; without it the new engine processes the whole prompt.",
        "*Re-processed*: tokens of the conversation before this step that the engine computed again",
        "(the earlier prompt less the engine's `cache_n`), and their share of that earlier prompt.",
        "",
        "| step | prompt tokens | context | re-processed, with the cache | TTFT with, ms "
        "| re-processed, without | TTFT without, ms |",
        "|---|---|---|---|---|---|---|",
    ]
    before = 0
    for n, (a, b) in enumerate(zip(p["with the prompt cache"], p["without"], strict=True), 1):
        cells = [str(n), str(a["prompt_tokens"]), str(a["context"])]
        for side in (a, b):
            again = max(0, before - (side["cache_n"] or 0))
            cells += [f"{again} ({again / before * 100:.1f}%)" if before else "-", f"{side['ttft_ms']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
        before = a["prompt_tokens"]
    lines.append("")
    return lines
