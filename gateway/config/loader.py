"""Loads the Lua config with python-lua-helper and maps it to dataclasses.

Validation and defaults live in `validate.lua` (run as the loader's post-script); this
module turns the flattened export into nested Python values, then into `GatewayConfig`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from python_lua_helper import PyLuaHelper, py_lua_helper

from gateway.config.schema import (
    CountMethod,
    EngineKind,
    GatewayConfig,
    Model,
    PromptCache,
    RequestRules,
    ServerConfig,
    Timeouts,
    Upstream,
    Variant,
)
from gateway.utils.sizes import human_bytes

_POST_SCRIPT = "validate.lua"
_LOADER = Path(py_lua_helper.__file__).with_name("loader.lua")  # python-lua-helper's Lua side
# The standalone interpreter prefixes its error with its argv[0], which python-lua-helper
# makes an absolute path ("/usr/bin/lua5.4: "); a traceback follows the message.
_LUA_PREFIX = re.compile(r"^(?:.*?[/\\])?lua[\w.]*(?:\.exe)?: ")
_TRACEBACK = "stack traceback:"


log = logging.getLogger("gateway.config")

DEFAULT_CONFIG_TIMEOUT = 10.0  # seconds; a config's own server.config_timeout governs its reloads


class ConfigError(Exception):
    """The config could not be loaded; the message is for the user as it stands."""


def load_config(path: str | Path, timeout: float = DEFAULT_CONFIG_TIMEOUT) -> GatewayConfig:
    """Run the user's Lua file, validate it in Lua, and return the typed config."""
    return ConfigRun(path, timeout).load()


class ConfigRun:
    """One run of a config file in its own Lua process, given `timeout` seconds.

    The file is code: it may loop forever or wait on something. A run that takes too
    long is killed (with anything it started) and refused, and another thread may stop
    a run at any time (the gateway shutting down during a reload).
    """

    def __init__(self, path: str | Path, timeout: float) -> None:
        self.path = Path(path).resolve()
        self.timeout = timeout
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._stopped = False

    def load(self) -> GatewayConfig:
        """Blocks until the config is loaded; raises ConfigError."""
        if not self.path.is_file():
            raise ConfigError(f"config file not found: {self.path}")
        post_script = resources.files("gateway.config").joinpath(_POST_SCRIPT)
        try:
            with resources.as_file(post_script) as post:
                helper = _LuaHelper(self, str(self.path), ["server", "models"], post_script=str(post))
        except _LuaFailed as exc:
            message = _lua_message(exc.output)
            raise ConfigError(_full_path(message, self.path) or f"{self.path}: {exc}") from None
        except (OSError, ValueError) as exc:  # e.g. output or values that are not UTF-8
            raise ConfigError(f"{self.path}: cannot read the config's values: {exc}") from None
        tree = {name: _unflatten(helper, name) for name in ("server", "models")}
        return _build(self.path, tree)

    def stop(self) -> None:
        """End the run now, from any thread; `load` then raises ConfigError."""
        with self._lock:
            self._stopped = True
            if self._process is not None and self._process.returncode is None:
                _kill_group(self._process)

    def run_lua(self, command: list[str]) -> None:
        """Run python-lua-helper's loader to its end; _LuaFailed with its output if Lua failed."""
        process = self._spawn(command)
        try:
            out, err = process.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill(process)
            raise ConfigError(
                f"{self.path}: did not finish running within {self.timeout:g}s "
                "(server.config_timeout), so it was stopped"
            ) from None
        except BaseException:
            _kill(process)
            raise
        finally:
            with self._lock:
                self._process = None
        if self._stopped:
            raise ConfigError(f"{self.path}: loading was stopped")
        if process.returncode != 0:
            raise _LuaFailed((out + err).decode("utf-8", "replace"))

    def _spawn(self, command: list[str]) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._stopped:
                raise ConfigError(f"{self.path}: loading was stopped")
            # A process group of its own: a kill also reaches what the config started.
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            return self._process


