"""Gateway benchmarks on loopback, side by side with llama-server direct and its router mode.

Sections: proxy overhead (direct / gateway / llama-server router mode), gateway CPU per
streamed chunk (uvloop and asyncio), exact counting (its own cost, and what the byte bound
saves), swaps (gateway and router), estimate hit rate, concurrency (1 to 256 streams),
several engines (three models in a random mix: max_engines 1 and 3, router --models-max 3),
the prompt cache (a conversation grown across the variants, with and without it), the
hop at the limit (the gateway's relay against a plain aiohttp pass-through, the floor of a
Python relay and the router; 1,000 concurrent streams).

Run as `.venv/bin/python bench/run.py` (`make bench`). Writes bench/results.json,
docs/benchmarks.md and the plots in docs/. Generates the tiny demo models, starts the
gateways and the routers as subprocesses, always stops them.

`bench/run.py --only engines` (or `--only prompt_cache`, `--only hop`) runs that section alone (it starts
its own gateways) and prints it; it leaves bench/results.json and docs/ alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from hop import hop
from hop import markdown as hop_markdown
from measure import concurrently, cpu_seconds, status_kb
from prompt_cache import markdown as prompt_cache_markdown
from prompt_cache import prompt_cache
from report import engines_markdown, markdown, plots
from router import child_listening_ms, spawn_router

from gateway.demo.harness import free_port, lua_config, spawn_gateway, stop_process, wait_healthy
from gateway.demo.tinymodel import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
REPORT = ROOT / "docs" / "benchmarks.md"
THREADS = 1  # engine threads (-t)
GEN_TOKENS = 256
N = 15  # repetitions per side-by-side measurement
CPU_REQUESTS = 16  # per repetition and event loop
CPU_REPS = 5
SWAPS = 6
BIG_CONTEXT = 34000
COUNT_SIZES = [1000, 8000, 32000]
COUNT_REPS = 10
COLD_SIZES = [300, 1500, 1900, 2500, 6000, 7800, 12000, 30000]
CONCURRENCY = [1, 16, 64, 256]
CONC_TOKENS = 64
CONC_MIN_REQUESTS = 32  # per level: c clients run ceil(32 / c) requests each, at least one
TIMEOUT = aiohttp.ClientTimeout(total=180)


def tiny_model(tiny: Path, variants: list[int]) -> dict[str, Any]:
    return {
        "name": "tiny",
        "args": ["-m", str(tiny), "-t", str(THREADS)],
        "default_max_tokens": 64,
        "request": {"defaults": {"temperature": 0}},
        "variants": [{"context": c} for c in variants],
    }


def config_text(port: int, tiny: Path, tiny_b: Path) -> str:
    models = [
        tiny_model(tiny, [2048, 8192, BIG_CONTEXT]),
        {
            "name": "tiny-b",
            "args": ["-m", str(tiny_b), "-t", str(THREADS)],
            "default_max_tokens": 64,
            "request": {"defaults": {"temperature": 0}},
            "variants": [{"context": 2048}],
        },
    ]
    return lua_config(port, models, engine_startup_timeout=60)


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "p90": percentile(ordered, 0.9),
        "p99": percentile(ordered, 0.99),
        "n": len(ordered),
    }


def chat(model: str, content: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


async def streamed(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, float]:
    start = time.perf_counter()
    ttft = None
    chunks = 0
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            data = json.loads(line[5:])
            choices = data.get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    total = time.perf_counter() - start
    return {"ttft_ms": (ttft or total) * 1000, "total_ms": total * 1000, "chunks": chunks}


async def plain(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> float:
    start = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        text = await resp.text()
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status} {text[:300]}")
    return (time.perf_counter() - start) * 1000


async def post_json(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status} {(await resp.text())[:300]}")
        return await resp.json()


async def state(session: aiohttp.ClientSession, gw: str) -> dict[str, Any]:
    async with session.get(gw + "/gateway/state") as resp:
        return await resp.json()


def running(st: dict[str, Any], model: str) -> dict[str, Any] | None:
    """`model`'s engine in a /gateway/state answer when it has a process, else None."""
    return next((e for e in st["engines"] if e["model"] == model and e["pid"]), None)


