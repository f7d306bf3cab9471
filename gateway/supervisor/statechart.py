"""Draws the engine state machine from its own definition (`machine.TRANSITIONS`).

    python -m gateway.supervisor.statechart statecharts/

writes `engine.mmd` (Mermaid, for Markdown) and, where graphviz's `dot` is installed,
`engine.svg`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from transitions.extensions import GraphMachine

from gateway.supervisor.machine import STATES, TRANSITIONS, machine_kwargs


def mermaid() -> str:
    """Mermaid stateDiagram-v2 text, as transitions draws it."""
    machine = GraphMachine(graph_engine="mermaid", title="title: engine lifecycle", **machine_kwargs())
    return machine.get_graph().draw(None).rstrip() + "\n"


def dot() -> str:
    """Graphviz DOT text of the same machine (drawn without the graphviz Python package)."""
    lines = [
        "digraph engine {",
        '  rankdir=LR; node [shape=box, style=rounded, fontname="sans"];',
        '  edge [fontname="sans", fontsize=10];',
        "  __start [shape=point];",
        "  __start -> idle;",
    ]
    lines += [f"  {state};" for state in STATES]
    for trigger, sources, dest, _ in TRANSITIONS:
        lines += [f'  {source} -> {dest} [label="{trigger}"];' for source in sources]
    return "\n".join([*lines, "}"]) + "\n"


def write(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "engine.mmd", folder / "engine.dot"]
    written[0].write_text(mermaid())
    written[1].write_text(dot())
    if shutil.which("dot"):
        svg = folder / "engine.svg"
        subprocess.run(["dot", "-Tsvg", "-o", str(svg), str(written[1])], check=True)
        written.append(svg)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "statecharts")):
        print(path)