class _LuaFailed(Exception):
    def __init__(self, output: str) -> None:
        super().__init__("the Lua loader failed")
        self.output = output  # what Lua printed: the config's output, then the error


class _LuaHelper(PyLuaHelper):
    """PyLuaHelper whose Lua process a ConfigRun runs. PyLuaHelper 1.4 runs it itself with
    subprocess.run and a fixed 180 s timeout, which nothing can cut short."""

    def __init__(self, run: ConfigRun, config: str, export: list[str], post_script: str) -> None:
        self._config_run = run
        super().__init__(config, export_vars=export, post_script=post_script, min_lua_version="5.3.0")

    def _run_lua_loader(self) -> None:
        # The command python-lua-helper 1.4's own _run_lua_loader builds for these options.
        lua = [self._lua_binary, str(_LOADER), "-ver", *(str(n) for n in self._lua_actual_version)]
        exports = [arg for name in self._export_vars for arg in ("-e", name)]
        scripts = ["-c", self._lua_config_script, "-post", self._post_script]
        dirs = ["-w", self._work_dir, "-t", self._temp_dir]
        self._config_run.run_lua([*lua, *scripts, *exports, *dirs, "--"])


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _kill(process: subprocess.Popen[bytes]) -> None:
    _kill_group(process)
    process.communicate()  # reaps it; its pipes close once the whole group is gone


def _lua_message(output: str) -> str:
    """The error Lua printed, without the interpreter's name and the stack traceback.

    The interpreter's stderr comes after whatever the config printed, so the message is
    the last prefixed line (and any lines of a multi-line message) before the traceback.
    """
    lines = output.splitlines()
    tracebacks = [i for i, line in enumerate(lines) if line.startswith(_TRACEBACK)]
    if tracebacks:
        lines = lines[: tracebacks[-1]]
    start = max((i for i, line in enumerate(lines) if _LUA_PREFIX.match(line)), default=None)
    if start is None:
        return next((line.strip() for line in reversed(lines) if line.strip()), "")
    lines[start] = _LUA_PREFIX.sub("", lines[start], count=1)
    return "\n".join(lines[start:]).strip()


def _full_path(message: str, config_path: Path) -> str:
    """Lua shortens a long file name in "file:line:" to "...<its end>"; restore the config's."""
    match = re.match(r"\.\.\.(.+?):\d+:", message)
    if match and str(config_path).endswith(match.group(1)):
        return str(config_path) + message[match.end(1) :]
    return message


def _children(helper: PyLuaHelper, name: str) -> set[str]:
    """The keys of table `name`. A key may itself contain dots ({["a.b"] = 1} exports as
    `name.a.b`): a remainder is one key unless a dotted prefix of it is a nested table."""
    prefix = name + "."
    children = set()
    for key in helper:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        cuts = [i for i, ch in enumerate(rest) if ch == "."]
        nested = next((rest[:i] for i in cuts if helper.is_table(prefix + rest[:i])), None)
        children.add(nested if nested is not None else rest)
    return children


def _unflatten(helper: PyLuaHelper, name: str) -> Any:
    """Rebuild a nested value from the loader's `a.b.1.c` keys and type metadata."""
    kind = helper.get_type(name)
    if kind == "table":
        prefix = name + "."
        children = _children(helper, name)
        seq = helper.get_table_seq(name)
        # A list is exactly the keys 1..n; a sparse or mixed table ({[15043] = -100}) is
        # an object with string keys, as JSON has it.
        if seq and seq[0] == 1 and children == {str(i) for i in seq}:
            return [_unflatten(helper, f"{prefix}{i}") for i in seq]
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


