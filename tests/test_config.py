"""Tests for gateway.config: the Lua config file, its validation in Lua, and the dataclasses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, ConfigRun, GatewayConfig, Timeouts, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "example.cfg.lua"
CLI = Path(sys.executable).with_name("llm-gateway")

# The smallest valid model; error cases replace the part they are about.
MODEL = '{ name = "a", variants = { { context = 1024 } } }'
# Timeouts of a config that sets none.
DEFAULT_TIMEOUTS = Timeouts(health_check=5.0, startup=60.0, drain=30.0, stop=10.0, idle=0.0)
# What the interpreter puts in front of an uncaught error ("/usr/bin/lua5.4: ", "lua: ").
INTERPRETER_PREFIX = re.compile(r"^(?:\S*/)?lua[\d.]*: ")


def write(tmp_path: Path, text: str, name: str = "cfg.lua") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, text: str) -> GatewayConfig:
    return load_config(write(tmp_path, text))


def load_error(path: Path) -> str:
    """The message of the ConfigError loading `path` raises, checked for what no error has."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert type(info.value) is ConfigError
    assert not isinstance(info.value, RuntimeError)
    message = str(info.value)
    assert "stack traceback" not in message
    assert not INTERPRETER_PREFIX.match(message), message
    assert message.strip() == message and message
    return message


# The example config ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example() -> GatewayConfig:
    return load_config(EXAMPLE)


def test_example_server_values(example: GatewayConfig) -> None:
    assert example.source == str(EXAMPLE)
    server = example.server
    assert server.listen == (("127.0.0.1", 7777),)
    assert server.queue_limit == 256
    assert server.max_body_bytes == 8388608
    assert server.max_start_failures == 3
    assert server.loading_keepalive is True
    assert server.timeouts == DEFAULT_TIMEOUTS


def test_example_models(example: GatewayConfig) -> None:
    tiny = example.models[0]
    assert tiny.name == "tiny"
    assert tiny.aliases == ("tiny-chat",)
    assert tiny.engine == "llama.cpp"
    assert tiny.binary is None
    assert tiny.args == ("-m", str(REPO_ROOT / "models" / "tiny.gguf"), "-t", "1")
    assert tiny.env == {}
    assert tiny.default_max_tokens == 256
    assert tiny.request.defaults == {"temperature": 0}
    assert tiny.request.force == {}
    assert tiny.request.strip == ()
    assert [v.context for v in tiny.variants] == [512, 2048, 8192]
    assert [v.args for v in tiny.variants] == [(), (), ("--cache-type-k", "q8_0")]
    assert [v.key for v in tiny.variants] == ["tiny@512", "tiny@2048", "tiny@8192"]
    assert tiny.largest_context == 8192
    assert tiny.variant_for(2048) is tiny.variants[1]
    assert tiny.variant_for(1000) is None


def test_example_defaults_filled(example: GatewayConfig) -> None:
    tiny_b = example.models[1]
    assert tiny_b.name == "tiny-b"
    assert tiny_b.aliases == ()
    assert tiny_b.engine == "llama.cpp"  # not in the file
    assert tiny_b.binary is None
    assert tiny_b.env == {}
    assert tiny_b.default_max_tokens == 128
    assert tiny_b.request.defaults == {} and tiny_b.request.force == {}
    assert tiny_b.request.strip == ()
    assert tiny_b.args == ("-m", str(REPO_ROOT / "models" / "tiny-b.gguf"), "-t", "1")
    (variant,) = tiny_b.variants
    assert (variant.model, variant.context, variant.args, variant.binary) == (
        "tiny-b",
        2048,
        (),
        None,
    )
    assert variant.timeouts == DEFAULT_TIMEOUTS


def test_example_aliases_resolve(example: GatewayConfig) -> None:
    tiny, tiny_b = example.models
    assert example.resolve("tiny") is tiny
    assert example.resolve("tiny-chat") is tiny
    assert example.resolve("tiny-b") is tiny_b
    assert example.resolve("tiny-b-chat") is None
    assert example.resolve("TINY") is None


