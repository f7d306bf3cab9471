"""Configuration: the Lua file, its validation, and the typed result."""

from gateway.config.loader import ConfigError, load_config
from gateway.config.schema import (
    GatewayConfig,
    Model,
    RequestRules,
    ServerConfig,
    Timeouts,
    Variant,
)

__all__ = [
    "ConfigError",
    "GatewayConfig",
    "Model",
    "RequestRules",
    "ServerConfig",
    "Timeouts",
    "Variant",
    "load_config",
]
