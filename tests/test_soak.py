"""The short fault-and-load run (bench/soak.py): 8 clients for about 12 s on three models
that share two engines (max_engines = 2), while engines get SIGKILLed and the config's
engine arguments change, then every check of its report."""

from __future__ import annotations

from pathlib import Path

from bench.soak import MAX_ENGINES, MIXES, MODELS, REQUEST_TIMEOUT, SERVER, run_soak, soak_models
from gateway.demo.tinymodel import write_tiny_model
from tests.conftest import Gateway

SECONDS = 12
CLIENTS = 8
SEED = 20261126  # the mix is reproducible; the timing of kills, reloads and swaps is not
NEW_KINDS = ("chat-n", "n-predict", "long-role", "prompts")  # #10: two of each in every bag


def test_soak_with_engine_kills(start_gateway, tiny_models, tmp_path: Path) -> None:
    models = {**tiny_models, "tiny-c": write_tiny_model(tmp_path / "tiny-c.gguf", seed=3)}
    gateway: Gateway = start_gateway(soak_models(models), **SERVER)
    report = run_soak(
        gateway.url,
        SECONDS,
        CLIENTS,
        kill_engines=True,
        seed=SEED,
        gateway_pid=gateway.process.pid,
        config_path=gateway.config_path,
    )
    summary = report.summary()
    print(summary)
    # it really was load, with faults, across models and variants
    assert report.requests >= 4 * CLIENTS, summary
    assert report.kills, f"the killer found no engine to kill\n{summary}"
    assert report.reloads >= 3 and not report.reload_failures, summary
    # more requests than a bag of kinds holds: each kind #10 asked for came at least twice
    assert all(report.kinds[kind] >= dict(MIXES)[kind] for kind in NEW_KINDS), summary
    assert report.kinds["slow-stream"] >= 1, summary  # a client that stops reading a long stream
    assert report.outcomes["complete"] > 0 and report.outcomes["cancelled"] > 0, summary
    assert len(report.served) >= 4, f"too few model variants served\n{summary}"
    # all three models served, on two engines: engines were evicted for others
    assert {served.split("@")[0] for served in report.served} == set(MODELS), summary
    assert report.max_engines == MAX_ENGINES and report.peak_engines == MAX_ENGINES, summary
    assert not report.crowded, "\n".join(report.crowded)
    assert sum(report.evictions.values()) > 0 and sum(report.starts.values()) > 0, summary
    assert set(report.transitions_by_model) == set(MODELS), summary
    # every request: a complete, well-formed answer or a clear error, and none hung
    assert report.bad_answer_count == 0, "\n".join([summary, *report.bad_answers])
    assert report.hung_count == 0, "\n".join([f"over {REQUEST_TIMEOUT:g}s:", *report.hung])
    # no engine died that the killer did not kill, the supervisor had no fault
    assert not report.engine_problems(), summary
    # afterwards: the current engines only, no descriptor leak, a legal history, healthy
    assert not report.leftover_engines, summary
    assert report.fd_growth() <= report.fd_slack, summary
    assert report.transitions > 0, summary
    assert not report.illegal_transitions, "\n".join(report.illegal_transitions)
    assert not report.broken_chain, "\n".join(report.broken_chain)
    assert report.metrics_problem is None, summary
    assert report.health_after == 200, summary
    assert not report.recovery_failures, summary
    assert report.problems() == [], summary
