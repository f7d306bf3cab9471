"""Engine types openai and remote: their config, their adapters, and the counting
adapters of engines that cannot run here (vLLM, TabbyAPI) against fakes that answer
those engines' documented shapes. What a real engine does is in test_e2e_engine_types.py."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import ConfigError, load_config
from gateway.config.schema import CountMethod, EngineKind, Model
from gateway.engine.client import EngineClient, new_session
from gateway.engine.counting import COUNTERS
from gateway.engine.openai import OpenAIEngine
from gateway.engine.remote import RemoteEngine
from gateway.engine.types import adapter_for


def load(tmp_path: Path, models: str) -> Any:
    path = tmp_path / "cfg.lua"
    path.write_text(textwrap.dedent(f"server = {{}}\nmodels = {{ {models} }}\n"))
    return load_config(path)


def error(tmp_path: Path, models: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, models)
    return str(info.value)


VLLM = """{ name = "qwen", engine = "openai", served_name = "Qwen/Qwen3-8B", count = "vllm",
  command = { "vllm", "serve", "Qwen/Qwen3-8B", "--host", "${HOST}", "--port", "${PORT}",
              "--max-model-len", "${CONTEXT}", "--served-model-name", "${MODEL}" },
  variants = { { context = 8192 }, { context = 32768, args = { "--enable-chunked-prefill" } } } }"""
REMOTE = """{ name = "big", engine = "remote", url = "http://10.0.0.5:7777/", api_key_env = "UPSTREAM_KEY",
  served_name = "big-upstream", max_in_flight = 8, health_interval = 2,
  variants = { { context = 16384 } } }"""


# --- config ------------------------------------------------------------------------------


def test_an_openai_engine_is_read_with_its_command_and_counting(tmp_path: Path) -> None:
    model = load(tmp_path, VLLM).models[0]
    assert model.engine is EngineKind.OPENAI
    assert model.upstream.count is CountMethod.VLLM
    assert model.upstream.command[:2] == ("vllm", "serve")
    assert model.upstream.health == "/health"
    assert [v.served_name for v in model.variants] == ["Qwen/Qwen3-8B"] * 2
    assert model.variants[1].args == ("--enable-chunked-prefill",)


def test_a_remote_engine_is_read_with_its_url_and_limits(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-test")
    model = load(tmp_path, REMOTE).models[0]
    assert model.engine is EngineKind.REMOTE and not model.engine.local
    assert model.upstream.url == "http://10.0.0.5:7777"  # the trailing slash dropped
    assert (model.upstream.max_in_flight, model.upstream.health_interval) == (8, 2.0)
    assert model.upstream.count is CountMethod.NONE
    assert RemoteEngine().request_headers(model) == {"Authorization": "Bearer sk-test"}


@pytest.mark.parametrize(
    ("models", "words"),
    [
        (
            '{ name = "a", engine = "openai", command = { "srv", "--port", "8000" }, '
            "variants = { { context = 1 } } }",
            ["models[1].command", "has no ${PORT}"],
        ),
        (
            '{ name = "a", engine = "openai", variants = { { context = 1 } } }',
            ["models[1].command", "is missing"],
        ),
        (
            '{ name = "a", engine = "remote", variants = { { context = 1 } } }',
            ["models[1].url", "is missing"],
        ),
        (
            '{ name = "a", engine = "remote", url = "10.0.0.5:7777", variants = { { context = 1 } } }',
            ["models[1].url", "http://"],
        ),
        (
            '{ name = "a", engine = "openai", count = "exact", command = { "s", "${PORT}" }, '
            "variants = { { context = 1 } } }",
            ["models[1].count", "unknown count method", '"vllm"'],
        ),
        (
            '{ name = "a", engine = "openai", command = { "s", "${PORT}", "${GPU}" }, '
            "variants = { { context = 1 } } }",
            ["models[1].command[3]", "unknown placeholder ${GPU}"],
        ),
        (
            '{ name = "a", engine = "remote", url = "http://h:1", binary = "x", '
            "variants = { { context = 1 } } }",
            ["models[1].binary", 'is not read by engine = "remote"', '"llama.cpp"'],
        ),
        (
            '{ name = "a", engine = "remote", url = "http://h:1", '
            'variants = { { context = 1, args = { "-x" } } } }',
            ["models[1].variants[1].args", 'is not read by engine = "remote"'],
        ),
        (
            '{ name = "a", url = "http://h:1", variants = { { context = 1 } } }',
            ["models[1].url", 'is not read by engine = "llama.cpp"', '"remote"'],
        ),
        (
            '{ name = "a", engine = "remote", url = "http://h:1", api_key_env = "sk-abc123!", '
            "variants = { { context = 1 } } }",
            ["models[1].api_key_env", "must name an environment variable"],
        ),
        (
            '{ name = "a", engine = "vllm", variants = { { context = 1 } } }',
            ['unknown engine type "vllm"', '"openai"'],
        ),
        (
            '{ name = "a", engine = "remote", url = "http://me:s3cret@h:1", variants = { { context = 1 } } }',
            ["models[1].url", "must not hold credentials", "api_key_env"],
        ),
        (
            '{ name = "a", engine = "remote", url = "http://h:1/v1?x=1", variants = { { context = 1 } } }',
            ["models[1].url", "no query or fragment"],
        ),
        (
            '{ name = "a", engine = "remote", url = "http://h:99999", variants = { { context = 1 } } }',
            ["models[1].url", "no valid port"],
        ),
    ],
)
def test_bad_engine_configs_are_refused_naming_the_key(tmp_path: Path, models: str, words: list[str]) -> None:
    message = error(tmp_path, models)
    for word in words:
        assert word in message, message
    assert "s3cret" not in message  # a password never reaches a log


def test_an_unset_key_variable_is_a_warning_not_an_error(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.delenv("UPSTREAM_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="gateway.config"):
        model = load(tmp_path, REMOTE).models[0]
    assert "UPSTREAM_KEY is not set" in caplog.text
    assert RemoteEngine().request_headers(model) == {}  # sent without a key: the upstream says 401


def test_a_remote_engine_needs_no_memory_under_a_budget(tmp_path: Path) -> None:
    path = tmp_path / "cfg.lua"
    path.write_text(f'server = {{ memory_budget = "1GiB" }}\nmodels = {{ {REMOTE} }}\n')
    assert load_config(path).models[0].engine is EngineKind.REMOTE


def test_an_openai_engine_under_a_budget_must_declare_its_memory(tmp_path: Path) -> None:
    path = tmp_path / "cfg.lua"
    path.write_text(f'server = {{ memory_budget = "1GiB" }}\nmodels = {{ {VLLM} }}\n')
    with pytest.raises(ConfigError, match="declare what it needs"):
        load_config(path)


# --- the openai adapter ------------------------------------------------------------------


def test_the_command_gets_port_host_context_and_model(tmp_path: Path) -> None:
    model: Model = load(tmp_path, VLLM).models[0]
    launch = OpenAIEngine().launch(model, model.variants[1], "unused")
    assert launch is not None and launch.port is not None
    argv = launch.argv
    assert argv[:3] == ["vllm", "serve", "Qwen/Qwen3-8B"]
    assert argv[argv.index("--port") + 1] == str(launch.port)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--max-model-len") + 1] == "32768"
    assert argv[argv.index("--served-model-name") + 1] == "qwen"
    assert argv[-1] == "--enable-chunked-prefill"  # the variant's args come last


def test_the_request_names_the_served_model(tmp_path: Path) -> None:
    model: Model = load(tmp_path, VLLM).models[0]
    body = {"model": "qwen", "messages": []}
    assert OpenAIEngine().rewrite(model, body) == {"model": "Qwen/Qwen3-8B", "messages": []}
    same = {"model": "Qwen/Qwen3-8B"}
    assert OpenAIEngine().rewrite(model, same) is same


def test_llama_cpp_endpoints_are_not_served_by_openai_engines(tmp_path: Path) -> None:
    model: Model = load(tmp_path, VLLM).models[0]
    adapter = adapter_for(model)
    assert adapter.unserved(model, "/v1/chat/completions") is None
    assert adapter.unserved(model, "/v1/embeddings") is None
    why = adapter.unserved(model, "/v1/rerank")
    assert why is not None and "'openai'" in why and "/v1/rerank" in why


@pytest.mark.parametrize(
    ("body", "tokens"),
    [
        # vLLM 0.6-0.8
        (
            b'{"object":"error","message":"This model\'s maximum context length is 2048 tokens. However, you '
            b"requested 2100 tokens (2000 in the messages, 100 in the completion). Please reduce the length "
            b'of the messages or completion.","type":"BadRequestError","param":null,"code":400}',
            2000,
        ),
        # vLLM 0.9+
        (
            b'{"error":{"message":"This model\'s maximum context length is 2048 tokens. However, '
            b'your request has 3001 input tokens. Please reduce the length of the input messages.",'
            b'"type":"BadRequestError"}}',
            3001,
        ),
        # OpenAI
        (
            b'{"error":{"message":"This model\'s maximum context length is 8192 tokens. However, '
            b'your messages resulted in 9001 tokens. Please reduce the length of the messages.",'
            b'"type":"invalid_request_error","code":"context_length_exceeded"}}',
            9001,
        ),
        # llama.cpp's own
        (b'{"error":{"type":"exceed_context_size_error","n_prompt_tokens":700,"n_ctx":512}}', 700),
        (b'{"error":{"message":"temperature must be a number","type":"invalid_request_error"}}', None),
    ],
)
def test_context_overflows_are_read_in_every_servers_words(body: bytes, tokens: int | None) -> None:
    assert OpenAIEngine().context_overflow(400, body) == tokens
    assert OpenAIEngine().context_overflow(500, body) is None


# --- counting adapters against fakes of vLLM's and TabbyAPI's documented answers ---------------


class FakeTokenizer:
    """One token per word, and 5 per chat message for its template."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @staticmethod
    def tokens(text: str) -> int:
        return len(text.split())

    def chat(self, messages: list[dict[str, Any]]) -> int:
        return sum(5 + self.tokens(m["content"]) for m in messages)

    async def vllm(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("vllm", body))
        count = self.chat(body["messages"]) if "messages" in body else self.tokens(body["prompt"])
        return web.json_response({"count": count, "max_model_len": 8192, "tokens": list(range(count))})

    async def tabby(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("tabby", body))
        text = body["text"]
        count = self.chat(text) if isinstance(text, list) else self.tokens(text)
        return web.json_response({"tokens": list(range(count)), "length": count})