def test_example_paths_do_not_depend_on_cwd(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(os.path.relpath(EXAMPLE, tmp_path))
    assert config.source == str(EXAMPLE)
    assert config.models[0].args[1] == str(REPO_ROOT / "models" / "tiny.gguf")


# Loading: defaults, order, paths, timeouts ---------------------------------------------------


def test_minimal_config_gets_every_default(tmp_path: Path) -> None:
    config = load(tmp_path, f"models = {{ {MODEL} }}")
    server = config.server
    assert server.listen == (("127.0.0.1", 7777),)
    assert (server.queue_limit, server.max_body_bytes, server.max_start_failures) == (
        256,
        8 * 1024 * 1024,
        3,
    )
    assert server.loading_keepalive is True
    assert server.timeouts == DEFAULT_TIMEOUTS
    (model,) = config.models
    assert model.name == "a"
    assert model.aliases == ()
    assert model.engine == "llama.cpp"
    assert model.binary is None
    assert model.args == ()
    assert model.env == {}
    assert model.default_max_tokens == 512
    assert model.request.defaults == {} and model.request.force == {}
    assert model.request.strip == ()
    (variant,) = model.variants
    assert (variant.context, variant.args, variant.binary) == (1024, (), None)
    assert variant.timeouts == DEFAULT_TIMEOUTS


def test_numbers_keep_their_types(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        server = { queue_limit = 10.0, health_check_timeout = 2.5, loading_keepalive = false }
        models = { { name = "a", default_max_tokens = 64.0, variants = { { context = 4096.0 } } } }
        """,
    )
    assert config.server.queue_limit == 10 and isinstance(config.server.queue_limit, int)
    assert config.server.timeouts.health_check == 2.5
    assert config.server.loading_keepalive is False
    model = config.models[0]
    assert model.default_max_tokens == 64 and isinstance(model.default_max_tokens, int)
    assert model.variants[0].context == 4096 and isinstance(model.variants[0].context, int)


def test_variants_sorted_by_context(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        models = { {
          name = "a",
          variants = {
            { context = 8192, args = { "--flash-attn", "on" } },
            { context = 512 },
            { context = 2048, args = { "-np", "2" } },
          },
        } }
        """,
    )
    model = config.models[0]
    assert [v.context for v in model.variants] == [512, 2048, 8192]
    assert [v.args for v in model.variants] == [(), ("-np", "2"), ("--flash-attn", "on")]
    assert model.largest_context == 8192
    assert all(v.model == "a" for v in model.variants)


def test_aliases_resolve(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        f"""
        models = {{
          {{ name = "big", aliases = {{ "gpt-4o", "big-chat" }},
             variants = {{ {{ context = 8 }} }} }},
          {MODEL},
        }}
        """,
    )
    big, a = config.models
    assert big.aliases == ("gpt-4o", "big-chat")
    assert config.resolve("gpt-4o") is big
    assert config.resolve("big-chat") is big
    assert config.resolve("big") is big
    assert config.resolve("a") is a
    assert config.resolve("gpt-4") is None


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch) -> None:
    conf = tmp_path / "conf"
    path = write(
        conf,
        """
        models = { {
          name = "a",
          binary = "bin/llama-server",
          args = { "-m", "models/x.gguf", "--mmproj=models/proj.gguf", "-t", "1" },
          variants = {
            { context = 512 },
            { context = 1024, args = { "--model", "../shared/y.gguf" }, binary = "./b2" },
            { context = 2048, args = { "-m", "/abs/z.gguf" } },
          },
        } }
        """,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = load_config(Path("..") / "conf" / "cfg.lua").models[0]
    assert model.args == (
        "-m",
        str(conf / "models" / "x.gguf"),
        f"--mmproj={conf / 'models' / 'proj.gguf'}",
        "-t",
        "1",
    )
    assert model.binary == str(conf / "bin" / "llama-server")
    v512, v1024, v2048 = model.variants
    assert v512.binary is None
    assert v1024.args == ("--model", str(tmp_path / "shared" / "y.gguf"))
    assert v1024.binary == str(conf / "b2")
    assert v2048.args == ("-m", "/abs/z.gguf")
    assert path.parent == conf


def test_binary_name_is_left_for_path_lookup(tmp_path: Path) -> None:
    model = load(
        tmp_path,
        'models = { { name = "a", binary = "llama-server", variants = { { context = 8 } } } }',
    ).models[0]
    assert model.binary == "llama-server"


def test_non_path_arguments_are_left_alone(tmp_path: Path) -> None:
    """Aliases, Hugging Face repos, URLs and numbers are not paths, even with a slash."""
    (tmp_path / "grammar.gbnf").write_text("root ::= .")
    model = load(
        tmp_path,
        """
        models = { {
          name = "a",
          args = {
            "--alias", "org/model",
            "-hf", "ggml-org/gemma-3-1b-it-GGUF",
            "--model-url", "https://example.com/x.gguf",
            "--chat-template", "{{ a / b }}",
            "--seed", -1, "-n", 4096, "--temp", 0.5,
            "--unknown-flag", "grammar.gbnf",
          },
          variants = { { context = 8 } },
        } }
        """,
    ).models[0]
    assert model.args == (
        "--alias",
        "org/model",
        "-hf",
        "ggml-org/gemma-3-1b-it-GGUF",
        "--model-url",
        "https://example.com/x.gguf",
        "--chat-template",
        "{{ a / b }}",
        "--seed",
        "-1",
        "-n",
        "4096",
        "--temp",
        "0.5",
        "--unknown-flag",
        str(tmp_path / "grammar.gbnf"),  # exists next to the config
    )


def test_lora_lists_resolve_each_path(tmp_path: Path) -> None:
    model = load(
        tmp_path,
        """
        models = { {
          name = "a",
          args = { "--lora", "a.gguf,/abs/b.gguf", "--lora-scaled=c.gguf:0.5,d.gguf:1" },
          variants = { { context = 8 } },
        } }
        """,
    ).models[0]
    assert model.args == (
        "--lora",
        f"{tmp_path / 'a.gguf'},/abs/b.gguf",
        f"--lora-scaled={tmp_path / 'c.gguf'}:0.5,{tmp_path / 'd.gguf'}:1",
    )


def test_timeouts_inherit_server_model_variant(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        server = { health_check_timeout = 2, engine_startup_timeout = 90, drain_timeout = 0,
                   stop_timeout = 4, engine_idle_timeout = 600 }
        models = {
          {
            name = "a",
            engine_startup_timeout = 300, drain_timeout = 15,
            variants = {
              { context = 512 },
              { context = 4096, engine_startup_timeout = 900, engine_idle_timeout = 0,
                stop_timeout = 1.5 },
            },
          },
          { name = "b", variants = { { context = 512, health_check_timeout = 7 } } },
        }
        """,
    )
    server = Timeouts(health_check=2, startup=90, drain=0, stop=4, idle=600)
    assert config.server.timeouts == server
    a512, a4096 = config.models[0].variants
    assert a512.timeouts == Timeouts(health_check=2, startup=300, drain=15, stop=4, idle=600)
    assert a4096.timeouts == Timeouts(health_check=2, startup=900, drain=15, stop=1.5, idle=0)
    (b512,) = config.models[1].variants
    assert b512.timeouts == Timeouts(health_check=7, startup=90, drain=0, stop=4, idle=600)
    assert all(isinstance(t, float) for t in vars(a4096.timeouts).values())


def test_listen_lists(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        f"""
        server = {{ listen_v4 = {{ "127.0.0.1:7777", "0.0.0.0:8080" }},
                   listen_v6 = {{ "[::1]:7777", "[::ffff:10.0.0.1]:9", "[fe80::1%eth0]:10" }} }}
        models = {{ {MODEL} }}
        """,
    )
    assert config.server.listen == (
        ("127.0.0.1", 7777),
        ("0.0.0.0", 8080),
        ("::1", 7777),
        ("::ffff:10.0.0.1", 9),
        ("fe80::1%eth0", 10),
    )


def test_ipv6_only(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        f'server = {{ listen_v4 = "none", listen_v6 = "[::]:7777" }} models = {{ {MODEL} }}',
    )
    assert config.server.listen == (("::", 7777),)


def test_env_and_request_rules(tmp_path: Path) -> None:
    model = load(
        tmp_path,
        """
        models = { {
          name = "a",
          env = { CUDA_VISIBLE_DEVICES = 0, ["LLAMA.X"] = "y", EMPTY = "" },
          request = {
            defaults = { temperature = 0.7, stop = { "\\n\\n", "END" },
                         logit_bias = { [15043] = -100 },
                         ["chat_template_kwargs"] = { enable_thinking = false }, ["a.b"] = 1 },
            force = { stream_options = {} },
            strip = { "seed", "user" },
          },
          variants = { { context = 8 } },
        } }
        """,
    ).models[0]
    assert model.env == {"CUDA_VISIBLE_DEVICES": "0", "LLAMA.X": "y", "EMPTY": ""}
    assert model.request.defaults == {
        "temperature": 0.7,
        "stop": ["\n\n", "END"],
        "logit_bias": {"15043": -100},
        "chat_template_kwargs": {"enable_thinking": False},
        "a.b": 1,
    }
    assert model.request.force == {"stream_options": {}}
    assert model.request.strip == ("seed", "user")


def test_config_may_compute_and_print(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        print("computing the config")
        local models_list = {}
        for _, ctx in ipairs({ 4096, 1024 }) do
          models_list[#models_list + 1] = { name = "m" .. ctx, variants = { { context = ctx } } }
        end
        models = models_list
        """,
    )
    assert [m.name for m in config.models] == ["m4096", "m1024"]


# A config is code: its run has a time limit and can be stopped ------------------------------


def processes_with(text: str) -> list[int]:
    """Processes whose command line contains `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and text in cmdline and int(proc.name) != os.getpid():
            found.append(int(proc.name))
    return found


def wait_for(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
    return result


def test_a_config_that_never_ends_is_killed_at_its_time_limit(tmp_path: Path) -> None:
    path = write(tmp_path, f"models = {{ {MODEL} }}\nwhile true do end\n")
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(path, timeout=0.5)
    assert time.monotonic() - started < 5
    assert str(info.value) == (
        f"{path}: did not finish running within 0.5s (server.config_timeout), so it was stopped"
    )
    assert processes_with(str(path)) == []  # no Lua process left spinning


def test_what_a_config_started_is_killed_with_it(tmp_path: Path) -> None:
    path = write(tmp_path, 'os.execute("sleep 31.4159")\n')
    with pytest.raises(ConfigError, match=re.escape("did not finish running within 0.3s")):
        load_config(path, timeout=0.3)
    assert processes_with("sleep 31.4159") == []


def test_a_run_can_be_stopped_from_another_thread(tmp_path: Path) -> None:
    path = write(tmp_path, f"models = {{ {MODEL} }}\nwhile true do end\n")
    run = ConfigRun(path, timeout=60)
    errors: list[ConfigError] = []

    def load() -> None:
        try:
            run.load()
        except ConfigError as exc:
            errors.append(exc)

    thread = threading.Thread(target=load)
    thread.start()
    wait_for(lambda: processes_with(str(path)))
    run.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert [str(e) for e in errors] == [f"{path}: loading was stopped"]
    assert processes_with(str(path)) == []


def test_a_stopped_run_does_not_start(tmp_path: Path) -> None:
    run = ConfigRun(write(tmp_path, f"models = {{ {MODEL} }}"), timeout=5)
    run.stop()
    with pytest.raises(ConfigError, match="loading was stopped"):
        run.load()


# What the engine's arguments say, parsed once at load --------------------------------------


def test_engine_arguments_become_typed_fields(tmp_path: Path) -> None:
    model = load(
        tmp_path,
        """
        models = { {
          name = "a",
          args = { "-m", "models/x.gguf", "-np", 4, "-t", "1" },
          variants = {
            { context = 512 },
            { context = 1024, args = { "--parallel", "2", "--kv-unified" } },
            { context = 2048, args = { "-kvu", "--no_kv_unified", "--alias", "served", "--embeddings" } },
            { context = 4096, args = { "--model", "/abs/y.gguf", "--rerank" } },
          },
        } }
        """,
    ).models[0]
    v512, v1024, v2048, v4096 = model.variants
    assert (v512.slots, v512.kv_unified, v512.alias, v512.served_name) == (4, False, None, "a")
    assert isinstance(v512.slots, int)
    assert v512.model_file == str(tmp_path / "models" / "x.gguf")
    assert (v1024.slots, v1024.kv_unified) == (2, True)  # the variant's args come last and win
    assert (v2048.kv_unified, v2048.alias, v2048.served_name) == (False, "served", "served")
    assert (v2048.embeddings, v2048.reranking) == (True, False)
    assert (v4096.model_file, v4096.reranking, v4096.embeddings) == ("/abs/y.gguf", True, False)


def test_no_engine_arguments_leave_the_engine_defaults(tmp_path: Path) -> None:
    (variant,) = load(tmp_path, f"models = {{ {MODEL} }}").models[0].variants
    assert (variant.slots, variant.kv_unified, variant.alias, variant.model_file) == (None, False, None, None)
    assert (variant.served_name, variant.embeddings, variant.reranking) == ("a", False, False)


def test_engine_environment_counts_and_arguments_win(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LLAMA_ARG_N_PARALLEL", "3")  # the gateway's own: engines inherit it
    model = load(
        tmp_path,
        """
        models = { {
          name = "a",
          env = { LLAMA_ARG_KV_UNIFIED = "on", LLAMA_ARG_EMBEDDINGS = "off" },
          variants = { { context = 8 }, { context = 9, args = { "-np", "5", "--no-kv-unified" } } },
        } }
        """,
    ).models[0]
    v8, v9 = model.variants
    assert (v8.slots, v8.kv_unified, v8.embeddings) == (3, True, False)
    assert (v9.slots, v9.kv_unified) == (5, False)


def test_slots_stay_on_when_the_last_setting_turns_them_on(tmp_path: Path, monkeypatch) -> None:
    """llama-server reads --slots/--no-slots last one first, over LLAMA_ARG_NO_ENDPOINT_SLOTS,
    over LLAMA_ARG_ENDPOINT_SLOTS (on/enabled/true/1 or off/disabled/false/0)."""
    monkeypatch.setenv("LLAMA_ARG_ENDPOINT_SLOTS", "off")  # the gateway's own
    model = load(
        tmp_path,
        """
        models = { {
          name = "a",
          args = { "--no-slots", "--slots" },
          variants = { { context = 8 }, { context = 9, args = { "--no-slots", "--slots" } } },
        } }
        """,
    ).models[0]
    assert [v.context for v in model.variants] == [8, 9]
    for value in ("on", "enabled", "true", "1"):
        env = f'env = {{ LLAMA_ARG_ENDPOINT_SLOTS = "{value}" }}'
        load(tmp_path, f'models = {{ {{ name = "a", {env}, variants = {{ {{ context = 8 }} }} }} }}')
    path = write(tmp_path, f"models = {{ {MODEL} }}")
    assert load_error(path).startswith(
        f"{path}: environment variable LLAMA_ARG_ENDPOINT_SLOTS: "
        'LLAMA_ARG_ENDPOINT_SLOTS = "off" hides /slots'
    )


def test_inherited_environment_is_checked_too(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LLAMA_API_KEY", "k")
    path = write(tmp_path, f"models = {{ {MODEL} }}")
    assert load_error(path).startswith(
        f"{path}: environment variable LLAMA_API_KEY: LLAMA_API_KEY would make the engine answer"
    )


def test_a_name_with_a_comma_is_fine_when_it_never_reaches_alias(tmp_path: Path) -> None:
    model = load(
        tmp_path,
        'models = { { name = "a,b", args = { "--alias", "ab" }, variants = { { context = 8 } } } }',
    ).models[0]
    assert model.variants[0].served_name == "ab"


def test_request_rules_keep_integer_types(tmp_path: Path) -> None:
    model = load(
        tmp_path,
        """
        models = { { name = "a", request = { force = { max_tokens = 16.0, stream = false },
                                             defaults = { n = 2 } },
                     variants = { { context = 8 } } } }
        """,
    ).models[0]
    assert model.request.force == {"max_tokens": 16, "stream": False}
    assert isinstance(model.request.force["max_tokens"], int)
    assert model.request.defaults == {"n": 2}


def test_config_timeout(tmp_path: Path) -> None:
    assert load(tmp_path, f"models = {{ {MODEL} }}").server.config_timeout == 10.0
    config = load(tmp_path, f"server = {{ config_timeout = 2.5 }}\nmodels = {{ {MODEL} }}")
    assert config.server.config_timeout == 2.5
    for edge in (1, 600):
        config = load(tmp_path, f"server = {{ config_timeout = {edge} }}\nmodels = {{ {MODEL} }}")
        assert config.server.config_timeout == edge


def test_counts_up_to_what_llama_server_reads(tmp_path: Path) -> None:
    """Token counts reach llama-server as 32-bit integers: 2147483647 is the largest."""
    model = load(
        tmp_path,
        """
        models = { { name = "a", default_max_tokens = 2147483647,
                     request = { defaults = { max_tokens = 2^31 - 1, n = 2147483647.0 },
                                 force = { n_predict = 2147483647 } },
                     variants = { { context = 8 } } } }
        """,
    ).models[0]
    assert model.default_max_tokens == 2147483647 and isinstance(model.default_max_tokens, int)
    assert model.request.defaults == {"max_tokens": 2147483647, "n": 2147483647}
    assert all(isinstance(v, int) for v in model.request.defaults.values())
    assert model.request.force == {"n_predict": 2147483647}


def test_a_list_as_request_rules_is_refused_by_the_cli(tmp_path: Path) -> None:
    """It was a ValueError traceback and exit 1 (and a 500 from /gateway/reload)."""
    path = write(
        tmp_path,
        models_with('{ name = "a", request = { defaults = { "x" } }, variants = { { context = 8 } } }'),
    )
    result = run_cli("--check-config", str(path), cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"config error: {path}: models[1].request.defaults: must be a map of request fields "
        "{ name = value } (found key 1)\n"
    )


# Validation errors ---------------------------------------------------------------------------


def models_with(model: str) -> str:
    return f"models = {{ {model} }}"


def server_with(server: str) -> str:
    return f"server = {{ {server} }}\n{models_with(MODEL)}"


def listen_with(v4: str, v6: str = '"none"') -> str:
    return server_with(f"listen_v4 = {v4}, listen_v6 = {v6}")


ERRORS = {
    # models
    "models missing": ("server = {}", ["models: is missing"]),
    "models not a table": ('models = "a"', ["models: must be a table", '"a"']),
    "models a map": (
        f"models = {{ a = {MODEL} }}",
        ["models: must be a list", 'found key "a"'],
    ),
    "models empty": ("models = {}", ["models: is empty"]),
    "model not a table": ('models = { "a" }', ["models[1]: must be a table", '"a"']),
    "name missing": (
        models_with("{ variants = { { context = 8 } } }"),
        ["models[1].name: is missing"],
    ),
    "name a number": (
        models_with("{ name = 42, variants = { { context = 8 } } }"),
        ["models[1].name: must be a string", "number 42"],
    ),
    "name empty": (
        models_with('{ name = "", variants = { { context = 8 } } }'),
        ["models[1].name: must not be empty"],
    ),
    "args a string": (
        models_with('{ name = "a", args = "-m x.gguf", variants = { { context = 8 } } }'),
        ["models[1].args: must be a table", '"-m x.gguf"'],
    ),
    "args a map": (
        models_with('{ name = "a", args = { m = "x.gguf" }, variants = { { context = 8 } } }'),
        ["models[1].args: must be a list", '"m"'],
    ),
    "arg a boolean": (
        models_with('{ name = "a", args = { "-m", true }, variants = { { context = 8 } } }'),
        ["models[1].args[2]: must be a string", "boolean true"],
    ),
    "context a string": (
        models_with('{ name = "a", variants = { { context = 8 }, { context = "2048" } } }'),
        ["models[1].variants[2].context: must be a positive integer", '"2048"'],
    ),
    "aliases a string": (
        models_with('{ name = "a", aliases = "b", variants = { { context = 8 } } }'),
        ["models[1].aliases: must be a table", '"b"'],
    ),
    "env value a table": (
        models_with('{ name = "a", env = { X = {} }, variants = { { context = 8 } } }'),
        ["models[1].env.X: must be a string", "table"],
    ),
    "keepalive a string": (
        server_with('loading_keepalive = "yes"'),
        ["server.loading_keepalive: must be a boolean", '"yes"'],
    ),
    "duplicate names": (
        f"models = {{ {MODEL}, {MODEL} }}",
        ['models[2].name: "a" is already used by models[1]'],
    ),
    "alias is another model's name": (
        f'models = {{ {MODEL}, {{ name = "b", aliases = {{ "a" }}, variants = {{ {{ context = 8 }} }} }} }}',
        ['models[2].aliases[1]: "a" is already used by models[1]'],
    ),
    "name is another model's alias": (
        'models = { { name = "b", aliases = { "x", "a" }, variants = { { context = 8 } } },'
        f" {MODEL} }}",
        ['models[2].name: "a" is already used by models[1].aliases[2]'],
    ),
    "alias is its own name": (
        models_with('{ name = "a", aliases = { "a" }, variants = { { context = 8 } } }'),
        ['models[1].aliases[1]: "a" is already used by models[1]'],
    ),
    "variants missing": (models_with('{ name = "a" }'), ["models[1].variants: is empty"]),
    "variants empty": (
        models_with('{ name = "a", variants = {} }'),
        ["models[1].variants: is empty"],
    ),
    "variant without context": (
        models_with('{ name = "a", variants = { { args = {} } } }'),
        ["models[1].variants[1].context: is missing"],
    ),
    "context zero": (
        models_with('{ name = "a", variants = { { context = 8 }, { context = 0 } } }'),
        ["models[1].variants[2].context: must be a positive integer", "(got 0)"],
    ),
    "context negative": (
        models_with('{ name = "a", variants = { { context = 8 }, { context = -512 } } }'),
        ["models[1].variants[2].context: must be a positive integer", "(got -512)"],
    ),
    "context not an integer": (
        models_with('{ name = "a", variants = { { context = 8 }, { context = 1024.5 } } }'),
        ["models[1].variants[2].context: must be a positive integer", "(got 1024.5)"],
    ),
    "context infinite": (
        models_with('{ name = "a", variants = { { context = 8 }, { context = math.huge } } }'),
        ["models[1].variants[2].context: must be a positive integer", "inf"],
    ),
    "duplicate contexts": (
        models_with(
            '{ name = "a", variants = { { context = 2048 }, { context = 512 }, { context = 2048.0 } } }'
        ),
        ["models[1].variants[3].context: 2048 is already the context of models[1].variants[1]"],
    ),
    "default_max_tokens zero": (
        models_with('{ name = "a", default_max_tokens = 0, variants = { { context = 8 } } }'),
        ["models[1].default_max_tokens: must be a positive integer", "(got 0)"],
    ),
    "queue_limit negative": (
        server_with("queue_limit = -1"),
        ["server.queue_limit: must be a positive integer", "(got -1)"],
    ),
    # timeouts: positive ones must be > 0, drain and idle >= 0
    "health_check_timeout zero": (
        server_with("health_check_timeout = 0"),
        ["server.health_check_timeout: must be a positive number", "(got 0)"],
    ),
    "engine_startup_timeout negative": (
        server_with("engine_startup_timeout = -5"),
        ["server.engine_startup_timeout: must be a positive number", "(got -5)"],
    ),
    "stop_timeout zero on a model": (
        models_with('{ name = "a", stop_timeout = 0, variants = { { context = 8 } } }'),
        ["models[1].stop_timeout: must be a positive number", "(got 0)"],
    ),
    "health_check_timeout negative on a variant": (
        models_with(
            '{ name = "a", variants = { { context = 8 }, { context = 9, health_check_timeout = -1 } } }'
        ),
        ["models[1].variants[2].health_check_timeout: must be a positive number", "(got -1)"],
    ),
    "startup timeout NaN": (
        server_with("engine_startup_timeout = 0/0"),
        ["server.engine_startup_timeout: must be a positive number", "nan"],
    ),
    "stop timeout infinite": (
        server_with("stop_timeout = math.huge"),
        ["server.stop_timeout: must be a positive number", "inf"],
    ),
    "drain_timeout negative": (
        server_with("drain_timeout = -1"),
        ["server.drain_timeout: must be zero or a positive number", "(got -1)"],
    ),
    "engine_idle_timeout negative on a model": (
        models_with('{ name = "a", engine_idle_timeout = -0.5, variants = { { context = 8 } } }'),
        ["models[1].engine_idle_timeout: must be zero or a positive number", "(got -0.5)"],
    ),
    "drain_timeout negative on a variant": (
        models_with('{ name = "a", variants = { { context = 8 }, { context = 9, drain_timeout = -2 } } }'),
        ["models[1].variants[2].drain_timeout: must be zero or a positive number", "(got -2)"],
    ),
    "timeout a string": (
        server_with('stop_timeout = "10"'),
        ["server.stop_timeout: must be a number", 'string "10"'],
    ),
    # the gateway owns --host and --port
    "--host in model args": (
        models_with(
            '{ name = "a", args = { "-m", "x.gguf", "--host", "0.0.0.0" }, variants = { { context = 8 } } }'
        ),
        ["models[1].args[3]: --host is set by the gateway"],
    ),
    "--port in model args": (
        models_with('{ name = "a", args = { "--port", "8080" }, variants = { { context = 8 } } }'),
        ["models[1].args[1]: --port is set by the gateway"],
    ),
    "--port=8080 in model args": (
        models_with('{ name = "a", args = { "-t", "1", "--port=8080" }, variants = { { context = 8 } } }'),
        ["models[1].args[3]: --port is set by the gateway"],
    ),
    "--port in variant args": (
        models_with(
            '{ name = "a", variants = { { context = 8 }, { context = 9, args = { "--port", "1" } } } }'
        ),
        ["models[1].variants[2].args[1]: --port is set by the gateway"],
    ),
    "--host= in variant args": (
        models_with('{ name = "a", variants = { { context = 8, args = { "--host=::" } } } }'),
        ["models[1].variants[1].args[1]: --host is set by the gateway"],
    ),
    # what the gateway reads in, or relies on about, llama-server's arguments
    "-c in model args": (
        models_with('{ name = "a", args = { "-m", "x.gguf", "-c", 4096 }, variants = { { context = 8 } } }'),
        ["models[1].args[3]: -c sets the context size, which the variant's `context` does"],
    ),
    "--ctx_size in variant args": (
        models_with('{ name = "a", variants = { { context = 8, args = { "--ctx_size", "8" } } } }'),
        ["models[1].variants[1].args[1]: --ctx_size sets the context size"],
    ),
    "-np two": (
        models_with(
            '{ name = "a", args = { "-m", "x.gguf", "-np", "two" }, variants = { { context = 8 } } }'
        ),
        ['models[1].args[4]: -np must be a positive integer (got "two")'],
    ),
    "--parallel 0 in a variant": (
        models_with(
            '{ name = "a", variants = { { context = 8 }, { context = 9, args = { "--parallel", 0 } } } }'
        ),
        ['models[1].variants[2].args[2]: --parallel must be a positive integer (got "0")'],
    ),
    "-np value in the variant's args": (
        models_with('{ name = "a", args = { "-np" }, variants = { { context = 8, args = { "2x" } } } }'),
        ['models[1].variants[1].args[1]: -np must be a positive integer (got "2x")'],
    ),
    "-np without a value": (
        models_with('{ name = "a", args = { "-t", "1", "-np" }, variants = { { context = 8 } } }'),
        ["models[1].args[3]: -np needs a value"],
    ),
    "--parallel=2": (
        models_with('{ name = "a", args = { "--parallel=2" }, variants = { { context = 8 } } }'),
        ['models[1].args[1]: llama-server takes no --parallel=value form: write "--parallel" and its value'],
    ),
    "-np in env": (
        models_with('{ name = "a", env = { LLAMA_ARG_N_PARALLEL = "two" }, variants = { { context = 8 } } }'),
        ['models[1].env.LLAMA_ARG_N_PARALLEL: LLAMA_ARG_N_PARALLEL must be a positive integer (got "two")'],
    ),
    "kv-unified env not a boolean": (
        models_with('{ name = "a", env = { LLAMA_ARG_KV_UNIFIED = "yes" }, variants = { { context = 8 } } }'),
        ["models[1].env.LLAMA_ARG_KV_UNIFIED: must be on/off", '(got "yes")'],
    ),
    "--alias with a comma": (
        models_with('{ name = "a", args = { "--alias", "foo,bar" }, variants = { { context = 8 } } }'),
        ['models[1].args[2]: --alias "foo,bar" has a comma', "several names"],
    ),
    "-a with a trailing space": (
        models_with('{ name = "a", variants = { { context = 8, args = { "-a", "foo " } } } }'),
        ['models[1].variants[1].args[2]: -a "foo " starts or ends with a space'],
    ),
    "a name with a comma reaches --alias": (
        models_with('{ name = "foo,bar", variants = { { context = 8 } } }'),
        ['models[1].name: the name "foo,bar" has a comma', "--alias"],
    ),
    "a name with a comma in a variant without --alias": (
        models_with(
            '{ name = "foo,bar", variants = { { context = 8, args = { "--alias", "foo" } },'
            " { context = 9 } } }"
        ),
        ['models[1].name: the name "foo,bar" has a comma'],
    ),
    "--api-key": (
        models_with(
            '{ name = "a", args = { "-m", "x.gguf", "--api-key", "k" }, variants = { { context = 8 } } }'
        ),
        ["models[1].args[3]: --api-key would make the engine answer the gateway's own calls with 401"],
    ),
    "--api-key-file in a variant": (
        models_with('{ name = "a", variants = { { context = 8, args = { "--api-key-file", "keys" } } } }'),
        ["models[1].variants[1].args[1]: --api-key-file would make the engine answer", "401"],
    ),
    "LLAMA_API_KEY in env": (
        models_with('{ name = "a", env = { LLAMA_API_KEY = "k" }, variants = { { context = 8 } } }'),
        ["models[1].env.LLAMA_API_KEY: LLAMA_API_KEY would make the engine answer", "401"],
    ),
    "--api-prefix": (
        models_with('{ name = "a", args = { "--api-prefix", "/v2" }, variants = { { context = 8 } } }'),
        ["models[1].args[1]: --api-prefix moves the endpoints the gateway calls"],
    ),
    "--log-disable": (
        models_with('{ name = "a", variants = { { context = 8, args = { "--log-disable" } } } }'),
        ['models[1].variants[1].args[1]: --log-disable hides the "listening on" line the gateway waits for'],
    ),
    "--no-slots": (
        models_with('{ name = "a", args = { "--no-slots" }, variants = { { context = 8 } } }'),
        ["models[1].args[1]: --no-slots hides /slots, where the gateway sees which requests"],
    ),
    "--no-slots after --slots": (
        models_with(
            '{ name = "a", args = { "--slots" }, variants = { { context = 8, args = { "--no_slots" } } } }'
        ),
        ["models[1].variants[1].args[1]: --no_slots hides /slots"],
    ),
    "LLAMA_ARG_ENDPOINT_SLOTS off in env": (
        models_with(
            '{ name = "a", env = { LLAMA_ARG_ENDPOINT_SLOTS = "0" }, variants = { { context = 8 } } }'
        ),
        ['models[1].env.LLAMA_ARG_ENDPOINT_SLOTS: LLAMA_ARG_ENDPOINT_SLOTS = "0" hides /slots'],
    ),
    "LLAMA_ARG_ENDPOINT_SLOTS disabled in env": (
        models_with(
            '{ name = "a", env = { LLAMA_ARG_ENDPOINT_SLOTS = "disabled" }, variants = { { context = 8 } } }'
        ),
        ['models[1].env.LLAMA_ARG_ENDPOINT_SLOTS: LLAMA_ARG_ENDPOINT_SLOTS = "disabled" hides /slots'],
    ),
    "LLAMA_ARG_NO_ENDPOINT_SLOTS in env": (
        models_with(
            '{ name = "a", env = { LLAMA_ARG_NO_ENDPOINT_SLOTS = "" }, variants = { { context = 8 } } }'
        ),
        ["models[1].env.LLAMA_ARG_NO_ENDPOINT_SLOTS: LLAMA_ARG_NO_ENDPOINT_SLOTS hides /slots"],
    ),
    "LLAMA_ARG_ENDPOINT_SLOTS not a boolean": (
        models_with(
            '{ name = "a", env = { LLAMA_ARG_ENDPOINT_SLOTS = "no" }, variants = { { context = 8 } } }'
        ),
        ["models[1].env.LLAMA_ARG_ENDPOINT_SLOTS: must be on/off", '(got "no")'],
    ),
    "LLAMA_ARG_API_KEY_FILE in env": (
        models_with(
            '{ name = "a", env = { LLAMA_ARG_API_KEY_FILE = "/tmp/keys" }, variants = { { context = 8 } } }'
        ),
        ["models[1].env.LLAMA_ARG_API_KEY_FILE: LLAMA_ARG_API_KEY_FILE would make the engine answer", "401"],
    ),
    "--kv-unified-per-slot": (
        models_with(
            '{ name = "a", variants = { { context = 8,'
            ' args = { "-np", "2", "--kv-unified-per-slot", "64" } } } }'
        ),
        [
            "models[1].variants[1].args[3]: --kv-unified-per-slot caps each slot's context",
            "the variant's `context` and -np set",
        ],
    ),
    "LLAMA_ARG_KV_UNIFIED_PER_SLOT in env": (
        models_with(
            '{ name = "a", env = { LLAMA_ARG_KV_UNIFIED_PER_SLOT = "64" }, variants = { { context = 8 } } }'
        ),
        ["models[1].env.LLAMA_ARG_KV_UNIFIED_PER_SLOT: LLAMA_ARG_KV_UNIFIED_PER_SLOT caps each slot's"],
    ),
    "-lv 2": (
        models_with('{ name = "a", args = { "-lv", 2 }, variants = { { context = 8 } } }'),
        ['models[1].args[2]: -lv 2 hides the "listening on" line', "use 3 or more"],
    ),
    "--log-verbosity not a number": (
        models_with('{ name = "a", args = { "--log-verbosity", "info" }, variants = { { context = 8 } } }'),
        ['models[1].args[2]: --log-verbosity must be an integer (got "info")'],
    ),
    # request rules that would break every request
    "force max_tokens a string": (
        models_with(
            '{ name = "a", request = { force = { max_tokens = "16" } }, variants = { { context = 8 } } }'
        ),
        ['models[1].request.force.max_tokens: must be a positive integer (got "16")'],
    ),
    "default max_completion_tokens zero": (
        models_with(
            '{ name = "a", request = { defaults = { max_completion_tokens = 0 } },'
            " variants = { { context = 8 } } }"
        ),
        ["models[1].request.defaults.max_completion_tokens: must be a positive integer (got 0)"],
    ),
    "force n_predict a fraction": (
        models_with(
            '{ name = "a", request = { force = { n_predict = 1.5 } }, variants = { { context = 8 } } }'
        ),
        ["models[1].request.force.n_predict: must be a positive integer (got 1.5)"],
    ),
    "default n negative": (
        models_with('{ name = "a", request = { defaults = { n = -1 } }, variants = { { context = 8 } } }'),
        ["models[1].request.defaults.n: must be a positive integer (got -1)"],
    ),
    "force n_cmpl a table": (
        models_with('{ name = "a", request = { force = { n_cmpl = {} } }, variants = { { context = 8 } } }'),
        ["models[1].request.force.n_cmpl: must be a positive integer"],
    ),
    "force stream a string": (
        models_with(
            '{ name = "a", request = { force = { stream = "yes" } }, variants = { { context = 8 } } }'
        ),
        ['models[1].request.force.stream: must be a boolean (got string "yes")'],
    ),
    "defaults a list": (
        models_with('{ name = "a", request = { defaults = { "x" } }, variants = { { context = 8 } } }'),
        ["models[1].request.defaults: must be a map of request fields { name = value } (found key 1)"],
    ),
    "force partly a list": (
        models_with(
            '{ name = "a", request = { force = { seed = 1, "x" } }, variants = { { context = 8 } } }'
        ),
        ["models[1].request.force: must be a map of request fields { name = value } (found key 1)"],
    ),
    "defaults a string": (
        models_with('{ name = "a", request = { defaults = "x" }, variants = { { context = 8 } } }'),
        ['models[1].request.defaults: must be a table (got string "x")'],
    ),
    "strip a map": (
        models_with('{ name = "a", request = { strip = { seed = true } }, variants = { { context = 8 } } }'),
        ["models[1].request.strip: must be a list", '"seed"'],
    ),
    "strip a string": (
        models_with('{ name = "a", request = { strip = "seed" }, variants = { { context = 8 } } }'),
        ['models[1].request.strip: must be a table (got string "seed")'],
    ),
    "strip entry a number": (
        models_with('{ name = "a", request = { strip = { 5 } }, variants = { { context = 8 } } }'),
        ["models[1].request.strip[1]: must be a string (got number 5)"],
    ),
    "defaults max_tokens beyond int32": (
        models_with(
            '{ name = "a", request = { defaults = { max_tokens = 1e300 } }, variants = { { context = 8 } } }'
        ),
        ["models[1].request.defaults.max_tokens: must be at most 2147483647", "32-bit", "(got 1e+300)"],
    ),
    "force n_predict 2^31": (
        models_with(
            '{ name = "a", request = { force = { n_predict = 2^31 } }, variants = { { context = 8 } } }'
        ),
        ["models[1].request.force.n_predict: must be at most 2147483647"],
    ),
    "defaults n 2^62": (
        models_with('{ name = "a", request = { defaults = { n = 2^62 } }, variants = { { context = 8 } } }'),
        ["models[1].request.defaults.n: must be at most 2147483647"],
    ),
    "force n_cmpl integer beyond int32": (
        models_with(
            '{ name = "a", request = { force = { n_cmpl = 2147483648 } }, variants = { { context = 8 } } }'
        ),
        ["models[1].request.force.n_cmpl: must be at most 2147483647", "(got 2147483648)"],
    ),
    "defaults max_completion_tokens a fraction": (
        models_with(
            '{ name = "a", request = { defaults = { max_completion_tokens = 1.5 } },'
            " variants = { { context = 8 } } }"
        ),
        ["models[1].request.defaults.max_completion_tokens: must be a positive integer (got 1.5)"],
    ),
    "default_max_tokens 1e308": (
        models_with('{ name = "a", default_max_tokens = 1e308, variants = { { context = 8 } } }'),
        ["models[1].default_max_tokens: must be at most 2147483647"],
    ),
    "default_max_tokens 2^62": (
        models_with('{ name = "a", default_max_tokens = 2^62, variants = { { context = 8 } } }'),
        ["models[1].default_max_tokens: must be at most 2147483647"],
    ),
    "default_max_tokens a fraction": (
        models_with('{ name = "a", default_max_tokens = 1.5, variants = { { context = 8 } } }'),
        ["models[1].default_max_tokens: must be a positive integer (got 1.5)"],
    ),
    "strip messages": (
        models_with(
            '{ name = "a", request = { strip = { "seed", "messages" } }, variants = { { context = 8 } } }'
        ),
        ['models[1].request.strip[2]: the gateway reads "messages" from every request', "cannot be stripped"],
    ),
    "force model": (
        models_with('{ name = "a", request = { force = { model = "b" } }, variants = { { context = 8 } } }'),
        ["models[1].request.force.model: the gateway reads model from the client's request"],
    ),
    "default prompt": (
        models_with(
            '{ name = "a", request = { defaults = { prompt = "hi" } }, variants = { { context = 8 } } }'
        ),
        ["models[1].request.defaults.prompt: the gateway reads prompt"],
    ),
    "config_timeout zero": (
        server_with("config_timeout = 0"),
        ["server.config_timeout: must be a number of seconds from 1 to 600 (got 0)"],
    ),
    "config_timeout too short for any reload": (
        server_with("config_timeout = 0.001"),
        ["server.config_timeout: must be a number of seconds from 1 to 600 (got 0.001)"],
    ),
    "config_timeout too long": (
        server_with("config_timeout = 601"),
        ["server.config_timeout: must be a number of seconds from 1 to 600 (got 601)"],
    ),
    "config_timeout a string": (
        server_with('config_timeout = "10"'),
        ['server.config_timeout: must be a number of seconds from 1 to 600 (got "10")'],
    ),
    "config_timeout NaN": (
        server_with("config_timeout = 0/0"),
        ["server.config_timeout: must be a number of seconds from 1 to 600", "nan"],
    ),
    # engine
    "unknown engine": (
        models_with('{ name = "a", engine = "vllm", variants = { { context = 8 } } }'),
        ['models[1].engine: unknown engine type "vllm"'],
    ),
    "engine a number": (
        models_with('{ name = "a", engine = 1, variants = { { context = 8 } } }'),
        ["models[1].engine: must be a string", "number 1"],
    ),
    # listen addresses
    "IPv4 octet over 255": (
        listen_with('"127.0.0.256:7777"'),
        ["server.listen_v4[1]: is not a listen address", '"127.0.0.256:7777"'],
    ),
    "IPv4 three octets": (
        listen_with('"127.0.1:7777"'),
        ["server.listen_v4[1]: is not a listen address", '"127.0.1:7777"'],
    ),
    "IPv4 host name": (
        listen_with('"localhost:7777"'),
        ["server.listen_v4[1]: is not a listen address", '"localhost:7777"'],
    ),
    "IPv4 without port": (
        listen_with('"127.0.0.1"'),
        ["server.listen_v4[1]: is not a listen address", '"127.0.0.1"'],
    ),
    "IPv4 port 0": (
        listen_with('{ "127.0.0.1:7777", "127.0.0.1:0" }'),
        ["server.listen_v4[2]: is not a listen address", '"127.0.0.1:0"'],
    ),
    "IPv4 port 70000": (
        listen_with('"0.0.0.0:70000"'),
        ["server.listen_v4[1]: is not a listen address", '"0.0.0.0:70000"'],
    ),
    "IPv4 address a number": (
        listen_with("{ 7777 }"),
        ["server.listen_v4[1]: must be a string", "number 7777"],
    ),
    "IPv6 without brackets": (
        listen_with('"none"', '"::1:7777"'),
        ["server.listen_v6[1]: is not a listen address", '"::1:7777"'],
    ),
    "IPv6 without port": (
        listen_with('"none"', '"[::1]"'),
        ["server.listen_v6[1]: is not a listen address", '"[::1]"'],
    ),
    "IPv6 port 70000": (
        listen_with('"none"', '"[::1]:70000"'),
        ["server.listen_v6[1]: is not a listen address", '"[::1]:70000"'],
    ),
    "IPv6 two double colons": (
        listen_with('"none"', '"[1::2::3]:80"'),
        ["server.listen_v6[1]: is not a listen address", '"[1::2::3]:80"'],
    ),
    "IPv6 nine groups": (
        listen_with('"none"', '"[1:2:3:4:5:6:7:8:9]:80"'),
        ["server.listen_v6[1]: is not a listen address", '"[1:2:3:4:5:6:7:8:9]:80"'],
    ),
    "IPv6 group too long": (
        listen_with('"none"', '"[12345::1]:80"'),
        ["server.listen_v6[1]: is not a listen address", '"[12345::1]:80"'],
    ),
    "IPv6 single colon": (
        listen_with('"none"', '"[:]:80"'),
        ["server.listen_v6[1]: is not a listen address", '"[:]:80"'],
    ),
    "IPv4 in listen_v6": (
        listen_with('"none"', '"[127.0.0.1]:80"'),
        ["server.listen_v6[1]: is not a listen address", '"[127.0.0.1]:80"'],
    ),
    "both listen lists none": (
        listen_with('"none"', '"none"'),
        ["server.listen_v4: no listen address", 'both "none"'],
    ),
    "listen_v4 none, listen_v6 by default": (
        server_with('listen_v4 = "none"'),
        ["server.listen_v4: no listen address"],
    ),
    # unknown keys
    "unknown server key": (
        server_with("listen = 7777"),
        ['server: unknown key "listen"'],
    ),
    "unknown model key": (
        models_with('{ name = "a", contexts = { 8 }, variants = { { context = 8 } } }'),
        ['models[1]: unknown key "contexts"'],
    ),
    "unknown variant key": (
        models_with('{ name = "a", variants = { { context = 8 }, { context = 9, ctx = 9 } } }'),
        ['models[1].variants[2]: unknown key "ctx"'],
    ),
    "unknown request key": (
        models_with('{ name = "a", request = { default = {} }, variants = { { context = 8 } } }'),
        ['models[1].request: unknown key "default"'],
    ),
    "positional entry in a model": (
        models_with('{ "a", name = "a", variants = { { context = 8 } } }'),
        ["models[1]: unknown key 1"],
    ),
    # lists with holes (an undefined variable) would silently drop what follows
    "hole in models": (
        f"local typo\nmodels = {{ {MODEL}, tpyo, {{ name = 'c', variants = {{ {{ context = 8 }} }} }} }}",
        ["models[2]: is nil"],
    ),
    "hole in variants": (
        models_with('{ name = "a", variants = { { context = 8 }, nil, { context = 9 } } }'),
        ["models[1].variants[2]: is nil"],
    ),
    "hole in args": (
        models_with('{ name = "a", args = { "-m", nil, "-t" }, variants = { { context = 8 } } }'),
        ["models[1].args[2]: is nil"],
    ),
    "list with a far index": (
        models_with('{ name = "a", aliases = { "x", [1000000000] = "y" }, variants = { { context = 8 } } }'),
        ["models[1].aliases[2]: is nil"],
    ),
    # request rules are sent as JSON
    "request default a function": (
        models_with('{ name = "a", request = { defaults = { f = print } }, variants = { { context = 8 } } }'),
        ["models[1].request.defaults.f: must be a string, number, boolean or table", "function"],
    ),
    "request default contains itself": (
        "local d = {}\nd.again = d\n"
        + models_with('{ name = "a", request = { defaults = d }, variants = { { context = 8 } } }'),
        ["models[1].request.defaults.again: contains itself (models[1].request.defaults)"],
    ),
    "request force NaN": (
        models_with('{ name = "a", request = { force = { t = 0/0 } }, variants = { { context = 8 } } }'),
        ["models[1].request.force.t: must be a finite number", "nan"],
    ),
    "strip entry empty": (
        models_with('{ name = "a", request = { strip = { "seed", "" } }, variants = { { context = 8 } } }'),
        ["models[1].request.strip[2]: must not be empty"],
    ),
    # the loader hands strings to Python as UTF-8
    "name not UTF-8": (
        models_with('{ name = "caf\\233", variants = { { context = 8 } } }'),
        ["models[1].name: is not valid UTF-8 text", '"caf\\xE9"'],
    ),
    "env key not UTF-8": (
        models_with('{ name = "a", env = { ["\\255"] = "x" }, variants = { { context = 8 } } }'),
        ["models[1].env: has a key that is not valid UTF-8 text", '"\\xFF"'],
    ),
}


@pytest.mark.parametrize(("text", "expected"), ERRORS.values(), ids=ERRORS.keys())
def test_validation_error(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = write(tmp_path, text)
    message = load_error(path)
    assert message.startswith(f"{path}: "), message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_error_message_names_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path / "some dir", "models = {}", name="my config.lua")
    assert load_error(path) == f"{path}: models: is empty: define at least one model"


def test_lua_syntax_error_has_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        models = {
          { name = "a", variants = { { context = 8 } } }
          { name = "b" },
        }
        """,
    )
    message = load_error(path)
    assert message.startswith(f"{path}:3: "), message
    assert "expected" in message


