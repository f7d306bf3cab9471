"""Gateway benchmarks on loopback: proxy overhead, CPU per chunk, counting, swaps, estimates.

Run as `.venv/bin/python bench/run.py`. Writes bench/results.json and docs/benchmarks.md.
Generates the tiny demo model, starts the gateway as a subprocess, always stops it.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from gateway.demo.harness import free_port, lua_config, spawn_gateway, stop_gateway, wait_healthy
from gateway.demo.tinymodel import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
REPORT = ROOT / "docs" / "benchmarks.md"
THREADS = 1  # engine threads (-t)
GEN_TOKENS = 256
N = 15  # repetitions per side-by-side measurement
CPU_REQUESTS = 40
SWAPS = 6
COUNT_SIZES = [1000, 8000, 32000]
COUNT_REPS = 8
COLD_SIZES = [300, 1500, 1900, 2500, 6000, 7800, 12000, 30000]
TIMEOUT = aiohttp.ClientTimeout(total=120)


def config_text(port: int, tiny: Path, tiny_b: Path) -> str:
    models = [
        {
            "name": "tiny",
            "args": ["-m", str(tiny), "-t", str(THREADS)],
            "default_max_tokens": 64,
            "request": {"defaults": {"temperature": 0}},
            "variants": [{"context": 2048}, {"context": 8192}, {"context": 34000}],
        },
        {
            "name": "tiny-b",
            "args": ["-m", str(tiny_b), "-t", str(THREADS)],
            "default_max_tokens": 64,
            "request": {"defaults": {"temperature": 0}},
            "variants": [{"context": 2048}],
        },
    ]
    return lua_config(port, models, engine_startup_timeout=60)


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"median": statistics.median(ordered), "p90": p90, "n": len(ordered)}


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


async def state(session: aiohttp.ClientSession, gw: str) -> dict[str, Any]:
    async with session.get(gw + "/gateway/state") as resp:
        return await resp.json()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def proxy_overhead(session: aiohttp.ClientSession, gw: str) -> dict[str, Any]:
    await plain(session, gw, chat("tiny", "hello", 8, False))  # engine up (2048 variant)
    engine = f"http://127.0.0.1:{(await state(session, gw))['port']}"
    body_s = chat("tiny", "Tell me a story.", GEN_TOKENS, True)
    body_p = chat("tiny", "Tell me a story.", GEN_TOKENS, False)
    for url in (engine, gw):  # warm-up
        await streamed(session, url, body_s)
    rows: dict[str, dict[str, list[float]]] = {
        side: {"ttft_ms": [], "total_ms": [], "tok_s": [], "plain_ms": []} for side in ("direct", "gateway")
    }
    for _ in range(N):
        for side, url in (("direct", engine), ("gateway", gw)):
            r = await streamed(session, url, body_s)
            rows[side]["ttft_ms"].append(r["ttft_ms"])
            rows[side]["total_ms"].append(r["total_ms"])
            rows[side]["tok_s"].append(r["chunks"] / (r["total_ms"] / 1000))
            rows[side]["plain_ms"].append(await plain(session, url, body_p))
    return {side: {k: stats(v) for k, v in m.items()} for side, m in rows.items()}


async def cpu_per_chunk(session: aiohttp.ClientSession, gw: str, pid: int) -> dict[str, Any]:
    body = chat("tiny", "Tell me a story.", GEN_TOKENS, True)
    before = cpu_seconds(pid)
    wall = time.perf_counter()
    chunks = 0
    for _ in range(CPU_REQUESTS):
        chunks += int((await streamed(session, gw, body))["chunks"])
    wall = time.perf_counter() - wall
    cpu = cpu_seconds(pid) - before
    return {
        "requests": CPU_REQUESTS,
        "chunks": chunks,
        "gateway_cpu_s": cpu,
        "wall_s": wall,
        "cpu_us_per_chunk": cpu / chunks * 1e6 if chunks else None,
        "clock_ticks_per_s": os.sysconf("SC_CLK_TCK"),
    }


async def counting(session: aiohttp.ClientSession, gw: str) -> dict[str, Any]:
    # The largest prompt first: the 34000 variant starts and then serves every size.
    prompts = {n: ("abcdefgh " * (n // 9 + 1))[:n] for n in COUNT_SIZES}
    await plain(session, gw, chat("tiny", prompts[max(COUNT_SIZES)], 1, False))
    st = await state(session, gw)
    engine = f"http://127.0.0.1:{st['port']}"
    out: dict[str, Any] = {"variant": st["variant"]["context"]}
    for n in COUNT_SIZES:
        body = chat("tiny", prompts[n], 1, False)
        await plain(session, engine, body)  # warm the prompt cache
        direct, via = [], []
        for _ in range(COUNT_REPS):
            direct.append(await plain(session, engine, body))
            via.append(await plain(session, gw, body))
        out[str(n)] = {
            "direct_ms": stats(direct),
            "gateway_ms": stats(via),
            "difference_ms": statistics.median(via) - statistics.median(direct),
        }
    st = await state(session, gw)
    if st["variant"]["context"] != 34000:
        out["warning"] = f"engine changed to {st['variant']}"
    return out


def last_healthy_ms(st: dict[str, Any]) -> float | None:
    for record in reversed(st["history"]):
        if record["trigger"] == "healthy":
            m = re.search(r"in (\d+) ms", record["reason"] or "")
            return float(m.group(1)) if m else None
    return None


async def swaps(session: aiohttp.ClientSession, gw: str) -> dict[str, Any]:
    totals, startups, overheads = [], [], []
    model = "tiny-b" if (await state(session, gw))["model"] == "tiny" else "tiny"
    for _ in range(SWAPS):
        t = await plain(session, gw, chat(model, "hi", 1, False))
        startup = last_healthy_ms(await state(session, gw))
        totals.append(t)
        if startup is not None:
            startups.append(startup)
            overheads.append(t - startup)
        model = "tiny" if model == "tiny-b" else "tiny-b"
    return {
        "swap_total_ms": stats(totals),
        "engine_startup_ms": stats(startups),
        "gateway_overhead_ms": stats(overheads),
    }


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


def engine_pids(folder: Path) -> list[int]:
    """This run's llama-server processes (their model is in our temp folder)."""
    out = subprocess.run(["pgrep", "-x", "llama-server"], capture_output=True, text=True)
    pids = []
    for pid in out.stdout.split():
        try:
            if str(folder) in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                pids.append(int(pid))
        except OSError:
            pass
    return pids


