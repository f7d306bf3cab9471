"""The dashboard's endpoints in process: /gateway/events (state first, resume with
Last-Event-ID, filters, keep-alive, shutdown, keys) and the page's shell (CSP, files, /)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from gateway.config import load_config
from gateway.demo.harness import to_lua
from gateway.server import GatewayServer
from gateway.server.dashboard import stream
from gateway.server.dashboard.diagram import machine_svg
from gateway.server.dashboard.kept import Kept
from gateway.supervisor.machine import STATES, TRANSITIONS
from gateway.utils.live import KEPT, LiveEvent, LiveEvents, LiveKind

ADMIN = "sk-admin"
TEAM = "sk-team"
HTML = {"Accept": "text/html,application/xhtml+xml"}


@contextlib.asynccontextmanager
async def gateway_app(folder: Path, **server: Any) -> AsyncIterator[tuple[GatewayServer, TestClient]]:
    """A gateway (no engine ever starts) and a client of its app."""
    path = folder / "cfg.lua"
    path.write_text(
        f"server = {to_lua(server)}\nmodels = {{ {{ name = 'a', variants = {{ {{ context = 512 }} }} }} }}"
    )
    gateway = GatewayServer(load_config(path))
    async with TestClient(TestServer(gateway.build_app())) as client:
        yield gateway, client


@pytest.fixture
async def dashboard(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[tuple[GatewayServer, TestClient]]:
    caplog.set_level(logging.INFO, logger="gateway")  # as the gateway logs: info and up
    async with gateway_app(tmp_path) as opened:
        yield opened


@pytest.fixture
async def keyed(tmp_path: Path) -> AsyncIterator[tuple[GatewayServer, TestClient]]:
    async with gateway_app(tmp_path, admin_key=ADMIN, api_keys=[TEAM]) as opened:
        yield opened


async def frames(response: ClientResponse, count: int) -> list[tuple[int, str, Any]]:
    """The next `count` events: (id or 0, kind, data); comments are skipped."""
    found: list[tuple[int, str, Any]] = []
    while len(found) < count:
        raw = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
        fields = dict(
            line.split(": ", 1) for line in raw.decode().splitlines() if line and not line.startswith(":")
        )
        if "event" in fields:
            found.append((int(fields.get("id", 0)), fields["event"], json.loads(fields["data"])))
    return found


def publish(server: GatewayServer, kind: LiveKind, **data: Any) -> int:
    server.supervisor.live.publish(kind, data)
    return server.supervisor.live.since(0)[-1].id


async def test_a_first_connect_gets_the_state_then_the_events_as_they_come(dashboard: Any) -> None:
    server, client = dashboard
    done = publish(server, LiveKind.COMPLETION, request_id="r1", model="a", status=200)
    async with client.get("/gateway/events") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        [(state_id, kind, state)] = await frames(response, 1)
        assert (kind, state_id, state["last_id"]) == ("state", done, done)
        assert [m["name"] for m in state["models"]] == ["a"]
        assert state["models"][0]["variants"][0]["context"] == 512
        assert [r["request_id"] for r in state["activity"]] == ["r1"]  # what came before it
        assert state["state"]["engines"] == [] and "history" in state["state"]
        later = publish(server, LiveKind.SELECTION, model="a", outcome="started")
        [(event_id, kind, data)] = await frames(response, 1)
        assert (event_id, kind, data["model"], data["outcome"]) == (later, "selection", "a", "started")
        assert data["at"] == server.supervisor.live.since(later - 1)[0].at  # when it was published


def test_finished_requests_are_kept_after_the_events_ring_moved_on() -> None:
    live = LiveEvents(kept=10)
    kept = Kept(live)
    live.publish(LiveKind.COMPLETION, {"request_id": "early"})
    first = kept.catch_up()
    assert first == live.since(0)[-1].id
    for n in range(20):
        live.publish(LiveKind.LOG, {"message": str(n)})
    assert kept.catch_up() == first + 20
    assert [r["request_id"] for r in kept.activity] == ["early"]  # the ring forgot it
    assert [line["message"] for line in kept.logs] == [str(n) for n in range(10, 20)]  # what it had


async def test_a_reconnect_with_last_event_id_gets_what_it_missed_and_no_state(dashboard: Any) -> None:
    server, client = dashboard
    seen = publish(server, LiveKind.QUEUE, models={"a": {"count": 1, "oldest": 1.0}})
    missed = [publish(server, LiveKind.GRANT, model="a", in_flight=n) for n in (1, 2)]
    async with client.get("/gateway/events", headers={"Last-Event-ID": str(seen)}) as response:
        got = await frames(response, 2)
        assert [(event_id, kind) for event_id, kind, _ in got] == [(missed[0], "grant"), (missed[1], "grant")]
        assert [data["in_flight"] for _, _, data in got] == [1, 2]


@pytest.mark.parametrize("resume", ["1", "999999"])
async def test_a_resume_the_kept_events_no_longer_cover_starts_from_the_state(
    dashboard: Any, resume: str
) -> None:
    server, client = dashboard
    for n in range(KEPT + 5):  # event 2 is gone from the ring: a gap after 1
        publish(server, LiveKind.LOG, source="gateway", message=str(n))
    async with client.get("/gateway/events", headers={"Last-Event-ID": resume}) as response:
        [(_, kind, state)] = await frames(response, 1)
        assert kind == "state" and state["last_id"] == server.supervisor.live.since(0)[-1].id


async def test_filters_choose_kinds_and_log_lines(dashboard: Any) -> None:
    server, client = dashboard
    query = "kinds=log,completion&log=engine&log_contains=HELLO"
    async with client.get(f"/gateway/events?{query}") as response:
        logging.getLogger("gateway.engine").info("[a@512 pid=7] hello from the engine")
        logging.getLogger("gateway.engine").info("[a@512 pid=7] something else")
        logging.getLogger("gateway.supervisor").info("hello from the gateway")
        publish(server, LiveKind.GRANT, model="a", in_flight=1)
        publish(server, LiveKind.COMPLETION, request_id="r2", model="a")
        [(_, kind, line), (_, last, _)] = await frames(response, 2)  # no state: not asked for
        assert (kind, line["source"], line["engine"], line["message"]) == (
            "log",
            "engine",
            "a@512",
            "hello from the engine",
        )
        assert last == "completion"


async def test_log_lines_tell_the_engines_output_from_the_gateways(dashboard: Any) -> None:
    _, client = dashboard
    async with client.get("/gateway/events?kinds=log") as response:
        logging.getLogger("gateway.engine").warning("[a@512 pid=7] slot 0 released")
        logging.getLogger("gateway.engine").warning("engine start a@512 pid=7: llama-server -c 512")
        lines = [data for _, _, data in await frames(response, 2)]
        assert [(line["source"], line["level"]) for line in lines] == [
            ("engine", "warning"),
            ("gateway", "warning"),
        ]


@pytest.mark.parametrize(
    ("query", "headers", "param"),
    [
        ("kinds=transition,nope", {}, "kinds"),
        ("kinds=", {}, "kinds"),
        ("log=all", {}, "log"),
        ("", {"Last-Event-ID": "x1"}, "Last-Event-ID"),
        ("", {"Last-Event-ID": "9" * 4301}, "Last-Event-ID"),  # (was a 500: int() refuses it)
    ],
)
async def test_a_bad_filter_or_resume_point_is_refused_in_openais_shape(
    dashboard: Any, query: str, headers: dict[str, str], param: str
) -> None:
    _, client = dashboard
    async with client.get(f"/gateway/events?{query}", headers=headers) as response:
        assert response.status == 400
        error = (await response.json())["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", param)


async def test_an_idle_stream_gets_keep_alive_comments(
    dashboard: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "KEEPALIVE", 0.05)
    _, client = dashboard
    async with client.get("/gateway/events?kinds=completion") as response:
        assert await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5) == b"retry: 1000\n\n"
        assert await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5) == b": keep-alive\n\n"


async def test_shutdown_ends_the_streams_at_once(dashboard: Any) -> None:
    server, client = dashboard
    async with client.get("/gateway/events") as response:
        await frames(response, 1)
        server.dashboard.close()
        rest = await asyncio.wait_for(response.content.read(), 2)  # ends: no wait for a keep-alive
        assert rest == b""


async def test_streams_opened_before_the_keys_changed_are_ended(dashboard: Any) -> None:
    """A reload that revokes a key must not leave streams opened with it running; a
    stream opened afterwards is served as ever."""
    server, client = dashboard
    async with client.get("/gateway/events") as response:
        await frames(response, 1)
        server.dashboard.keys_changed()
        assert await asyncio.wait_for(response.content.read(), 2) == b""
    async with client.get("/gateway/events") as response:
        assert [kind for _, kind, _ in await frames(response, 1)] == ["state"]


def test_a_lost_notice_has_no_id() -> None:
    lost = LiveEvent(0, LiveKind.LOST, {"count": 3}, 1.0)
    assert stream._frame(lost, {}) == b'event: lost\ndata: {"at":1.0,"count":3}\n\n'


async def test_the_events_need_the_key_the_shell_does_not(keyed: Any) -> None:
    _, client = keyed
    async with client.get("/gateway/events") as response:
        assert response.status == 401
        assert (await response.json())["error"]["type"] == "authentication_error"
    for wrong in ("wrong", TEAM):  # /gateway/* takes the admin key only, when there is one
        async with client.get("/gateway/events", headers={"Authorization": f"Bearer {wrong}"}) as response:
            assert response.status == 401
    async with client.get("/gateway/events", headers={"Authorization": f"Bearer {ADMIN}"}) as response:
        assert response.status == 200
        assert (await frames(response, 1))[0][1] == "state"
    for path, content_type in [
        ("/gateway/ui", "text/html"),
        ("/gateway/ui/app.js", "text/javascript"),
        ("/gateway/ui/style.css", "text/css"),
        ("/gateway/ui/machine.svg", "image/svg+xml"),
    ]:
        async with client.get(path) as response:
            assert (response.status, response.content_type) == (200, content_type), path
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]
            assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_the_page_sets_a_strict_content_security_policy(dashboard: Any) -> None:
    _, client = dashboard
    async with client.get("/gateway/ui") as response:
        policy = dict(
            part.strip().split(" ", 1) for part in response.headers["Content-Security-Policy"].split(";")
        )
        page = await response.text()
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    assert policy["script-src"] == policy["style-src"] == policy["connect-src"] == "'self'"
    assert policy["img-src"] == "'self' data:"
    assert (
        "<script>" not in page
        and "style=" not in page
        and " on" not in page.replace("\n", " ").split("<body")[0]
    )


async def test_files_outside_the_ui_folder_are_not_served(dashboard: Any) -> None:
    _, client = dashboard
    for path in ["/gateway/ui/missing.js", "/gateway/ui/..%2fdashboard%2f__init__.py", "/gateway/ui/%2e%2e"]:
        async with client.get(path) as response:
            assert response.status == 404, path


async def test_a_browser_asking_for_slash_is_sent_to_the_page_others_see_what_they_saw(keyed: Any) -> None:
    _, client = keyed
    async with client.get("/", headers=HTML, allow_redirects=False) as response:
        assert response.status == 303 and response.headers["Location"] == "/gateway/ui"
    async with client.get("/", headers={"Accept": "application/json"}) as response:
        assert response.status == 401  # as before: a key is needed before anything is said
    async with client.post("/", headers={**HTML, "Authorization": f"Bearer {ADMIN}"}) as response:
        assert response.status == 404


async def test_without_keys_slash_is_still_not_found(dashboard: Any) -> None:
    _, client = dashboard
    async with client.get("/") as response:
        assert response.status == 404
        assert (await response.json())["error"]["type"] == "not_found_error"


def test_the_diagram_has_every_state_and_edge_of_the_machine() -> None:
    svg = ET.fromstring(machine_svg())
    groups = svg.findall("{http://www.w3.org/2000/svg}g")
    states = [g.get("data-state") for g in groups if g.get("class") == "state"]
    edges = {
        (g.get("data-from"), g.get("data-to"), g.get("data-trigger"))
        for g in groups
        if g.get("class") == "edge"
    }
    assert states == STATES
    assert edges == {
        (source, dest, trigger) for trigger, sources, dest, _ in TRANSITIONS for source in sources
    }
