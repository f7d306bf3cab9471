"""The dashboard's page and its files (gateway/server/ui/), served under a strict
Content-Security-Policy; and a browser's GET / sent on to it."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from gateway.server.auth import DASHBOARD, wants_the_dashboard
from gateway.server.dashboard.diagram import machine_svg

UI_FOLDER = Path(__file__).parent.parent / "ui"
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
# Scripts, styles and requests from the gateway only, nothing inline, no frames, no forms
# that submit anywhere (the key is read by the script, never sent as a form).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MACHINE = "machine.svg"  # drawn from the state machine's definition, not a file


class Shell:
    def __init__(self, folder: Path = UI_FOLDER) -> None:
        self._files = {path.name: path for path in folder.iterdir() if path.suffix in CONTENT_TYPES}

    async def page(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name == MACHINE:
            return _answer(machine_svg().encode(), MACHINE)
        if name not in self._files:
            raise web.HTTPNotFound()
        return self._file(name)

    async def home(self, request: web.Request) -> web.Response:
        """GET / from a browser: the dashboard; anything else at / is not found, as before."""
        if wants_the_dashboard(request):
            raise web.HTTPSeeOther(DASHBOARD)
        raise web.HTTPNotFound()

    def _file(self, name: str) -> web.Response:
        return _answer(self._files[name].read_bytes(), name)


def _answer(body: bytes, name: str) -> web.Response:
    content_type = CONTENT_TYPES[Path(name).suffix]
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=HEADERS)
