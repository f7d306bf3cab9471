"""docs/benchmarks.md and its plots from bench/results.json's numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hop import MANY
from hop import markdown as hop_markdown
from prompt_cache import markdown as prompt_cache_markdown

GEN_TOKENS = 256


def f(s: dict[str, float], digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} ({s['p90']:.{digits}f})"


def plots(r: dict[str, Any], docs: Path) -> list[str]:
    """PNG plots (matplotlib, installed for the bench only); the file names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    raw = r["proxy_overhead"]["raw_ttft_ms"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(raw)
    ax.boxplot([raw[n] for n in names], showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_ylabel("time to first token, ms")
    ax.set_title(f"TTFT by path ({GEN_TOKENS} tokens streamed, -t 1, n={len(raw[names[0]])})")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(docs / "bench-ttft-by-path.png", dpi=110)
    plt.close(fig)
    written.append("bench-ttft-by-path.png")
    levels = r["concurrency"]["levels"]
    cs = [lv["clients"] for lv in levels]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for side, color in (("direct", "tab:blue"), ("gateway", "tab:orange")):
        ax.plot(cs, [lv[side]["ttft_p50_ms"] for lv in levels], "o-", color=color, label=f"{side} p50")
        ax.plot(cs, [lv[side]["ttft_p99_ms"] for lv in levels], "s--", color=color, label=f"{side} p99")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("time to first token, ms")
    ax.set_title(f"TTFT by concurrency ({r['concurrency']['gen_tokens']} tokens each, -t 1)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(docs / "bench-ttft-by-concurrency.png", dpi=110)
    plt.close(fig)
    written.append("bench-ttft-by-concurrency.png")
    return written


def _row(target: str, measured: str, met: bool, miss: str) -> tuple[str, str, str]:
    return target, measured, "met" if met else f"missed by {miss}"


def targets(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each target of the benchmark issue."""
    po = r["proxy_overhead"]
    d, g = po["direct"], po["gateway"]
    dt = g["ttft_ms"]["median"] - d["ttft_ms"]["median"]
    ratio = g["tok_s"]["median"] / d["tok_s"]["median"]
    top = r["concurrency"]["levels"][-1]
    cratio = top["gateway"]["tok_s"] / top["direct"]["tok_s"]
    errors = top["gateway"]["errors"]
    ov = r["swaps"]["gateway_overhead_ms"]["median"]
    rss = max(lv["gateway"]["gateway_peak_rss_mb"] for lv in r["concurrency"]["levels"])
    hwm = r["concurrency"]["gateway_vmhwm_mb"]
    out = [
        _row(
            "TTFT through the gateway within +2 ms of direct (median)",
            f"{dt:+.2f} ms ({d['ttft_ms']['median']:.2f} -> {g['ttft_ms']['median']:.2f})",
            dt <= 2,
            f"{dt - 2:.2f} ms",
        ),
        _row(
            "streamed tokens/s at least 97% of direct (one stream)",
            f"{ratio * 100:.1f}%",
            ratio >= 0.97,
            f"{(0.97 - ratio) * 100:.1f} points",
        ),
        _row(
            f"(same, at {top['clients']} streams: all clients' tokens/s)",
            f"{cratio * 100:.1f}%",
            cratio >= 0.97,
            f"{(0.97 - cratio) * 100:.1f} points",
        ),
        _row(
            f"{top['clients']} concurrent streams without errors",
            f"{errors} errors of {top['gateway']['requests']}",
            errors == 0,
            f"{errors} errors",
        ),
        _row(
            "gateway's share of a swap under 50 ms beyond spawn-to-healthy",
            f"{ov:.1f} ms",
            ov < 50,
            f"{ov - 50:.1f} ms",
        ),
        _row(
            "gateway RSS under 100 MB under that load",
            f"{rss:.1f} MB peak VmRSS (VmHWM {hwm:.1f} MB)",
            rss < 100,
            f"{rss - 100:.1f} MB",
        ),
    ]
    if "router" in po:
        rt = po["router"]["ttft_ms"]["median"] - d["ttft_ms"]["median"]
        out.append(
            _row(
                "TTFT at most direct + 0.7 ms, and not above the router's (median)",
                f"{dt:+.2f} ms (router {rt:+.2f} ms)",
                dt <= min(0.7, rt),
                f"{dt - min(0.7, rt):.2f} ms",
            )
        )
    if "hop" in r:
        many = r["hop"]["many"]
        peak = many["peak_rss_mb"]
        out.append(
            _row(
                f"{MANY} concurrent streams through one gateway: no error, at most 60 MB resident",
                f"{many['errors']} errors, peak {peak:.1f} MB",
                many["errors"] == 0 and peak <= 60,
                f"{many['errors']} errors, {peak - 60:+.1f} MB",
            )
        )
    for loop, lp in r["cpu_per_chunk"]["loops"].items():
        us = lp["us_per_chunk"]["median"]
        out.append(
            _row(
                f"at most 30 us gateway CPU per streamed chunk (`--loop {loop}`)",
                f"{us:.1f} us",
                us <= 30,
                f"{us - 30:.1f} us ({us / 30:.1f}x)",
            )
        )
    return out


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    t = f"`-t {m['engine_threads']}`"
    po = r["proxy_overhead"]
    sides = [s for s in ("direct", "gateway", "router") if s in po]
    la0 = ", ".join(f"{x:.2f}" for x in m["loadavg_start"])
    la1 = ", ".join(f"{x:.2f}" for x in m["loadavg_end"])
    lines = [
        "# Benchmarks",
        "",
        "Produced by `bench/run.py` (**`make bench`**, or `.venv/bin/python bench/run.py`); raw numbers",
        "in `bench/results.json`. Loopback only, the generated tiny models (one token per byte), every",
        "comparison measured side by side in one run (requests alternate between the sides).",
        "",
        f"Machine: `nproc` = {m['nproc']} ({m['cpu']}), {m['platform']}, Python {m['python']}.",
        f"**Engine threads: {t}** for every llama-server in these numbers (direct, the gateway's, the",
        "router's children). The gateway runs with `--loop uvloop` unless a row says otherwise.",
        f"Load average (1, 5, 15 min) at the start: {la0}; at the end: {la1} (other work may share",
        "the machine). The benchmark client (aiohttp, one Python process) shares the 2 cores with",
        "the gateway and the engine, so absolute numbers include its contention.",
        f"Cells are median (p90) unless named. Total run time {r['runtime_s']:.0f} s.",
        "",
        "To reproduce: `make bench` (about 1.5 minutes; it sets up what is missing first). The plots",
        "need matplotlib in the venv (`.venv/bin/pip install matplotlib`, for the bench only); without",
        "it they are skipped. The router peer uses the same llama-server binary (llama.cpp b11434).",
        "",
        "## Targets",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
    ]
    for target, measured, verdict in targets(r):
        lines.append(f"| {target} | {measured} | **{verdict}** |")
    lines += [
        "",
        f"## 1. Proxy overhead ({GEN_TOKENS} generated tokens, temperature 0, engine ready, {t}, "
        f"n={po['direct']['ttft_ms']['n']})",
        "",
        "Router = llama-server's own router mode (`--models-preset P --models-max 1`), the nearest",
        "peer: one address for several models, one loaded at a time.",
        "",
        "| | "
        + " | ".join(sides)
        + " | gateway - direct | "
        + ("router - direct |" if "router" in po else ""),
        "|---|" + "---|" * (len(sides) + 1 + ("router" in po)),
    ]
    for key, label in (
        ("ttft_ms", "streamed: first token, ms"),
        ("total_ms", "streamed: total, ms"),
        ("tok_s", "streamed: tokens/s"),
        ("plain_ms", "non-streamed: latency, ms"),
    ):
        d = po["direct"][key]["median"]
        cells = [f(po[s][key]) for s in sides]
        diffs = []
        for s in ("gateway", "router"):
            if s in po:
                diff = po[s][key]["median"] - d
                diffs.append(f"{diff:+.1f} ({diff / d * 100:+.1f}%)")
        lines.append(f"| {label} | " + " | ".join(cells + diffs) + " |")
    us = r["cpu_per_chunk"]["loops"]["uvloop"]["us_per_chunk"]["median"]
    lines += [
        "",
        f"The gateway's streamed total is its per-chunk CPU at work: {us:.0f} us x {GEN_TOKENS} chunks = "
        f"{us * GEN_TOKENS / 1000:.1f} ms of",
        "gateway CPU per stream (section 2), on 2 cores shared with the engine and the client.",
        f"Gateway requeues during these requests: {po.get('gateway_requeued', 0)} (a requeue is a",
        "retry after the engine failed before answering; each waits up to 0.5 s to see the engine exit).",
    ]
    if r.get("router_error"):
        lines += ["", "Router mode could not be measured:", "", "```", r["router_error"], "```"]
    if "bench-ttft-by-path.png" in r.get("plots", []):
        lines += ["", "![TTFT by path](bench-ttft-by-path.png)"]
    c = r["cpu_per_chunk"]
    lines += [
        "",
        f"## 2. Gateway CPU per streamed chunk, both event loops ({t})",
        "",
        f"{c['reps']} repetitions per loop, alternating; each {c['requests_per_rep']} sequential streams of "
        f"{GEN_TOKENS} tokens.",
        "",
        "| event loop | chunks per repetition | gateway CPU per repetition | wall | CPU per chunk, us |",
        "|---|---|---|---|---|",
    ]
    for loop, lp in c["loops"].items():
        lines.append(
            f"| `--loop {loop}` | {lp['chunks_per_rep']:.0f} | {lp['cpu_s']:.2f} s | {lp['wall_s']:.2f} s "
            f"| {lp['us_per_chunk']['median']:.1f} (min {min(x['us_per_chunk'] for x in lp['runs']):.1f}, "
            f"max {max(x['us_per_chunk'] for x in lp['runs']):.1f}) |"
        )
    loops = c["loops"]
    if "uvloop" in loops and "asyncio" in loops:
        ratio = loops["asyncio"]["us_per_chunk"]["median"] / loops["uvloop"]["us_per_chunk"]["median"]
        lines += ["", f"asyncio / uvloop: {ratio:.2f}x."]
    lines += [
        "",
        f"CPU is utime+stime of the whole gateway process from /proc (1/{c['clock_ticks_per_s']} s ticks);",
        "it includes each request's parsing, selection and proxying, divided over its chunks.",
    ]
    k = r["counting"]
    lines += [
        "",
        f"## 3. Exact counting (context {k['variant']}, {t})",
        "",
        "### 3a. The cost of counting itself",
        "",
        "POST /apply-template then POST /tokenize, straight against the ready engine (what the gateway",
        f"does when it must count), n={count_reps(k)}.",
        "",
        "| prompt | tokens | apply-template + tokenize, ms |",
        "|---|---|---|",
    ]
    for n, row in k["engine_count"].items():
        lines.append(f"| ~{int(n)} bytes | {row['tokens']} | {f(row['ms'], 2)} |")
    lines += [
        "",
        "### 3b. The gateway's added latency: bound proves the fit vs must count",
        "",
        "max_tokens 1, non-streamed, the same body direct and through the gateway on the same ready",
        "engine; the engine's prompt cache holds the prompt, so the direct side is about one token.",
        "The gateway first tries its byte bound (template overhead + one token per byte + one per",
        f"message; measured here as fixed {k['template']['fixed']}, per message "
        f"{k['template']['per_message']}); only when bound + max_tokens exceeds the context does it count.",
        "",
        f"The engine's slot context is {k['slot_context']} (llama.cpp rounds `--ctx-size "
        f"{k['variant']}` up); the gateway compares against it.",
        "",
        "| case | prompt bytes | exact tokens | bound | gateway counted (its tokens_counted) "
        "| direct, ms | gateway, ms | added, ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in k["added"]:
        lines.append(
            f"| {row['case']} | {row['prompt_bytes']} | {row['exact_tokens']} | {row['bound_tokens']} "
            f"{'(proves)' if row['bound_proves'] else '(does not prove)'} "
            f"| {row['gateway_counted']:.0f} of {row['requests']} | {f(row['direct_ms'])} "
            f"| {f(row['gateway_ms'])} | {row['added_ms']:+.1f} |"
        )
    proven = [x for x in k["added"] if x["bound_proves"]]
    counted = [x for x in k["added"] if not x["bound_proves"]]
    if proven and counted:
        saved = counted[-1]["added_ms"] - proven[-1]["added_ms"]
        lines += [
            "",
            f"What the bound saves near a full context: {saved:+.1f} ms per request (two prompts one byte",
            "apart, one proven by the bound, one counted). With this byte-level tokenizer the bound is",
            "tight (tokens = bytes), so even 90% of the context is proven; with a BPE tokenizer (about 4",
            "bytes per token) the bound proves only prompts up to about a quarter of the context and",
            "the counted row is what larger prompts pay.",
        ]
    if "warning" in k:
        lines.append(f"\nWarning: {k['warning']}")
    cc = r["concurrency"]
    lines += [
        "",
        f"## 4. Concurrency ({cc['gen_tokens']} generated tokens per stream, one ready engine, context "
        f"{cc['context']}, {t})",
        "",
        f"Each client streams; the prompt is {cc['prompt_tokens']} tokens, so 256 x ({cc['prompt_tokens']} + "
        f"{cc['gen_tokens']}) = {256 * (cc['prompt_tokens'] + cc['gen_tokens'])} tokens fit the "
        f"{cc['context']}-token unified KV cache and the gateway admits every stream at once. llama-server",
        "runs 4 slots by default (on one unified KV cache), so at most 4 streams decode at a time; the",
        "others wait inside the engine (its HTTP threads), which is what p99 time to first token shows.",
        "1 client runs 32 requests one after another, 16 clients 2 each, 64 and 256 clients one each.",
        "",
        "| clients | side | requests | errors | tokens/s (all clients) | TTFT p50, ms | TTFT p99, ms "
        "| gateway CPU, s | gateway CPU per chunk, us | gateway peak RSS, MB | gateway requeues |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in cc["levels"]:
        for side in ("direct", "gateway"):
            x = lv[side]
            gcpu = f"{x['gateway_cpu_s']:.2f}" if x["gateway_cpu_s"] is not None else "-"
            gper = f"{x['gateway_cpu_us_per_chunk']:.1f}" if x["gateway_cpu_us_per_chunk"] else "-"
            grss = f"{x['gateway_peak_rss_mb']:.1f}" if x["gateway_peak_rss_mb"] else "-"
            lines.append(
                f"| {lv['clients']} | {side} | {x['requests']} | {x['errors']} | {x['tok_s']:.0f} "
                f"| {x['ttft_p50_ms']:.1f} | {x['ttft_p99_ms']:.1f} | {gcpu} | {gper} | {grss} "
                f"| {x['gateway_requeued'] if x['gateway_requeued'] is not None else '-'} |"
            )
    lines += [
        "",
        "Gateway/direct tokens/s: "
        + ", ".join(
            f"{lv['clients']}: {lv['gateway']['tok_s'] / lv['direct']['tok_s'] * 100:.0f}%"
            for lv in cc["levels"]
        )
        + f". Gateway VmHWM (whole run so far): {cc['gateway_vmhwm_mb']:.1f} MB;"
        " peak RSS sampled every 10 ms.",
    ]
    requeues = ", ".join(f"{lv['clients']}: {lv['gateway']['gateway_requeued']}" for lv in cc["levels"])
    lines += [
        "",
        f"Gateway requeues (see section 1) by clients: {requeues}. With few clients the",
        "engine streams as fast as one slot decodes, so the gateway's own time per request and per",
        "chunk (its CPU per chunk above, on the same 2 cores) shows directly in tokens/s; from 64",
        "clients on the engine's queue dominates both sides and the ratio approaches 100%.",
    ]
    errs = [e for lv in cc["levels"] for s in ("direct", "gateway") for e in lv[s]["error_samples"]]
    if errs:
        lines.append(f"Error samples: {errs[:3]}")
    if "bench-ttft-by-concurrency.png" in r.get("plots", []):
        lines += ["", "![TTFT p50/p99 by concurrency](bench-ttft-by-concurrency.png)"]
    s = r["swaps"]
    lines += [
        "",
        f"## 5. Swap cost (alternating two models, max_tokens 1, {t})",
        "",
        "| | swap total (send to response), ms | engine spawn to healthy, ms | overhead beyond it, ms |",
        "|---|---|---|---|",
        f"| gateway | {f(s['swap_total_ms'])} | {f(s['engine_startup_ms'])} "
        f"| {f(s['gateway_overhead_ms'])} |",
    ]
    if "router" in s:
        rs = s["router"]
        cl = (
            f(rs["child_listening_ms"]) + " (child's own log: start to listening)"
            if "child_listening_ms" in rs
            else "-"
        )
        lines.append(f"| router mode | {f(rs['swap_total_ms'])} | {cl} | - |")
    lines += [
        "",
        'Gateway engine startup is its own "healthy" transition reason ("in N ms": spawn to a',
        "passing health probe); the overhead is each swap's total minus its startup (stopping the",
        "old engine, the request itself). The router's swaps alternate its two presets the same way;",
        'it reports no spawn-to-healthy, only the child\'s own clock at "listening" (which excludes',
        "exec and the router's readiness wait), so only its total is directly comparable.",
        "",
        "## 6. Estimate hit rate (cold requests, the other model running)",
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
    sd = r["shutdown"]
    lines += [
        "",
        f"Hit rate: {e['hits']}/{e['total']} ({e['hit_rate'] * 100:.0f}%): the first started variant was the",
        'final one (no "upgraded" selection for the request).',
    ]
    if "engines" in r:
        lines += ["", *engines_markdown(r["engines"], t)]
    if "prompt_cache" in r:
        lines += ["", *prompt_cache_markdown(r["prompt_cache"], t)]
    if "hop" in r:
        lines += ["", *hop_markdown(r["hop"], t)]
    lines += [
        "",
        f"Shutdown: gateway exit code {sd['gateway_exit_code']} (asyncio gateway "
        f"{sd['asyncio_gateway_exit_code']}, router {sd['router_exit_code']}), llama-server left over: "
        f"{sd['leftover_llama_server'] or 'none'}.",
        "",
    ]
    return "\n".join(lines)


def count_reps(k: dict[str, Any]) -> str:
    first = next(iter(k["engine_count"].values()))
    return str(first["ms"]["n"])


def _ms(s: dict[str, float] | None, key: str = "median", n: bool = False) -> str:
    if not s:
        return "-"
    return f"{s[key]:.1f}" + (f" (n={s['n']})" if n else "")


def engines_markdown(e: dict[str, Any], t: str) -> list[str]:
    """Section 7: several engines side by side (also printed by `bench/run.py --only engines`)."""
    mix = ", ".join(f"{model} {count}" for model, count in sorted(e["mix"].items()))
    lines = [
        f"## 7. Several engines (three models in a random mix, {e['requests']} streamed requests of "
        f"{e['max_tokens']} tokens, {t})",
        "",
        f"The same sequence of requests on every side (seed {e['seed']}: {mix}; prompts of 20-400 bytes),",
        "one request at a time, each in turn on the gateway with `max_engines = 1`, the gateway with",
        "`max_engines = 3` and llama-server's router with `--models-max 3`. Every model has one",
        f"variant ({e['context']} tokens). Each side first got one request per model (its warm-up, not",
        f"counted); the single-model TTFT is {e['single_requests']} requests of the mix's first prompts,",
        "all to `tiny`, afterwards on the same side.",
        "",
        "| side | starts per 100 requests | TTFT p50, ms | TTFT p99, ms | single-model TTFT p50 (p99), ms "
        "| TTFT with its engine resident, p50 | TTFT that needed a start, p50 | engine spawn to healthy, "
        "p50 | gateway's share of a start (evicting / with room), p50 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, x in e["sides"].items():
        single = x["single_ttft_ms"]
        single_cell = f"{single['median']:.1f} ({single['p99']:.1f})" if single else "-"
        if x["router"]:
            start_cells = ["-", "-", "- (not comparable, see section 5)"]
        else:
            share = f"{_ms(x['start_share_ms'], n=True)} / {_ms(x['start_share_room_ms'], n=True)}"
            start_cells = [_ms(x["start_ttft_ms"], n=True), _ms(x["startup_ms"]), share]
        lines.append(
            f"| {name} | {x['starts_per_100']:.0f} | {_ms(x['ttft_ms'])} | {_ms(x['ttft_ms'], 'p99')} "
            f"| {single_cell} | {_ms(x.get('resident_ttft_ms'))} | " + " | ".join(start_cells) + " |"
        )
    one, three = e["sides"].get("gateway, max_engines 1"), e["sides"].get("gateway, max_engines 3")
    if one and three and one["ttft_ms"] and three["ttft_ms"] and three["single_ttft_ms"]:
        a, b = three["ttft_ms"]["median"], three["single_ttft_ms"]["median"]
        lines += [
            "",
            f"With every model resident (`max_engines = 3`) the gateway started {three['starts']} engines in "
            f"the mix and its median time to first token was {a:.1f} ms against {b:.1f} ms for one model "
            f"alone ({a - b:+.1f} ms); with `max_engines = 1` the same mix started "
            f"{one['starts_per_100']:.0f} engines per 100 requests and the median rose to "
            f"{one['ttft_ms']['median']:.1f} ms.",
        ]
    warm = "; ".join(
        f"{name}: " + ", ".join(f"{ms:.0f}" for ms in x["warmup_ttft_ms"]) for name, x in e["sides"].items()
    )
    lines += [
        "",
        "The gateway's share of a start is the request's time to its first token minus the engine's",
        'own spawn-to-healthy (its "healthy" transition): stopping the evicted engine (when one was',
        "evicted), the probes, and the request's own first token. Warm-up requests (each model's first,",
        f"a cold start) took, in ms to the first token: {warm}.",
    ]
    errors = {name: x["errors"] for name, x in e["sides"].items() if x["errors"]}
    if errors:
        lines += ["", f"Failed requests: {errors}"]
    codes = e.get("exit_codes", {})
    if any(code != 0 for code in codes.values()):
        lines += ["", f"Exit codes: {codes}"]
    return lines
