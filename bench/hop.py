"""9. The hop at the limit: the gateway's relay side by side with a plain aiohttp
pass-through, the floor of a Python relay (both in bench/relays.py) and llama-server's
router, on the same tiny model; then 1,000 concurrent streams through one gateway.

The gateway, the pass-through and the floor relay all forward to the gateway's one
engine; the router forwards to its own child (the same binary, model and context).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from measure import concurrently, cpu_seconds, fast_stream, status_kb
from router import spawn_router

from gateway.demo.harness import free_port, lua_config, spawn_gateway, stop_process, wait_healthy

CONTEXT = 65536  # room for 1,000 short streams at once in the one engine
SEQ_TOKENS = 256
SEQ_REQUESTS = 8  # per side and repetition
SEQ_REPS = 5
SAT_CLIENTS = 64  # concurrent streams that keep every relay busy
SAT_REQUESTS = 2  # per client
SAT_TOKENS = 128
MANY = 1000
MANY_TOKENS = 16
RELAYS = Path(__file__).resolve().parent / "relays.py"


def body(tokens: int) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }


async def stream(session: aiohttp.ClientSession, url: str, tokens: int) -> dict[str, Any]:
    return await fast_stream(session, url, body(tokens))


def median_p90(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p90": ordered[round(0.9 * (len(ordered) - 1))]}


async def sequential(
    session: aiohttp.ClientSession, sides: dict[str, tuple[str, int | None]]
) -> dict[str, Any]:
    """Streams one after another, the sides alternating request by request."""
    ttft: dict[str, list[float]] = {side: [] for side in sides}
    tok_s: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(SEQ_REPS):
        used = {side: 0.0 for side in sides}
        chunks = {side: 0 for side in sides}
        for _ in range(SEQ_REQUESTS):
            for side, (url, pid) in sides.items():
                before = cpu_seconds(pid) if pid else 0.0
                result = await stream(session, url, SEQ_TOKENS)
                if "error" in result:
                    raise RuntimeError(f"{side}: {result['error']}")
                used[side] += cpu_seconds(pid) - before if pid else 0.0
                chunks[side] += result["chunks"]
                ttft[side].append(result["ttft_ms"])
                tok_s[side].append(result["chunks"] / result["total_ms"] * 1000)
        for side, (_, pid) in sides.items():
            if pid:
                cpu[side].append(used[side] / chunks[side] * 1e6)
    return {
        side: {
            "ttft_ms": median_p90(ttft[side]),
            "tok_s": median_p90(tok_s[side]),
            "cpu_us_per_chunk": median_p90(cpu[side]) if cpu[side] else None,
        }
        for side in sides
    }


async def load(
    session: aiohttp.ClientSession, url: str, pid: int | None, clients: int, requests: int, tokens: int
) -> dict[str, Any]:
    """`clients` streams at once, `requests` each one after another: what got through,
    and what the relay process spent."""
    run = await concurrently(session, url, body(tokens), clients, requests, pid)
    chunks, cpu, wall = run.chunks, run.cpu_s, run.wall_s
    return {
        "clients": clients,
        **run.counts(),
        "chunks_per_s": chunks / wall,
        "ttft_p50_ms": statistics.median(r["ttft_ms"] for r in run.ok) if run.ok else None,
        "relay_cpu_s": cpu,
        "relay_cpu_share": cpu / wall if cpu is not None else None,
        "relay_us_per_chunk": cpu / chunks * 1e6 if cpu is not None and chunks else None,
        "rss_before_mb": run.rss_before_mb,
        "peak_rss_mb": run.peak_rss_mb,
    }


async def engine_of(session: aiohttp.ClientSession, gw: str) -> str:
    async with session.get(gw + "/gateway/state") as resp:
        state = await resp.json()
    engine = next(e for e in state["engines"] if e["model"] == "tiny" and e["state"] == "ready")
    return f"http://127.0.0.1:{engine['port']}"


async def hop(session: aiohttp.ClientSession, folder: Path, models: dict[str, Path]) -> dict[str, Any]:
    tiny = models["tiny"]
    port, rport = free_port(), free_port()
    config = folder / "hop.cfg.lua"
    model = {
        "name": "tiny",
        "args": ["-m", str(tiny), "-t", "1"],
        "default_max_tokens": 64,
        "variants": [{"context": CONTEXT}],
    }
    # The engine decodes 4 streams at a time: the gateway holds the others in its queue.
    config.write_text(lua_config(port, [model], engine_startup_timeout=60, queue_limit=2 * MANY))
    gateway = spawn_gateway(config, folder / "hop-gateway.log", "warning", "--loop", "uvloop")
    router, _ = spawn_router(folder, {"tiny": tiny}, rport, CONTEXT, 1, name="hop-router")
    relays: list[subprocess.Popen[bytes]] = []
    gw, rt = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{rport}"
    try:
        wait_healthy(gw, gateway)
        wait_healthy(rt, router, path="/v1/models")
        await stream(session, gw, 1)  # the engine starts
        engine = await engine_of(session, gw)
        sides: dict[str, tuple[str, int | None]] = {"direct": (engine, None), "gateway": (gw, gateway.pid)}
        for kind in ("aiohttp", "raw"):
            relay_port = free_port()
            relay = subprocess.Popen([sys.executable, str(RELAYS), kind, str(relay_port), engine])
            relays.append(relay)
            wait_healthy(f"http://127.0.0.1:{relay_port}", relay, path="/health")  # (the engine's)
            sides[f"{kind} pass-through" if kind == "aiohttp" else "raw relay"] = (
                f"http://127.0.0.1:{relay_port}",
                relay.pid,
            )
        sides["router"] = (rt, router.pid)
        for url, _ in sides.values():  # warm-up (the router loads its model here)
            await stream(session, url, 8)
        seq = await sequential(session, sides)
        print("  sequential streams done", flush=True)
        saturated = {}
        for side, (url, pid) in sides.items():
            saturated[side] = await load(session, url, pid, SAT_CLIENTS, SAT_REQUESTS, SAT_TOKENS)
        print("  saturation done", flush=True)
        many = await load(session, gw, gateway.pid, MANY, 1, MANY_TOKENS)
        many["vmhwm_mb"] = status_kb(gateway.pid, "VmHWM") / 1024
        print(f"  {MANY} streams: {many['errors']} errors, peak RSS {many['peak_rss_mb']:.1f} MB", flush=True)
        return {"sequential": seq, "saturated": saturated, "many": many, "context": CONTEXT}
    finally:
        for relay in relays:
            stop_process(relay)
        stop_process(router, 10)
        stop_process(gateway)


def _num(value: float | None, form: str = ".1f") -> str:
    return "-" if value is None else format(value, form)


def markdown(r: dict[str, Any], threads: str) -> list[str]:
    seq, sat, many = r["sequential"], r["saturated"], r["many"]
    direct_ttft = seq["direct"]["ttft_ms"]["median"]
    lines = [
        f"## 9. The hop at the limit (one engine, context {r['context']}, {threads})",
        "",
        "The gateway's relay against the yardsticks of bench/relays.py: a plain aiohttp pass-through "
        "(aiohttp's server, a ClientSession, `iter_any`), and the floor of a Python relay (asyncio "
        "Protocols on uvloop, bytes passed on as they come, nothing parsed: no gateway, a measure of "
        "what the machine allows); and llama-server's router. All but the router forward to the "
        "gateway's engine; the router to its own child.",
        "",
        f"### 9a. One stream at a time ({SEQ_TOKENS} tokens, {SEQ_REPS} x {SEQ_REQUESTS} per side, "
        "alternating)",
        "",
        "| side | first token, ms | over direct, ms | tokens/s | relay CPU per chunk, us |",
        "|---|---|---|---|---|",
    ]
    for side, row in seq.items():
        ttft, cpu = row["ttft_ms"], row["cpu_us_per_chunk"]
        over = None if side == "direct" else ttft["median"] - direct_ttft
        cpu_text = "-" if cpu is None else f"{cpu['median']:.1f} ({cpu['p90']:.1f})"
        lines.append(
            f"| {side} | {ttft['median']:.2f} ({ttft['p90']:.2f}) | {_num(over, '+.2f')} | "
            f"{row['tok_s']['median']:.0f} | {cpu_text} |"
        )
    lines += [
        "",
        "Relay CPU is utime+stime of the relay's process from /proc over its requests, divided "
        "by their content chunks: it includes each request's own work (for the gateway: parsing, "
        f"selection, the supervisor's grant, its records), spread over {SEQ_TOKENS} chunks.",
        "",
        f"### 9b. Every relay busy ({SAT_CLIENTS} streams at once, {SAT_REQUESTS} x {SAT_TOKENS} "
        "tokens each)",
        "",
        "| side | chunks/s delivered | relay CPU, s | relay busy | relay CPU per chunk, us | "
        "chunks per relay CPU-second | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, row in sat.items():
        us, share = row["relay_us_per_chunk"], row["relay_cpu_share"]
        lines.append(
            f"| {side} | {row['chunks_per_s']:.0f} | {_num(row['relay_cpu_s'], '.2f')} | "
            f"{_num(None if share is None else share * 100, '.0f')}{'' if share is None else '%'} | "
            f"{_num(us)} | {_num(None if us is None else 1e6 / us, '.0f')} | {row['errors']} |"
        )
    example = f" (e.g. {many['error_samples'][0]})" if many["errors"] else ""
    lines += [
        "",
        "On 2 cores the engine, the client and the relay share the CPU, so chunks/s delivered is "
        "the engine's pace for every side; what one relay process could carry on a core of its "
        "own is its chunks per relay CPU-second.",
        "",
        f"### 9c. {MANY} concurrent streams through one gateway ({MANY_TOKENS} tokens each)",
        "",
        f"{many['requests']} streams, {many['errors']} errors{example}; {many['chunks']} chunks in "
        f"{many['wall_s']:.1f} s; gateway RSS {many['rss_before_mb']:.1f} MB before, peak "
        f"{many['peak_rss_mb']:.1f} MB (sampled every 10 ms), VmHWM {many['vmhwm_mb']:.1f} MB.",
    ]
    return lines