# llama-server flags whose value is a local file or folder (`llama-server --help`: FNAME,
# FILE, PATH, DIR); --lora and --control-vector take comma-separated lists, the -scaled
# forms FNAME:SCALE pairs. -hff/--hf-file names a file inside a Hugging Face repo: not local.
_PATH_FLAGS = frozenset(
    {
        "-m",
        "--model",
        "-md",
        "--model-draft",
        "--spec-draft-model",
        "-mm",
        "--mmproj",
        "--grammar-file",
        "-jf",
        "--json-schema-file",
        "-lcs",
        "--lookup-cache-static",
        "-lcd",
        "--lookup-cache-dynamic",
        "--log-file",
        "--path",
        "--ui-config-file",
        "--webui-config-file",
        "--mcp-servers-config",
        "--api-key-file",
        "--ssl-key-file",
        "--ssl-cert-file",
        "--slot-save-path",
        "--media-path",
        "--models-dir",
        "--models-preset",
        "--chat-template-file",
        "--log-prompts-dir",
        "--video-ffmpeg-dir",
    }
)
_PATH_LIST_FLAGS = frozenset({"--lora", "--control-vector"})
_SCALED_PATH_FLAGS = frozenset({"--lora-scaled", "--control-vector-scaled"})
_NUMBER = re.compile(r"-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?")


def _resolve_paths(args: list[str], base: Path) -> tuple[str, ...]:
    """Relative file arguments are relative to the config's folder, not the cwd.

    The values of file flags (`-m models/x.gguf`, `--model=models/x.gguf`) are always
    resolved; another argument only when it names a file that exists next to the config,
    so aliases, Hugging Face repos ("org/model") and URLs stay as they are.
    """
    out: list[str] = []
    flag = ""  # the flag the next argument is the value of
    for arg in args:
        if arg.startswith("-") and not _NUMBER.fullmatch(arg):
            name, eq, value = arg.partition("=")
            out.append(f"{name}={_resolve_value(name, value, base)}" if eq else arg)
            flag = "" if eq else name
        else:
            out.append(_resolve_value(flag, arg, base))
            flag = ""
    return tuple(out)


def _resolve_value(flag: str, value: str, base: Path) -> str:
    if flag in _PATH_LIST_FLAGS:
        return ",".join(_resolve_path(v, base, known=True) for v in value.split(","))
    if flag in _SCALED_PATH_FLAGS:
        pairs = (v.rpartition(":") if ":" in v else (v, "", "") for v in value.split(","))
        return ",".join(f"{_resolve_path(p, base, known=True)}{c}{s}" for p, c, s in pairs)
    return _resolve_path(value, base, known=flag in _PATH_FLAGS)


def _resolve_path(value: str, base: Path, *, known: bool) -> str:
    if not value or "://" in value or (not known and _NUMBER.fullmatch(value)):
        return value
    path = Path(value).expanduser() if known else Path(value)
    if path.is_absolute():
        return str(path)
    if known or (base / path).exists():
        return os.path.normpath(base / path)
    return value


def _resolve_binary(binary: str | None, base: Path) -> str | None:
    """A bare name ("llama-server") is looked up on PATH; a path is relative to the config."""
    if binary is None or "/" not in binary:
        return binary
    return os.path.normpath(base / Path(binary).expanduser())


def _args(kind: EngineKind, args: Any, base: Path) -> tuple[str, ...]:
    """llama-server's file flags are resolved against the config's folder; another
    engine's flags are its own, so only arguments naming a file next to the config are."""
    if kind is EngineKind.LLAMA_CPP:
        return _resolve_paths(_as_list(args), base)
    return tuple(_resolve_path(a, base, known=False) for a in _as_list(args))