async def run_all(gw: str, pid: int) -> dict[str, Any]:
    # A fresh connection per request on both sides: a pooled keep-alive connection that the
    # other side has closed fails the next request.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as session:
        results: dict[str, Any] = {}
        for name, step in (
            ("proxy_overhead", lambda: proxy_overhead(session, gw)),
            ("cpu_per_chunk", lambda: cpu_per_chunk(session, gw, pid)),
            ("counting", lambda: counting(session, gw)),
            ("swaps", lambda: swaps(session, gw)),
            ("estimates", lambda: estimates(session, gw)),
        ):
            t = time.perf_counter()
            results[name] = await step()
            print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
        return results


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp:
        folder = Path(tmp)
        tiny = write_tiny_model(folder / "tiny.gguf", seed=1, context_length=65536)
        tiny_b = write_tiny_model(folder / "tiny-b.gguf", seed=2)
        port = free_port()
        config = folder / "bench.cfg.lua"
        config.write_text(config_text(port, tiny, tiny_b))
        log_path = folder / "gateway.log"
        process = spawn_gateway(config, log_path, "warning")
        gw = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(gw, process)
            started = time.perf_counter()
            results = asyncio.run(asyncio.wait_for(run_all(gw, process.pid), timeout=170))
            results["runtime_s"] = time.perf_counter() - started
        except BaseException:
            print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            code = stop_gateway(process)
            deadline = time.monotonic() + 10
            while engine_pids(folder) and time.monotonic() < deadline:
                time.sleep(0.05)
            leftover = engine_pids(folder)
    results["machine"] = {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "engine_threads": THREADS,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
    }
    results["shutdown"] = {"gateway_exit_code": code, "leftover_llama_server": leftover}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(markdown(results))
    print(markdown(results))
    return 0 if code == 0 and not leftover else 1


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def f(s: dict[str, float], digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} ({s['p90']:.{digits}f})"


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    po = r["proxy_overhead"]
    d, g = po["direct"], po["gateway"]
    lines = [
        "# Benchmarks",
        "",
        "Produced by `bench/run.py` (`make bench`, or `.venv/bin/python bench/run.py`); raw numbers in",
        "`bench/results.json`. Loopback only, the generated tiny model (one token per byte).",
        "",
        f"Machine: `nproc` = {m['nproc']} ({m['cpu']}), {m['platform']}, Python {m['python']}.",
        f"**Engine threads: `-t {m['engine_threads']}`** for every llama-server in these numbers.",
        f"Cells are median (p90). Total run time {r['runtime_s']:.0f} s.",
        "",
        f"## 1. Proxy overhead ({GEN_TOKENS} generated tokens, temperature 0, engine ready, "
        f"`-t {m['engine_threads']}`, n={d['ttft_ms']['n']})",
        "",
        "| | direct to llama-server | through the gateway | difference (medians) |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("ttft_ms", "streamed: first token, ms"),
        ("total_ms", "streamed: total, ms"),
        ("tok_s", "streamed: tokens/s"),
        ("plain_ms", "non-streamed: latency, ms"),
    ):
        diff = g[key]["median"] - d[key]["median"]
        pct = diff / d[key]["median"] * 100
        lines.append(f"| {label} | {f(d[key])} | {f(g[key])} | {diff:+.1f} ({pct:+.1f}%) |")
    c = r["cpu_per_chunk"]
    lines += [
        "",
        f"## 2. Gateway CPU per streamed chunk (`-t {m['engine_threads']}`)",
        "",
        "| requests | chunks | gateway CPU (utime+stime) | wall | CPU per chunk |",
        "|---|---|---|---|---|",
        f"| {c['requests']} x {GEN_TOKENS} tokens | {c['chunks']} | {c['gateway_cpu_s']:.2f} s "
        f"| {c['wall_s']:.2f} s | {c['cpu_us_per_chunk']:.0f} us |",
        "",
        f"/proc stat resolution is 1/{c['clock_ticks_per_s']} s; the figure includes the gateway's whole",
        "process (request parsing, selection, proxying).",
        "",
        f"## 3. Exact counting on a ready engine (context {r['counting']['variant']}, max_tokens 1, "
        f"`-t {m['engine_threads']}`)",
        "",
        "| prompt tokens | direct, ms | through the gateway, ms | difference (mostly counting), ms |",
        "|---|---|---|---|",
    ]
    for n in COUNT_SIZES:
        row = r["counting"][str(n)]
        diff = row["difference_ms"]
        lines.append(f"| ~{n} | {f(row['direct_ms'])} | {f(row['gateway_ms'])} | {diff:+.1f} |")
    if "warning" in r["counting"]:
        lines.append(f"\nWarning: {r['counting']['warning']}")
    s = r["swaps"]
    lines += [
        "",
        "The engine reuses its prompt cache for a repeated prompt, so the direct side is close to",
        "the cost of one token; the gateway side adds POST /apply-template and /tokenize.",
        "",
        f"## 4. Swap cost (alternating two models, max_tokens 1, `-t {m['engine_threads']}`)",
        "",
        "| swap total (send to response), ms | engine spawn to healthy, ms | gateway overhead, ms |",
        "|---|---|---|",
        f"| {f(s['swap_total_ms'])} | {f(s['engine_startup_ms'])} | {f(s['gateway_overhead_ms'])} |",
        "",
        'Engine startup is the gateway\'s own "healthy" transition reason ("in N ms"); the',
        "overhead is each swap's total minus its startup (stopping the old engine, the request",
        "itself, counting).",
        "",
        "## 5. Estimate hit rate (cold requests, the other model running)",
        "",
        "| prompt bytes | method | estimated prompt tokens | first variant | final variant | hit |",
        "|---|---|---|---|---|---|",
    ]
    e = r["estimates"]
    for row in e["requests"]:
        lines.append(
            f"| {row['prompt_bytes']} | {row['method']} | {row['first_prompt_tokens']} "
            f"| {row['first_context']} | {row['final_context']} | {'yes' if row['hit'] else 'no'} |"
        )
    lines += [
        "",
        f"Hit rate: {e['hits']}/{e['total']} ({e['hit_rate'] * 100:.0f}%): the first started variant was the",
        'final one (no "upgraded" selection for the request).',
        "",
        f"Shutdown: gateway exit code {r['shutdown']['gateway_exit_code']}, llama-server left over: "
        f"{r['shutdown']['leftover_llama_server'] or 'none'}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
