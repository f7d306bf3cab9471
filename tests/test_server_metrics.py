"""/metrics speaks the exposition format prometheus_client writes, under its content type."""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.config import load_config
from gateway.server import GatewayServer


async def test_metrics_content_type_is_prometheus_clients(tmp_path: Path) -> None:
    path = tmp_path / "cfg.lua"
    path.write_text('models = { { name = "a", variants = { { context = 8 } } } }')
    server = GatewayServer(load_config(path))
    async with TestClient(TestServer(server.build_app())) as client:
        response = await client.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
        assert "# TYPE" in await response.text()
