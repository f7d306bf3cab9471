"""Configuration: the Lua file, its validation, and the typed result."""

from gateway.config.loader import DEFAULT_CONFIG_TIMEOUT, ConfigError, ConfigRun, load_config
from gateway.config.schema import (
    GatewayConfig,
    Model,
    RequestRules,
    ServerConfig,
    Timeouts,
    Variant,
)

__all__ = [
    "DEFAULT_CONFIG_TIMEOUT",
    "ConfigError",
    "ConfigRun",
    "GatewayConfig",
    "Model",
    "RequestRules",
    "ServerConfig",
    "Timeouts",
    "Variant",
    "load_config",
]
