"""The HTTP side: the aiohttp app, the request handler, the proxy streamer, error mapping."""

from gateway.server.app import GatewayServer
from gateway.server.handler import RequestHandler

__all__ = ["GatewayServer", "RequestHandler"]