def _variant(name: str, kind: EngineKind, v: dict[str, Any], base: Path) -> Variant:
    engine = v["engine"]  # what the engine type's Lua file read in the arguments
    model_file = engine.get("model_file")
    mmproj_file = engine.get("mmproj_file")
    return Variant(
        model=name,
        context=v["context"],
        args=_args(kind, v["args"], base),
        binary=_resolve_binary(v.get("binary"), base),
        timeouts=_timeouts(v),
        slots=engine.get("slots"),
        kv_unified=engine["kv_unified"],
        alias=engine.get("alias"),
        model_file=_resolve_path(model_file, base, known=True) if model_file else None,
        embeddings=engine["embeddings"],
        reranking=engine["reranking"],
        mmproj_file=_resolve_path(mmproj_file, base, known=True) if mmproj_file else None,
        cache_type_k=engine["cache_type_k"],
        cache_type_v=engine["cache_type_v"],
        memory=v.get("memory"),
        engine=kind,
    )


def _upstream(kind: EngineKind, up: dict[str, Any] | None, where: str, base: Path) -> Upstream | None:
    if up is None:
        return None
    command = _as_list(up.get("command"))
    if command:  # the program as `binary` is found: a path is relative to the config
        command = [_resolve_binary(command[0], base) or command[0], *_args(kind, command[1:], base)]
    key_env = up.get("api_key_env")
    if key_env and key_env not in os.environ:
        log.warning(
            "%s: api_key_env: the environment variable %s is not set: requests go upstream "
            "without a key (an upstream that needs one answers 401)",
            where,
            key_env,
        )
    return Upstream(
        health=up["health"],
        count=CountMethod(up["count"]),
        served_name=up.get("served_name"),
        max_in_flight=up.get("max_in_flight"),
        command=tuple(command),
        url=up.get("url"),
        api_key_env=key_env,
        health_interval=float(up["health_interval"]),
    )


def _build_model(m: dict[str, Any], path: Path) -> Model:
    rules = m["request"]
    base = path.parent
    kind = EngineKind(m["engine"])
    variants = sorted((_variant(m["name"], kind, v, base) for v in m["variants"]), key=lambda v: v.context)
    return Model(
        name=m["name"],
        aliases=tuple(_as_list(m["aliases"])),
        engine=kind,
        binary=_resolve_binary(m.get("binary"), base),
        args=_args(kind, m["args"], base),
        env=dict(m["env"] or {}),
        default_max_tokens=m["default_max_tokens"],
        request=RequestRules(
            defaults=dict(rules["defaults"] or {}),
            force=dict(rules["force"] or {}),
            strip=tuple(_as_list(rules["strip"])),
        ),
        variants=tuple(variants),
        keep_loaded=m["keep_loaded"],
        upstream=_upstream(kind, m.get("upstream"), f"{path}: model {m['name']!r}", base),
    )


def _build(path: Path, tree: dict[str, Any]) -> GatewayConfig:
    server = tree["server"]
    budget, budget_source = _memory_budget(server.get("memory_budget"))
    config = GatewayConfig(
        source=str(path),
        server=ServerConfig(
            listen=_listen(server),
            queue_limit=server["queue_limit"],
            max_body_bytes=server["max_body_bytes"],
            max_start_failures=server["max_start_failures"],
            loading_keepalive=server["loading_keepalive"],
            timeouts=_timeouts(server),
            api_keys=tuple(_as_list(server["api_keys"])),
            admin_key=server.get("admin_key"),
            config_timeout=float(server["config_timeout"]),
            shutdown_delay=float(server["shutdown_delay"]),
            prompt_cache=_prompt_cache(server["prompt_cache"], path),
            preload=(server["preload"]["model"], server["preload"]["context"])
            if server.get("preload")
            else None,
            max_engines=server["max_engines"],
            memory_budget=budget,
            memory_budget_source=budget_source,
        ),
        models=tuple(_build_model(m, path) for m in tree["models"]),
    )
    problem = _memory_problem(config, tree)
    if problem:
        raise ConfigError(f"{path}: {problem}")
    return config