def test_lua_runtime_error_has_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'local x = 1\nerror("boom")\nmodels = {}\n')
    assert load_error(path) == f"{path}:2: boom"


def test_long_config_path_is_not_shortened(tmp_path: Path) -> None:
    """Lua shortens file names over 60 characters to "...<end>"; the message has the whole path."""
    path = write(tmp_path / ("folder-" * 12), "models = {\n", name="a-long-config-name.cfg.lua")
    assert len(str(path)) > 100
    assert load_error(path).startswith(f"{path}:2: ")


def test_lua_runtime_error_in_an_expression(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "local ctx = nil\nmodels = { { name = 'a', variants = { { context = ctx * 2 } } } }\n",
    )
    message = load_error(path)
    assert message.startswith(f"{path}:2: attempt to perform arithmetic on a nil value")


def test_error_after_config_output_is_the_error(tmp_path: Path) -> None:
    """What the config prints before it fails is not the message."""
    path = write(tmp_path, 'print("building models")\nio.write("no newline")\nmodels = {}\n')
    assert load_error(path) == f"{path}: models: is empty: define at least one model"
    path = write(tmp_path, 'print("lua: not an error")\nerror("real")\n', name="b.lua")
    assert load_error(path) == f"{path}:2: real"


def test_multiline_error_keeps_every_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'error("first line\\nsecond line")\n')
    assert load_error(path) == f"{path}:1: first line\nsecond line"