def engine_of(st: dict[str, Any], model: str) -> dict[str, Any]:
    """`model`'s running engine (it must run)."""
    engine = running(st, model)
    if engine is None:
        raise RuntimeError(f"no engine of {model} runs: {st['engines']}")
    return engine


def engine_url(engine: dict[str, Any]) -> str:
    return f"http://127.0.0.1:{engine['port']}"


async def counters(session: aiohttp.ClientSession, gw: str) -> dict[str, int]:
    return dict((await state(session, gw)).get("counters") or {})


async def slot_context(session: aiohttp.ClientSession, engine: str) -> int:
    async with session.get(engine + "/slots") as resp:
        if resp.status == 200:
            return min(int(slot["n_ctx"]) for slot in await resp.json())
    async with session.get(engine + "/props") as resp:
        return int((await resp.json())["default_generation_settings"]["n_ctx"])


# 1. Proxy overhead: direct, through the gateway, through llama-server's router mode.


async def proxy_overhead(session: aiohttp.ClientSession, gw: str, router: str | None) -> dict[str, Any]:
    await plain(session, gw, chat("tiny", "hello", 8, False))  # engine up (2048 variant)
    engine = engine_url(engine_of(await state(session, gw), "tiny"))
    sides = [("direct", engine), ("gateway", gw)] + ([("router", router)] if router else [])
    body_s = chat("tiny", "Tell me a story.", GEN_TOKENS, True)
    body_p = chat("tiny", "Tell me a story.", GEN_TOKENS, False)
    for _, url in sides:  # warm-up (the router loads its model here)
        await streamed(session, url, body_s)
    rows: dict[str, dict[str, list[float]]] = {
        side: {"ttft_ms": [], "total_ms": [], "tok_s": [], "plain_ms": []} for side, _ in sides
    }
    before = await counters(session, gw)
    for _ in range(N):
        for side, url in sides:
            r = await streamed(session, url, body_s)
            rows[side]["ttft_ms"].append(r["ttft_ms"])
            rows[side]["total_ms"].append(r["total_ms"])
            rows[side]["tok_s"].append(r["chunks"] / (r["total_ms"] / 1000))
            rows[side]["plain_ms"].append(await plain(session, url, body_p))
    out: dict[str, Any] = {side: {k: stats(v) for k, v in m.items()} for side, m in rows.items()}
    out["raw_ttft_ms"] = {side: m["ttft_ms"] for side, m in rows.items()}
    out["gateway_requeued"] = (await counters(session, gw)).get("requeued", 0) - before.get("requeued", 0)
    return out


# 2. Gateway CPU per streamed chunk on both event loops.


async def cpu_per_chunk(
    session: aiohttp.ClientSession, gateways: dict[str, tuple[str, int]]
) -> dict[str, Any]:
    body = chat("tiny", "Tell me a story.", GEN_TOKENS, True)
    for url, _ in gateways.values():  # engines up, warm
        await streamed(session, url, body)
    reps: dict[str, list[dict[str, float]]] = {loop: [] for loop in gateways}
    for _ in range(CPU_REPS):
        for loop, (url, pid) in gateways.items():  # alternating loops, repetition by repetition
            before = cpu_seconds(pid)
            wall = time.perf_counter()
            chunks = 0
            for _ in range(CPU_REQUESTS):
                chunks += int((await streamed(session, url, body))["chunks"])
            wall = time.perf_counter() - wall
            cpu = cpu_seconds(pid) - before
            reps[loop].append(
                {"chunks": chunks, "cpu_s": cpu, "wall_s": wall, "us_per_chunk": cpu / chunks * 1e6}
            )
    return {
        "requests_per_rep": CPU_REQUESTS,
        "reps": CPU_REPS,
        "clock_ticks_per_s": os.sysconf("SC_CLK_TCK"),
        "loops": {
            loop: {
                "runs": runs,
                "chunks_per_rep": statistics.median(r["chunks"] for r in runs),
                "cpu_s": statistics.median(r["cpu_s"] for r in runs),
                "wall_s": statistics.median(r["wall_s"] for r in runs),
                "us_per_chunk": stats([r["us_per_chunk"] for r in runs]),
            }
            for loop, runs in reps.items()
        },
    }


# 3. Counting: its own cost on the engine, and what the byte bound saves the gateway.