def _prompt_cache(value: dict[str, Any], path: Path) -> PromptCache | None:
    if not value["enabled"]:
        return None
    folder = os.path.normpath(value["dir"]) if value.get("dir") else None
    problem = _unusable_folder(folder) if folder else None
    if problem:
        raise ConfigError(f"{path}: server.prompt_cache.dir: {problem}")
    return PromptCache(folder, int(value["max_size"]))


def _unusable_folder(folder: str) -> str | None:
    """Why the prompt cache cannot use `folder`, if it cannot: it must be a directory, or
    one the gateway can make in its nearest existing parent. Making one there is tried
    (and undone): access() says yes to root everywhere, /proc included."""
    if os.path.lexists(folder):
        return None if os.path.isdir(folder) else f'"{folder}" is not a directory'
    parent = next(p for p in Path(folder).parents if os.path.lexists(p))
    if not parent.is_dir():
        return f'"{folder}" cannot be made: {parent} is not a directory'
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".llm-gateway-probe-", dir=parent))
    except OSError as exc:
        return f'"{folder}" cannot be made in {parent}: {exc.strerror or exc}'
    return None


def _memory_budget(value: int | str | None) -> tuple[int | None, str]:
    """The budget in bytes and where it came from; validate.lua left "auto" to resolve here."""
    if value is None:
        return None, ""
    if value == "auto":
        from gateway.engine.footprint import machine_budget  # gateway.engine imports gateway.config

        return machine_budget()
    return int(value), "config"


def _memory_problem(config: GatewayConfig, tree: dict[str, Any]) -> str | None:
    """Why the models cannot run under the server's max_engines and memory budget, if
    they cannot: a message naming the keys, or None."""
    from gateway.engine.footprint import Footprint, estimate, why_unestimated

    server = config.server
    kept = [(i, m) for i, m in enumerate(config.models, 1) if m.keep_loaded]
    if len(kept) > server.max_engines:
        names = ", ".join(f"models[{i}] ({m.name})" for i, m in kept)
        return (
            f"server.max_engines: {len(kept)} models have keep_loaded = true ({names}), but only "
            f"{server.max_engines} engine(s) may run at once (max_engines = {server.max_engines})"
        )
    budget = server.memory_budget
    if budget is None:
        return None
    budget_text = f"server.memory_budget {human_bytes(budget)} ({server.memory_budget_source})"
    smallest: dict[str, tuple[str, Footprint]] = {}  # keep_loaded model -> its smallest variant
    others: dict[str, tuple[str, Footprint]] = {}  # any other model -> its smallest variant
    for i, (m, model) in enumerate(zip(tree["models"], config.models, strict=True), 1):
        if not model.engine.local:
            continue  # a remote engine takes no memory here
        for j, v in enumerate(m["variants"], 1):
            variant = model.variant_for(v["context"])
            assert variant is not None
            where = f"models[{i}].variants[{j}] ({variant.key})"
            footprint = estimate(variant)
            if footprint is None:
                return (
                    f"{where}: its memory cannot be estimated under {budget_text}: "
                    f'{why_unestimated(variant)}; declare what it needs, e.g. memory = "8GiB", '
                    f"on the variant or on models[{i}]"
                )
            if footprint.total > budget:
                return f"{where}: needs {footprint.describe()}, more than {budget_text}"
            into = smallest if model.keep_loaded else others
            if model.name not in into or footprint.total < into[model.name][1].total:
                into[model.name] = (f"models[{i}] {variant.key} needs {footprint.describe()}", footprint)
    together = sum(footprint.total for _, footprint in smallest.values())
    names = "; ".join(name for name, _ in smallest.values())
    if together > budget:
        return (
            f"the keep_loaded models need {human_bytes(together)} together even in their smallest "
            f"variants, more than {budget_text}: {names}"
        )
    for what, footprint in others.values():
        if smallest and together + footprint.total > budget:
            # once the keep_loaded models run, this one could never start: every request 503
            return f"{what}, which never fits beside the keep_loaded models ({names}) within {budget_text}"
    return None