@pytest.fixture
async def fake_engine() -> AsyncIterator[tuple[FakeTokenizer, EngineClient]]:
    tokenizer = FakeTokenizer()
    app = web.Application()
    app.router.add_post("/tokenize", tokenizer.vllm)
    app.router.add_post("/v1/token/encode", tokenizer.tabby)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    pooled, fresh = new_session(reuse=True), new_session(reuse=False)
    yield tokenizer, EngineClient(pooled, fresh, str(server.make_url("")).rstrip("/"))
    await pooled.close()
    await fresh.close()
    await server.close()


CHAT = {"model": "Qwen/Qwen3-8B", "messages": [{"role": "user", "content": "one two three"}]}


@pytest.mark.parametrize("method", [CountMethod.VLLM, CountMethod.TABBY])
async def test_counting_adapters_count_chats_and_prompts(method: CountMethod, fake_engine: Any) -> None:
    _tokenizer, client = fake_engine
    counter = COUNTERS[method]
    assert counter is not None
    assert await counter.count(client, "chat", CHAT) == 8
    prompts = {"model": "m", "prompt": ["a b", "a b c d", [1, 2, 3, 4, 5, 6]]}
    assert await counter.count(client, "completion", prompts) == 6  # the largest: token ids as given
    assert await counter.count(client, "embedding", {"model": "m", "input": "x y z"}) == 3
    overhead = await counter.template_overhead(client, {"model": "m"})
    # a user/assistant pair (10) is charged to every message: an upper bound
    assert (overhead.fixed, overhead.per_message) == (0, 10)


async def test_the_vllm_counter_sends_the_model_and_the_generation_prompt(fake_engine: Any) -> None:
    tokenizer, client = fake_engine
    counter = COUNTERS[CountMethod.VLLM]
    assert counter is not None
    await counter.count(client, "chat", {**CHAT, "temperature": 0, "tools": [{"type": "function"}]})
    _kind, sent = tokenizer.calls[-1]
    assert sent == {
        "model": "Qwen/Qwen3-8B",
        "messages": CHAT["messages"],
        "tools": [{"type": "function"}],
        "add_generation_prompt": True,
    }
    await counter.count(client, "completion", {"model": "Qwen/Qwen3-8B", "prompt": "a b"})
    assert tokenizer.calls[-1][1] == {"model": "Qwen/Qwen3-8B", "prompt": "a b"}


def test_count_none_has_no_counter(tmp_path: Path) -> None:
    model = load(tmp_path, REMOTE).models[0]
    assert adapter_for(model).counter(model) is None