def test_error_with_a_table_value(tmp_path: Path) -> None:
    path = write(tmp_path, "error({ code = 1 })\n")
    assert load_error(path) == "(error object is a table value)"


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.lua"
    assert load_error(path) == f"config file not found: {path}"


def test_config_path_is_a_folder(tmp_path: Path) -> None:
    assert "config file not found" in load_error(tmp_path)


# The command line ----------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


def test_cli_check_config_ok(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'models = {{ {MODEL}, {{ name = "b", variants = {{ {{ context = 1 }}, {{ context = 2 }} }} }} }}',
        name="good.lua",
    )
    result = run_cli("--check-config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: ok (2 models, 3 variants)\n"
    assert result.stderr == ""


def test_cli_check_config_example(tmp_path: Path) -> None:
    result = run_cli("--check-config", str(EXAMPLE), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok (2 models, 4 variants)" in result.stdout


def test_cli_check_config_bad(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        models_with('{ name = "a", variants = { { context = 8 }, { context = -1 } } }'),
        name="bad.lua",
    )
    result = run_cli("--check-config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"config error: {path}: models[1].variants[2].context: must be a positive integer (got -1)\n"
    )


def test_cli_check_config_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "models = {\n", name="bad.lua")
    result = run_cli("--check-config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"config error: {path}:")
    assert "stack traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_cli_check_config_missing_file(tmp_path: Path) -> None:
    result = run_cli("--check-config", "missing.lua", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"config error: config file not found: {tmp_path / 'missing.lua'}\n"


# --- operations keys: api_keys, admin_key, preload -------------------------------------


def _ops_config(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "ops.cfg.lua"
    path.write_text(
        f"server = {{ {server} }}\n"
        'models = { { name = "m", aliases = { "m2" },'
        " variants = { { context = 4096 }, { context = 1024 } } } }\n"
    )
    return path


def test_api_keys_from_a_list_and_from_a_file(tmp_path: Path) -> None:
    listed = load_config(_ops_config(tmp_path, 'api_keys = { "a", "b" }, admin_key = "adm"'))
    assert listed.server.api_keys == ("a", "b") and listed.server.admin_key == "adm"
    (tmp_path / "keys.txt").write_text("# comment\n\n  k1  \nk2\n")
    from_file = load_config(_ops_config(tmp_path, 'api_keys = "keys.txt"'))
    assert from_file.server.api_keys == ("k1", "k2") and from_file.server.admin_key is None


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ('api_keys = "missing.txt"', "server.api_keys: cannot read the key file"),
        ('api_keys = { "" }', "server.api_keys[1]: must not be empty"),
        ("api_keys = { 5 }", "server.api_keys[1]: must be a string"),
        ('admin_key = ""', "server.admin_key: must not be empty"),
        ('preload = "nope"', 'server.preload.model: no model is named "nope"'),
        (
            'preload = { model = "m", context = 2048 }',
            'server.preload.context: 2048 is not a context of model "m"',
        ),
        ('preload = { model = "m", size = 1 }', 'server.preload: unknown key "size"'),
    ],
)
def test_operations_key_errors(tmp_path: Path, server: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_ops_config(tmp_path, server))
    assert message in str(info.value)


def test_preload_by_alias_takes_the_smallest_variant(tmp_path: Path) -> None:
    assert load_config(_ops_config(tmp_path, 'preload = "m2"')).server.preload == ("m", 1024)
    assert load_config(_ops_config(tmp_path, 'preload = { model = "m", context = 4096 }')).server.preload == (
        "m",
        4096,
    )


# server.prompt_cache -----------------------------------------------------------------------


def test_the_prompt_cache_is_on_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    default = load(tmp_path, f"models = {{ {MODEL} }}").server.prompt_cache
    assert default is not None and (default.dir, default.max_size) == (None, 2 << 30)
    assert (
        load(tmp_path, f"server = {{ prompt_cache = false }}\nmodels = {{ {MODEL} }}").server.prompt_cache
        is None
    )
    set_up = load(
        tmp_path,
        f'server = {{ prompt_cache = {{ dir = "cache", max_size = "4GiB" }} }}\nmodels = {{ {MODEL} }}',
    ).server.prompt_cache
    assert set_up is not None and (set_up.dir, set_up.max_size) == (str(tmp_path / "cache"), 4 << 30)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ('{ folder = "x" }', ['server.prompt_cache: unknown key "folder"']),
        ('{ max_size = "lots" }', ["server.prompt_cache.max_size: must be a size"]),
        ('{ dir = "" }', ["server.prompt_cache.dir: must not be empty"]),
        ('"on"', ["server.prompt_cache: must be a table"]),
    ],
)
def test_bad_prompt_cache_settings_are_refused(tmp_path: Path, value: str, words: list[str]) -> None:
    message = load_error(write(tmp_path, f"server = {{ prompt_cache = {value} }}\nmodels = {{ {MODEL} }}"))
    for word in words:
        assert word in message, message


def test_a_shutdown_delay_is_bounded(tmp_path: Path) -> None:
    message = load_error(write(tmp_path, f"server = {{ shutdown_delay = 1e300 }}\nmodels = {{ {MODEL} }}"))
    assert "server.shutdown_delay: must be at most 600 seconds" in message