def filler(n: int) -> str:
    return ("abcdefgh " * (n // 9 + 1))[:n]


async def count_on_engine(session: aiohttp.ClientSession, engine: str, body: dict[str, Any]) -> int:
    templated = await post_json(session, engine + "/apply-template", body)
    tokens = await post_json(
        session,
        engine + "/tokenize",
        {"content": templated["prompt"], "add_special": True, "parse_special": True},
    )
    return len(tokens["tokens"])


async def counting(session: aiohttp.ClientSession, gw: str) -> dict[str, Any]:
    # The largest prompt first: the BIG_CONTEXT variant starts and then serves every size.
    await plain(session, gw, chat("tiny", filler(max(COUNT_SIZES)), 1, False))
    tiny = engine_of(await state(session, gw), "tiny")
    engine = engine_url(tiny)
    variant = tiny["variant"]["context"]
    ctx = await slot_context(session, engine)  # llama.cpp rounds n_ctx up (to 256s)
    out: dict[str, Any] = {"variant": variant, "slot_context": ctx, "engine_count": {}, "added": []}
    # (a) POST /apply-template then POST /tokenize, straight against the engine.
    for n in COUNT_SIZES:
        body = chat("tiny", filler(n), 1, False)
        tokens = await count_on_engine(session, engine, body)  # warm-up
        times = []
        for _ in range(COUNT_REPS):
            t = time.perf_counter()
            await count_on_engine(session, engine, body)
            times.append((time.perf_counter() - t) * 1000)
        out["engine_count"][str(n)] = {"tokens": tokens, "ms": stats(times)}
    # The gateway's bound for one chat message, computed the way it does (llamacpp.py).
    one = await count_on_engine(session, engine, {"messages": [{"role": "user", "content": ""}]})
    three = await count_on_engine(
        session, engine, {"messages": [{"role": r, "content": ""} for r in ("user", "assistant", "user")]}
    )
    per_message = max(0, three - one)
    fixed = max(0, one - per_message)

    def bound(n: int) -> int:
        return fixed + (per_message + 1) + n

    largest_proven = ctx - 1 - bound(0)  # bytes: bound + max_tokens 1 == ctx
    cases = [
        ("small prompt, bound proves the fit", 1000),
        ("90% of the context, bound proves the fit", int(ctx * 0.9)),
        ("largest prompt the bound proves", largest_proven),
        ("one byte more: bound misses, gateway counts", largest_proven + 1),
    ]
    # (b) max_tokens 1 requests, direct vs through the gateway, on the same ready engine.
    for label, n in cases:
        body = chat("tiny", filler(n), 1, False)
        exact = await count_on_engine(session, engine, body)
        await plain(session, engine, body)  # the prompt cache holds it for both sides
        await plain(session, gw, body)
        direct, via = [], []
        before = await counters(session, gw)
        for _ in range(COUNT_REPS):
            direct.append(await plain(session, engine, body))
            via.append(await plain(session, gw, body))
        after = await counters(session, gw)
        out["added"].append(
            {
                "case": label,
                "prompt_bytes": n,
                "exact_tokens": exact,
                "bound_tokens": bound(n),
                "bound_proves": bound(n) + 1 <= ctx,
                "fits": exact + 1 <= ctx,
                "direct_ms": stats(direct),
                "gateway_ms": stats(via),
                "added_ms": statistics.median(via) - statistics.median(direct),
                # The gateway's own record: requests it counted exactly (tokens_counted / exact).
                "gateway_counted": (after.get("tokens_counted", 0) - before.get("tokens_counted", 0)) / exact,
                "requests": COUNT_REPS,
                "requeued": after.get("requeued", 0) - before.get("requeued", 0),
            }
        )
    now = running(await state(session, gw), "tiny")
    out["template"] = {"fixed": fixed, "per_message": per_message}
    if now is None or now["variant"]["context"] != variant:
        out["warning"] = f"engine changed to {now['variant'] if now else 'none'}"
    return out


# 4. Concurrency: c streaming clients at once, direct and through the gateway.


async def one_level(
    session: aiohttp.ClientSession, url: str, c: int, pid: int | None, gw: str | None
) -> dict[str, Any]:
    body = chat("tiny", "Tell me a story.", CONC_TOKENS, True)
    per_client = max(1, -(-CONC_MIN_REQUESTS // c))
    before = await counters(session, gw) if gw else {}
    load = await concurrently(session, url, body, c, per_client, pid)
    requeued = (await counters(session, gw)).get("requeued", 0) - before.get("requeued", 0) if gw else None
    chunks, cpu = load.chunks, load.cpu_s
    ttfts = sorted(r["ttft_ms"] for r in load.ok)
    return {
        "clients": c,
        **load.counts(),
        "tok_s": chunks / load.wall_s,
        "ttft_p50_ms": statistics.median(ttfts) if ttfts else None,
        "ttft_p99_ms": percentile(ttfts, 0.99) if ttfts else None,
        "gateway_cpu_s": cpu,
        "gateway_requeued": requeued,
        "gateway_cpu_us_per_chunk": cpu / chunks * 1e6 if cpu is not None and chunks else None,
        "gateway_peak_rss_mb": load.peak_rss_mb,
    }


async def concurrency(session: aiohttp.ClientSession, gw: str, pid: int) -> dict[str, Any]:
    tiny = running(await state(session, gw), "tiny")
    if tiny is None or tiny["variant"]["context"] != BIG_CONTEXT:
        async with session.post(gw + "/gateway/load", json={"model": "tiny", "context": BIG_CONTEXT}) as resp:
            await resp.read()
        tiny = engine_of(await state(session, gw), "tiny")
    engine = engine_url(tiny)
    prompt_tokens = await count_on_engine(
        session, engine, chat("tiny", "Tell me a story.", CONC_TOKENS, True)
    )
    levels = []
    for c in CONCURRENCY:
        direct = await one_level(session, engine, c, None, None)
        via = await one_level(session, gw, c, pid, gw)
        levels.append({"clients": c, "direct": direct, "gateway": via})
        print(
            f"  {c} clients: direct {direct['tok_s']:.0f} tok/s, gateway {via['tok_s']:.0f} tok/s", flush=True
        )
    return {
        "context": engine_of(await state(session, gw), "tiny")["variant"]["context"],
        "prompt_tokens": prompt_tokens,
        "gen_tokens": CONC_TOKENS,
        "levels": levels,
        "gateway_vmhwm_mb": status_kb(pid, "VmHWM") / 1024,
    }


# 5. Swaps: alternating two models, through the gateway and through the router.


def last_healthy_ms(st: dict[str, Any], model: str) -> float | None:
    """Spawn to healthy of `model`'s latest start (its "healthy" transition's reason)."""
    for record in reversed(st["history"]):
        if record["trigger"] == "healthy" and record["model"] == model:
            m = re.search(r"in (\d+) ms", record["reason"] or "")
            return float(m.group(1)) if m else None
    return None


async def swaps(
    session: aiohttp.ClientSession, gw: str, router: str | None, router_log: Path | None
) -> dict[str, Any]:
    totals, startups, overheads = [], [], []
    r_totals: list[float] = []
    r_startups: list[float] = []
    model = "tiny-b" if running(await state(session, gw), "tiny") else "tiny"
    r_model = "tiny-b"  # the router serves tiny since section 1
    for _ in range(SWAPS):
        t = await plain(session, gw, chat(model, "hi", 1, False))
        startup = last_healthy_ms(await state(session, gw), model)
        totals.append(t)
        if startup is not None:
            startups.append(startup)
            overheads.append(t - startup)
        model = "tiny" if model == "tiny-b" else "tiny-b"
        if router and router_log:
            seen = len(child_listening_ms(router_log))
            r_totals.append(await plain(session, router, chat(r_model, "hi", 1, False)))
            await asyncio.sleep(0.05)  # the relayed log line
            new = child_listening_ms(router_log)[seen:]
            if new:
                r_startups.append(new[-1])
            r_model = "tiny" if r_model == "tiny-b" else "tiny-b"
    out: dict[str, Any] = {
        "swap_total_ms": stats(totals),
        "engine_startup_ms": stats(startups),
        "gateway_overhead_ms": stats(overheads),
    }
    if r_totals:
        out["router"] = {"swap_total_ms": stats(r_totals)}
        if r_startups:
            out["router"]["child_listening_ms"] = stats(r_startups)
    return out


# 6. Estimate hit rate.


async def estimates(session: aiohttp.ClientSession, gw: str) -> dict[str, Any]:
    # A few exact counts while tiny runs (it counts every estimated request exactly).
    await plain(session, gw, chat("tiny", "x" * 100, 1, False))
    for n in (500, 1200, 1800):
        await plain(session, gw, chat("tiny", ("lorem ipsum " * 200)[:n], 1, False))
    rows = []
    for n in COLD_SIZES:
        await plain(session, gw, chat("tiny-b", "hi", 1, False))  # the other model runs
        since = time.time()
        await plain(session, gw, chat("tiny", ("dolor sit amet " * 3000)[:n], 1, False))
        selections = (await state(session, gw))["selections"]
        entries = [s for s in selections if s["model"] == "tiny" and s["at"] >= since]
        first = next((s for s in entries if s["outcome"] == "started"), None)
        upgraded = any(s["outcome"] == "upgraded" for s in entries)
        rows.append(
            {
                "prompt_bytes": n,
                "first_context": first["context"] if first else None,
                "first_prompt_tokens": first["prompt_tokens"] if first else None,
                "method": first["method"] if first else None,
                "final_context": entries[-1]["context"] if entries else None,
                "hit": not upgraded,
            }
        )
    hits = sum(r["hit"] for r in rows)
    return {"requests": rows, "hits": hits, "total": len(rows), "hit_rate": hits / len(rows)}


# 7. Several engines: three models in a random mix, on a gateway with max_engines 1 and one
# with max_engines 3, and on llama-server's router with --models-max 3.

ENGINE_MODELS = ("tiny", "tiny-b", "tiny-c")
ENGINES_SEED = 11  # the mix: the same sequence of (model, prompt) on every side
ENGINES_MIX = 90  # requests in the mix
ENGINES_SINGLE = 30  # then the mix's first prompts, all to tiny: the single-model TTFT
ENGINES_TOKENS = 16  # streamed tokens per request
ENGINES_CONTEXT = 2048  # every model's one variant (the router's ctx-size)


@dataclass
class Side:
    name: str
    url: str
    router_log: Path | None = None  # a router's; None: a gateway
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # phase -> requests
    errors: list[str] = field(default_factory=list)
    marks: dict[str, Any] = field(default_factory=dict)  # the gateway's counters and state, last seen


def engines_mix(seed: int = ENGINES_SEED) -> list[tuple[str, str]]:
    """(model, prompt) pairs: models drawn evenly at random, prompts of 20-400 random bytes."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz     "
    return [
        (rng.choice(ENGINE_MODELS), "".join(rng.choice(letters) for _ in range(rng.randint(20, 400))))
        for _ in range(ENGINES_MIX)
    ]


def engines_config(port: int, models: dict[str, Path], max_engines: int) -> str:
    return lua_config(
        port,
        [
            {
                "name": name,
                "args": ["-m", str(models[name]), "-t", str(THREADS)],
                "default_max_tokens": 64,
                "request": {"defaults": {"temperature": 0}},
                "variants": [{"context": ENGINES_CONTEXT}],
            }
            for name in ENGINE_MODELS
        ],
        max_engines=max_engines,
        engine_startup_timeout=60,
    )


async def gateway_marks(session: aiohttp.ClientSession, side: Side) -> dict[str, Any]:
    st = await state(session, side.url)
    counted = st.get("counters") or {}
    return {"starts": counted.get("starts", 0), "evictions": counted.get("evictions", 0), "state": st}


async def engines_request(
    session: aiohttp.ClientSession, side: Side, phase: str, model: str, prompt: str
) -> None:
    """One streamed request; on a gateway also whether it started an engine (the gateway's
    counters before and after), whether that start evicted one, and its spawn-to-healthy."""
    try:
        r = await streamed(session, side.url, chat(model, prompt, ENGINES_TOKENS, True))
    except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
        side.errors.append(f"{phase} {model}: {type(exc).__name__}: {str(exc)[:200]}")
        return
    row: dict[str, Any] = {"model": model, "ttft_ms": r["ttft_ms"], "total_ms": r["total_ms"]}
    if side.router_log is None:
        before, side.marks = side.marks, await gateway_marks(session, side)
        row["starts"] = side.marks["starts"] - before["starts"]
        row["evictions"] = side.marks["evictions"] - before["evictions"]
        if row["starts"]:
            row["startup_ms"] = last_healthy_ms(side.marks["state"], model)
    side.rows.setdefault(phase, []).append(row)


async def router_starts(side: Side) -> int:
    """Children the router has started so far (their "listening" lines in its log)."""
    assert side.router_log is not None
    await asyncio.sleep(0.2)  # the router relays its children's lines a little later
    return len(child_listening_ms(side.router_log))


async def engines_phase(
    session: aiohttp.ClientSession, sides: list[Side], phase: str, requests: list[tuple[str, str]]
) -> dict[str, int]:
    """The requests in turn on every side (the order of the sides rotating); the starts
    each side made meanwhile."""
    before = {s.name: (await router_starts(s) if s.router_log else s.marks["starts"]) for s in sides}
    for i, (model, prompt) in enumerate(requests):
        for side in sides[i % len(sides) :] + sides[: i % len(sides)]:
            await engines_request(session, side, phase, model, prompt)
    return {
        s.name: (await router_starts(s) if s.router_log else s.marks["starts"]) - before[s.name]
        for s in sides
    }


def maybe_stats(values: list[float]) -> dict[str, float] | None:
    return stats(values) if values else None


def side_results(side: Side, starts: dict[str, dict[str, int]]) -> dict[str, Any]:
    mix, single, warm = (side.rows.get(phase, []) for phase in ("mix", "single", "warm-up"))
    out: dict[str, Any] = {
        "router": side.router_log is not None,
        "requests": len(mix),
        "starts": starts["mix"][side.name],
        "starts_per_100": starts["mix"][side.name] / ENGINES_MIX * 100,
        "ttft_ms": maybe_stats([r["ttft_ms"] for r in mix]),
        "total_ms": maybe_stats([r["total_ms"] for r in mix]),
        "single_ttft_ms": maybe_stats([r["ttft_ms"] for r in single]),
        "warmup_ttft_ms": [r["ttft_ms"] for r in warm],
        "warmup_starts": starts["warm-up"][side.name],
        "errors": side.errors,
    }
    if side.router_log is None:
        rows = warm + mix
        started = [r for r in mix if r["starts"]]
        out["evictions"] = sum(r["evictions"] for r in mix)
        out["start_ttft_ms"] = maybe_stats([r["ttft_ms"] for r in started])
        out["resident_ttft_ms"] = maybe_stats([r["ttft_ms"] for r in mix if not r["starts"]])
        # The gateway's share of a start: the request's time to its first token minus the
        # engine's own spawn-to-healthy (warm-up starts included), with and without eviction.
        for key, evicting in (("start_share_ms", True), ("start_share_room_ms", False)):
            out[key] = maybe_stats(
                [
                    r["ttft_ms"] - r["startup_ms"]
                    for r in rows
                    if r["starts"] == 1
                    and r.get("startup_ms") is not None
                    and bool(r["evictions"]) == evicting
                ]
            )
        out["startup_ms"] = maybe_stats([r["startup_ms"] for r in rows if r.get("startup_ms") is not None])
    elif not starts["mix"][side.name]:
        out["resident_ttft_ms"] = out["ttft_ms"]
    return out


async def several_engines(
    session: aiohttp.ClientSession, folder: Path, models: dict[str, Path]
) -> dict[str, Any]:
    """Starts its two gateways and its router, measures, stops them."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    sides: list[Side] = []
    out: dict[str, Any] = {}
    try:
        for max_engines in (1, 3):
            port = free_port()
            config = folder / f"engines-{max_engines}.cfg.lua"
            config.write_text(engines_config(port, models, max_engines))
            name = f"gateway, max_engines {max_engines}"
            procs[name] = spawn_gateway(config, folder / f"gateway-engines-{max_engines}.log", "warning")
            sides.append(Side(name, f"http://127.0.0.1:{port}"))
        rport = free_port()
        router, router_log = spawn_router(
            folder,
            {m: models[m] for m in ENGINE_MODELS},
            rport,
            ENGINES_CONTEXT,
            THREADS,
            3,
            "router-engines",
        )
        procs["router, --models-max 3"] = router
        sides.append(Side("router, --models-max 3", f"http://127.0.0.1:{rport}", router_log))
        for side in sides:
            path = "/v1/models" if side.router_log else "/health"
            await asyncio.to_thread(wait_healthy, side.url, procs[side.name], 30, path)
            if side.router_log is None:
                side.marks = await gateway_marks(session, side)
        mix = engines_mix()
        starts = {
            "warm-up": await engines_phase(session, sides, "warm-up", [(m, "hello") for m in ENGINE_MODELS]),
            "mix": await engines_phase(session, sides, "mix", mix),
        }
        await engines_phase(session, sides, "tiny first", [("tiny", "hello")])
        starts["single"] = await engines_phase(
            session, sides, "single", [("tiny", prompt) for _, prompt in mix[:ENGINES_SINGLE]]
        )
        out = {
            "models": list(ENGINE_MODELS),
            "mix": dict(Counter(model for model, _ in mix)),
            "requests": ENGINES_MIX,
            "single_requests": ENGINES_SINGLE,
            "max_tokens": ENGINES_TOKENS,
            "context": ENGINES_CONTEXT,
            "seed": ENGINES_SEED,
            "sides": {side.name: side_results(side, starts) for side in sides},
            "single_starts": starts["single"],
        }
    finally:
        out["exit_codes"] = {
            name: await asyncio.to_thread(stop_process, proc, 10) for name, proc in procs.items()
        }
    return out


def engine_pids(folder: Path) -> list[int]:
    """This run's llama-server processes (their model or preset is in our temp folder)."""
    out = subprocess.run(["pgrep", "-x", "llama-server"], capture_output=True, text=True)
    pids = []
    for pid in out.stdout.split():
        try:
            if str(folder) in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                pids.append(int(pid))
        except OSError:
            pass
    return pids


def bench_session() -> aiohttp.ClientSession:
    # A fresh connection per request on every side: a pooled keep-alive connection that the
    # other side has closed fails the next request. No connection limit (256 streams).
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    return aiohttp.ClientSession(timeout=TIMEOUT, connector=connector)


def bench_models(folder: Path) -> dict[str, Path]:
    return {
        "tiny": write_tiny_model(folder / "tiny.gguf", seed=1, context_length=65536),
        "tiny-b": write_tiny_model(folder / "tiny-b.gguf", seed=2),
        "tiny-c": write_tiny_model(folder / "tiny-c.gguf", seed=3),
    }


async def run_all(
    gw: str,
    pid: int,
    gw_asyncio: str,
    pid_asyncio: int,
    router: str | None,
    router_log: Path | None,
    folder: Path,
    models: dict[str, Path],
) -> dict[str, Any]:
    async with bench_session() as session:
        results: dict[str, Any] = {}
        loops = {"uvloop": (gw, pid), "asyncio": (gw_asyncio, pid_asyncio)}
        for name, step in (
            ("proxy_overhead", lambda: proxy_overhead(session, gw, router)),
            ("cpu_per_chunk", lambda: cpu_per_chunk(session, loops)),
            ("counting", lambda: counting(session, gw)),
            ("concurrency", lambda: concurrency(session, gw, pid)),
            ("swaps", lambda: swaps(session, gw, router, router_log)),
            ("estimates", lambda: estimates(session, gw)),
            ("engines", lambda: several_engines(session, folder, models)),
            ("prompt_cache", lambda: prompt_cache(session, folder, models)),
            ("hop", lambda: hop(session, folder, models)),
        ):
            t = time.perf_counter()
            results[name] = await step()
            print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
            if name == "cpu_per_chunk":  # the asyncio gateway is done: stop it, free its engine
                results["asyncio_gateway_exit_code"] = await asyncio.to_thread(stop_process, ASYNCIO_GW[0])
        return results


ASYNCIO_GW: list[subprocess.Popen[bytes]] = []


# Sections that run alone (--only): they start what they measure.
ONLY = {
    "engines": (several_engines, engines_markdown),
    "prompt_cache": (prompt_cache, prompt_cache_markdown),
    "hop": (hop, hop_markdown),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        choices=sorted(ONLY),
        help="run this section alone and print it; bench/results.json and docs/ stay as they are "
        "(the full run writes them)",
    )
    args = parser.parse_args(argv)
    if args.only:
        return run_only(args.only)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp:
        folder = Path(tmp)
        models = bench_models(folder)
        tiny, tiny_b = models["tiny"], models["tiny-b"]
        port, port2, rport = free_port(), free_port(), free_port()
        config = folder / "bench.cfg.lua"
        config.write_text(config_text(port, tiny, tiny_b))
        config2 = folder / "bench-asyncio.cfg.lua"
        config2.write_text(lua_config(port2, [tiny_model(tiny, [2048])], engine_startup_timeout=60))
        log_path, log2 = folder / "gateway.log", folder / "gateway-asyncio.log"
        process = spawn_gateway(config, log_path, "warning", "--loop", "uvloop")
        process2 = spawn_gateway(config2, log2, "warning", "--loop", "asyncio")
        ASYNCIO_GW.append(process2)
        gw, gw2 = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port2}"
        router_proc = None
        router_url: str | None = f"http://127.0.0.1:{rport}"
        router_error = None
        try:
            router_proc, router_log = spawn_router(
                folder, {"tiny": tiny, "tiny-b": tiny_b}, rport, 2048, THREADS
            )
            wait_healthy(router_url, router_proc, path="/v1/models")
        except Exception as exc:  # the peer is optional: say why it is missing
            router_error, router_url = f"{type(exc).__name__}: {exc}", None
            router_log = folder / "router.log"
            if router_log.exists():
                router_error += "\n" + router_log.read_text(errors="replace")[-1500:]
        try:
            wait_healthy(gw, process)
            wait_healthy(gw2, process2)
            started = time.perf_counter()
            results = asyncio.run(
                asyncio.wait_for(
                    run_all(
                        gw,
                        process.pid,
                        gw2,
                        process2.pid,
                        router_url,
                        router_log if router_url else None,
                        folder,
                        models,
                    ),
                    timeout=540,
                )
            )
            results["runtime_s"] = time.perf_counter() - started
        except BaseException:
            print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            code = stop_process(process)
            code2 = stop_process(process2)
            router_code = stop_process(router_proc, 10) if router_proc else None
            deadline = time.monotonic() + 10
            while engine_pids(folder) and time.monotonic() < deadline:
                time.sleep(0.05)
            leftover = engine_pids(folder)
            keep_logs(folder)
    results["machine"] = {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "engine_threads": THREADS,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    results["router_error"] = router_error
    results["shutdown"] = {
        "gateway_exit_code": code,
        "asyncio_gateway_exit_code": code2,
        "router_exit_code": router_code,
        "leftover_llama_server": leftover,
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    results["plots"] = plots(results, REPORT.parent)
    REPORT.write_text(markdown(results))
    print(markdown(results))
    print(f"load average: start {load_start}, end {results['machine']['loadavg_end']}")
    engine_codes = results.get("engines", {}).get("exit_codes", {}).values()
    ok = code == 0 and code2 == 0 and all(c == 0 for c in engine_codes)
    return 0 if ok and not leftover else 1


def keep_logs(folder: Path) -> None:
    """The gateways' and routers' logs, kept for a look afterwards."""
    for log in folder.glob("*.log"):
        shutil.copy(log, Path(tempfile.gettempdir()) / f"llm-gateway-bench-{log.name}")


def run_only(section: str) -> int:
    """One section alone (one of ONLY): printed, and written to a file in the temp folder."""
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp:
        folder = Path(tmp)
        models = bench_models(folder)

        measure, report = ONLY[section]

        async def run() -> dict[str, Any]:
            async with bench_session() as session:
                return await measure(session, folder, models)

        started = time.perf_counter()
        try:
            result = asyncio.run(asyncio.wait_for(run(), timeout=300))
        finally:
            deadline = time.monotonic() + 10
            while engine_pids(folder) and time.monotonic() < deadline:
                time.sleep(0.05)
            leftover = engine_pids(folder)
            keep_logs(folder)
    result["runtime_s"] = time.perf_counter() - started
    result["leftover_llama_server"] = leftover
    result["loadavg"] = {"start": load_start, "end": os.getloadavg()}
    out = Path(tempfile.gettempdir()) / f"llm-gateway-bench-{section}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(report(result, f"`-t {THREADS}`")))
    print(f"\n{section}: {result['runtime_s']:.1f} s; raw numbers in {out}; load average {result['loadavg']}")
    codes = result.get("exit_codes", {}).values()
    return 0 if all(code == 0 for code in codes) and not leftover else 1


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
