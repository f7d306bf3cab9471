"""Loads the Lua config with python-lua-helper and maps it to dataclasses.

Validation and defaults live in `validate.lua` (run as the loader's post-script); this
module turns the flattened export into nested Python values, then into `GatewayConfig`.
"""

from __future__ import annotations

import contextlib
import io
import re
from importlib import resources
from pathlib import Path
from typing import Any

from python_lua_helper import PyLuaHelper

from gateway.config.schema import (
    GatewayConfig,
    Model,
    RequestRules,
    ServerConfig,
    Timeouts,
    Variant,
)

_POST_SCRIPT = "validate.lua"
_LUA_PREFIX = re.compile(r"^lua[\d.]*: ")


class ConfigError(Exception):
    """The config could not be loaded; the message is for the user as it stands."""


def load_config(path: str | Path) -> GatewayConfig:
    """Run the user's Lua file, validate it in Lua, and return the typed config."""
    config_path = Path(path).resolve()
    if not config_path.is_file():
        raise ConfigError(f"config file not found: {config_path}")
    helper = _run_lua(config_path)
    tree = {name: _unflatten(helper, name) for name in ("server", "models")}
    return _build(config_path, tree)


def _run_lua(config_path: Path) -> PyLuaHelper:
    post_script = resources.files("gateway.config").joinpath(_POST_SCRIPT)
    # python-lua-helper prints Lua's output and raises a bare RuntimeError; keep the text.
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), resources.as_file(post_script) as post:
            return PyLuaHelper(
                str(config_path),
                export_vars=["server", "models"],
                post_script=str(post),
                min_lua_version="5.3.0",
            )
    except RuntimeError as exc:
        raise ConfigError(_lua_message(captured.getvalue()) or f"{config_path}: {exc}") from None


def _lua_message(output: str) -> str:
    """The first line Lua printed for an error, without the interpreter's name."""
    for line in output.splitlines():
        if _LUA_PREFIX.match(line):
            return _LUA_PREFIX.sub("", line, count=1)
    return output.strip().splitlines()[0] if output.strip() else ""


def _unflatten(helper: PyLuaHelper, name: str) -> Any:
    """Rebuild a nested value from the loader's `a.b.1.c` keys and type metadata."""
    kind = helper.get_type(name)
    if kind == "table":
        prefix = name + "."
        children = {k[len(prefix) :].split(".", 1)[0] for k in helper if k.startswith(prefix)}
        if helper.get_table_seq(name):
            return [_unflatten(helper, f"{prefix}{i}") for i in helper.get_table_seq(name)]
        return {child: _unflatten(helper, prefix + child) for child in sorted(children)}
    value = helper.get(name)
    if kind == "number":
        return int(value) if re.fullmatch(r"-?\d+", value) else float(value)
    if kind == "boolean":
        return value == "true"
    return value


def _as_list(value: Any) -> list[Any]:
    # An empty Lua table exports as a map; every list-typed key may be empty.
    return list(value) if isinstance(value, list) else []


def _timeouts(t: dict[str, Any]) -> Timeouts:
    return Timeouts(
        health_check=float(t["health_check_timeout"]),
        startup=float(t["engine_startup_timeout"]),
        drain=float(t["drain_timeout"]),
        stop=float(t["stop_timeout"]),
        idle=float(t["engine_idle_timeout"]),
    )


def _listen(server: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    addresses = []
    for addr in _as_list(server["listen_v4"]) + _as_list(server["listen_v6"]):
        host, _, port = addr.rpartition(":")
        addresses.append((host.strip("[]"), int(port)))
    return tuple(addresses)


def _resolve_paths(args: list[str], base: Path) -> tuple[str, ...]:
    """Relative file arguments are relative to the config's folder, not the cwd."""
    return tuple(_resolve_arg(a, base) for a in args)


def _resolve_arg(arg: str, base: Path) -> str:
    flag, eq, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
    if flag and not eq:
        return arg
    if value and not Path(value).is_absolute() and ("/" in value or (base / value).exists()):
        value = str((base / value).resolve())
    return f"{flag}{eq}{value}"


def _resolve_binary(binary: str | None, base: Path) -> str | None:
    if binary is None or "/" not in binary or Path(binary).is_absolute():
        return binary
    return str((base / binary).resolve())


def _build_model(m: dict[str, Any], base: Path) -> Model:
    rules = m["request"]
    variants = sorted(
        (
            Variant(
                model=m["name"],
                context=v["context"],
                args=_resolve_paths(_as_list(v["args"]), base),
                binary=_resolve_binary(v.get("binary"), base),
                timeouts=_timeouts(v),
            )
            for v in m["variants"]
        ),
        key=lambda v: v.context,
    )
    return Model(
        name=m["name"],
        aliases=tuple(_as_list(m["aliases"])),
        engine=m["engine"],
        binary=_resolve_binary(m.get("binary"), base),
        args=_resolve_paths(_as_list(m["args"]), base),
        env=dict(m["env"] or {}),
        default_max_tokens=m["default_max_tokens"],
        request=RequestRules(
            defaults=dict(rules["defaults"] or {}),
            force=dict(rules["force"] or {}),
            strip=tuple(_as_list(rules["strip"])),
        ),
        variants=tuple(variants),
    )


def _build(path: Path, tree: dict[str, Any]) -> GatewayConfig:
    server = tree["server"]
    base = path.parent
    return GatewayConfig(
        source=str(path),
        server=ServerConfig(
            listen=_listen(server),
            queue_limit=server["queue_limit"],
            max_body_bytes=server["max_body_bytes"],
            max_start_failures=server["max_start_failures"],
            loading_keepalive=server["loading_keepalive"],
            timeouts=_timeouts(server),
        ),
        models=tuple(_build_model(m, base) for m in tree["models"]),
    )
