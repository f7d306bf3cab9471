"""The committed diagrams are what the state machine's definition draws today."""

from __future__ import annotations

from pathlib import Path

from gateway.supervisor.machine import STATES, TRANSITIONS
from gateway.supervisor.statechart import dot, mermaid

STATECHARTS = Path(__file__).resolve().parent.parent / "statecharts"


def test_committed_mermaid_matches_the_machine() -> None:
    assert (STATECHARTS / "engine.mmd").read_text() == mermaid(), "run `make statecharts`"


def test_committed_dot_matches_the_machine() -> None:
    assert (STATECHARTS / "engine.dot").read_text() == dot(), "run `make statecharts`"


def test_every_edge_of_the_table_is_drawn() -> None:
    text = mermaid()
    for trigger, sources, dest, _ in TRANSITIONS:
        for source in sources:
            assert f"{source} --> {dest}: {trigger}" in text
    assert all(f'state "{s}" as {s}' in text for s in STATES)


def test_readme_diagram_lists_the_same_edges() -> None:
    readme = (STATECHARTS.parent / "README.md").read_text()
    for trigger, sources, dest, _ in TRANSITIONS:
        for source in sources:
            assert f"{source} --> {dest}: {trigger}" in readme
