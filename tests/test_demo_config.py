"""The shipped example.cfg.lua (what `make run` serves): every variant of every model
starts on the real llama-server and answers."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import GatewayConfig, load_config
from gateway.demo.harness import free_port, spawn_gateway, stop_process, wait_healthy
from tests.conftest import Gateway

EXAMPLE = Path(__file__).resolve().parents[1] / "example.cfg.lua"


@pytest.fixture
def demo(tmp_path: Path, tiny_models: dict[str, Path], llama_server: str) -> Iterator[Gateway]:
    """The example config as shipped, next to the models `make models` writes (the same
    seeds), listening on a free port instead of 7777."""
    config = tmp_path / EXAMPLE.name
    shutil.copy(EXAMPLE, config)
    port = free_port()
    with config.open("a") as f:
        f.write(f'\nserver.listen_v4 = "127.0.0.1:{port}"\n')
    (tmp_path / "models").symlink_to(tiny_models["tiny"].parent)
    log_path = tmp_path / "gateway.log"
    process = spawn_gateway(config, log_path)
    gw = Gateway(f"http://127.0.0.1:{port}", process, config, log_path)
    try:
        wait_healthy(gw.url, process)
        yield gw
    finally:
        assert stop_process(process) == 0, gw.log()[-3000:]


def example_variants() -> list[tuple[str, int]]:
    config: GatewayConfig = load_config(EXAMPLE)
    return [(m.name, v.context) for m in config.models for v in m.variants]


def test_the_example_has_the_demo_models() -> None:
    assert example_variants() == [("tiny", 512), ("tiny", 2048), ("tiny", 8192), ("tiny-b", 2048)]


def test_every_variant_of_the_example_starts_and_answers(demo: Gateway) -> None:
    for model, context in example_variants():
        loaded = demo.post("/gateway/load", {"model": model, "context": context})
        assert loaded.status == 200, f"{model}@{context}: {loaded.body!r}\n{demo.log()[-3000:]}"
        pid = loaded.json()["pid"]
        answer = demo.post(
            "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        )
        assert answer.status == 200, f"{model}@{context}: {answer.body!r}"
        body = answer.json()
        assert body["model"] == model
        assert re.fullmatch(r"[A-Za-z ]{8}", body["choices"][0]["message"]["content"])
        engine = demo.engine(model)
        assert (engine["variant"]["key"], engine["pid"]) == (f"{model}@{context}", pid)  # served by it
