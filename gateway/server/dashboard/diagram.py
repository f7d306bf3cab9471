"""The engine state machine as an SVG, drawn from its own definition (`machine.TRANSITIONS`).

The dashboard puts one copy in every engine card and lights the current state: states are
`<g class="state" data-state="...">`, edges `<g class="edge" data-from data-to data-trigger>`.
The longest cycle through the initial state runs clockwise around an ellipse (among equal
ones, the first in the machine's order); the other states sit inside it. An edge bows
outwards, or to its left when an opposite edge joins the same two states.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from gateway.supervisor.machine import STATES, TRANSITIONS, machine_kwargs

WIDTH, HEIGHT = 440, 250
NODE_W, NODE_H = 76, 26
RADIUS_X, RADIUS_Y = 170, 90
INSIDE_SPACING = 110  # between states inside the ellipse
BEND = 0.18  # how far an edge bows out, as a share of its length
LEAST_BOW = 16.0  # ... and at least
MARGIN = 16  # around the states, for the labels of edges that bow outwards
ARROW = 7.0  # the arrowhead's length


@dataclass(frozen=True)
class Point:
    x: float
    y: float

    def __add__(self, other: Point) -> Point:
        return Point(self.x + other.x, self.y + other.y)

    def __sub__(self, other: Point) -> Point:
        return Point(self.x - other.x, self.y - other.y)

    def scaled(self, factor: float) -> Point:
        return Point(self.x * factor, self.y * factor)

    def unit(self) -> Point:
        length = math.hypot(self.x, self.y) or 1.0
        return self.scaled(1 / length)

    def __str__(self) -> str:
        return f"{self.x:.1f},{self.y:.1f}"


EDGES = frozenset((source, dest) for _, sources, dest, _ in TRANSITIONS for source in sources)
CENTRE = Point(WIDTH / 2, HEIGHT / 2)


def longest_cycle(start: str) -> list[str]:
    """The longest cycle of edges from `start` back to it, as the states it passes."""
    best = [start]

    def walk(path: list[str]) -> None:
        nonlocal best
        for state in STATES:
            if (path[-1], state) not in EDGES:
                continue
            if state == start and len(path) > len(best):
                best = list(path)
            elif state not in path:
                walk([*path, state])

    walk([start])
    return best


def positions() -> dict[str, Point]:
    """Each state's centre: the cycle from the left clockwise, the others inside."""
    ring = longest_cycle(machine_kwargs()["initial"])
    inside = [state for state in STATES if state not in ring]
    angles = [math.pi + i * 2 * math.pi / len(ring) for i in range(len(ring))]
    at = {
        state: CENTRE + Point(RADIUS_X * math.cos(angle), RADIUS_Y * math.sin(angle))
        for state, angle in zip(ring, angles, strict=True)
    }
    for i, state in enumerate(inside):
        at[state] = CENTRE + Point((i - (len(inside) - 1) / 2) * INSIDE_SPACING, 0)
    return at


def _border(centre: Point, towards: Point) -> Point:
    """Where the line from a state's centre towards a point leaves its box."""
    direction = towards - centre
    scale = min(
        (NODE_W / 2) / abs(direction.x) if direction.x else math.inf,
        (NODE_H / 2) / abs(direction.y) if direction.y else math.inf,
    )
    return centre + direction.scaled(scale)


def _edge(trigger: str, source: str, dest: str, meaning: str, at: dict[str, Point]) -> str:
    start, end = at[source], at[dest]
    chord = end - start
    middle = start + chord.scaled(0.5)
    bow = Point(chord.y, -chord.x).unit().scaled(max(LEAST_BOW, BEND * math.hypot(chord.x, chord.y)))
    outwards = middle - CENTRE
    if (dest, source) not in EDGES and bow.x * outwards.x + bow.y * outwards.y < 0:
        bow = bow.scaled(-1)
    control = middle + bow  # the left of travel, as screen y points down (or the other side)
    head, tail = _border(end, control), _border(start, control)
    back = (head - control).unit()
    wing = Point(-back.y, back.x).scaled(ARROW / 2.2)
    base = head - back.scaled(ARROW)
    label = tail.scaled(0.25) + control.scaled(0.5) + head.scaled(0.25)  # the curve's midpoint
    # A label beside a steep curve starts (or ends) there, so two of them never overlap.
    side = bow.unit().x
    anchor = "after" if side > 0.5 else "before" if side < -0.5 else "over"
    attrs = f"data-from={quoteattr(source)} data-to={quoteattr(dest)} data-trigger={quoteattr(trigger)}"
    return (
        f'<g class="edge" {attrs}><title>{escape(f"{trigger}: {meaning}")}</title>'
        f'<path class="line" d="M{tail} Q{control} {base}"/>'
        f'<path class="head" d="M{head} L{base + wing} L{base - wing} Z"/>'
        f'<text class="{anchor}" x="{label.x:.1f}" y="{label.y:.1f}">{escape(trigger)}</text></g>'
    )


def _state(state: str, centre: Point) -> str:
    corner = centre - Point(NODE_W / 2, NODE_H / 2)
    return (
        f'<g class="state" data-state={quoteattr(state)}>'
        f'<rect x="{corner.x:.1f}" y="{corner.y:.1f}" width="{NODE_W}" height="{NODE_H}" rx="8"/>'
        f'<text x="{centre.x:.1f}" y="{centre.y:.1f}">{escape(state)}</text></g>'
    )


def _view_box(at: dict[str, Point]) -> str:
    """The states' extent and a margin."""
    left = min(p.x for p in at.values()) - NODE_W / 2 - MARGIN
    top = min(p.y for p in at.values()) - NODE_H / 2 - MARGIN
    right = max(p.x for p in at.values()) + NODE_W / 2 + MARGIN
    bottom = max(p.y for p in at.values()) + NODE_H / 2 + MARGIN
    return f"{left:.0f} {top:.0f} {right - left:.0f} {bottom - top:.0f}"


@functools.cache
def machine_svg() -> str:
    at = positions()
    edges = [
        _edge(trigger, source, dest, meaning, at)
        for trigger, sources, dest, meaning in TRANSITIONS
        for source in sources
    ]
    states = [_state(state, centre) for state, centre in at.items()]
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="machine" viewBox="{_view_box(at)}" '
        f'role="img" aria-label="engine state machine">{"".join(edges)}{"".join(states)}</svg>\n'
    )
