"""LlamaCppEngine reads what a variant's arguments say from its typed fields, parsed at load."""

from __future__ import annotations

from pathlib import Path

from gateway.config import Model, load_config
from gateway.engine.llamacpp import AUTO_SLOTS, LlamaCppEngine
from gateway.models import Room

ENGINE = LlamaCppEngine()


def model(tmp_path: Path, text: str) -> Model:
    path = tmp_path / "cfg.lua"
    path.write_text(f"models = {{ {text} }}\n")
    return load_config(path).models[0]


def test_argv_adds_context_alias_and_loopback(tmp_path: Path) -> None:
    m = model(tmp_path, '{ name = "a", args = { "-m", "/m.gguf" }, variants = { { context = 512 } } }')
    (variant,) = m.variants
    assert ENGINE.argv("/bin/llama-server", m, variant, "/slots") == [
        "/bin/llama-server",
        *("-m", "/m.gguf"),
        *("--ctx-size", "512"),
        *("--alias", "a"),
        *("--slot-save-path", "/slots"),
        *("--host", "127.0.0.1", "--port", "0"),
    ]


def test_a_slot_folder_in_the_args_is_kept(tmp_path: Path) -> None:
    m = model(
        tmp_path, '{ name = "a", args = { "--slot-save-path", "/mine" }, variants = { { context = 8 } } }'
    )
    argv = ENGINE.argv("x", m, m.variants[0], "/slots")
    assert argv.count("--slot-save-path") == 1 and argv[argv.index("--slot-save-path") + 1] == "/mine"


def test_an_alias_in_the_args_is_the_served_name(tmp_path: Path) -> None:
    m = model(
        tmp_path,
        '{ name = "a", variants = { { context = 512 }, { context = 1024, args = { "-a", "other" } } } }',
    )
    small, large = m.variants
    assert small.served_name == "a"
    assert large.served_name == "other"
    assert ENGINE.argv("x", m, large, "/slots") == [
        "x",
        *("-a", "other"),
        *("--ctx-size", "1024"),
        *("--slot-save-path", "/slots"),
        *("--host", "127.0.0.1", "--port", "0"),
    ]


def test_capacity_and_shared_budget_follow_slots_and_kv_unified(tmp_path: Path) -> None:
    m = model(
        tmp_path,
        """{ name = "a", args = { "-np", "4" }, variants = {
             { context = 4096 },
             { context = 8192, args = { "--kv-unified" } },
             { context = 16384, args = { "-np", "1" } },
           } }""",
    )
    split, unified, single = m.variants
    assert ENGINE.capacity(split, m) == Room(1024, None, 4)  # each slot a cache of its own
    assert ENGINE.shared_kv_budget(split, m, 1024) is None
    assert ENGINE.capacity(unified, m) == Room(8192, 8192, 4)
    assert ENGINE.shared_kv_budget(unified, m, 8192) == 8192
    assert ENGINE.capacity(single, m) == Room(16384, 16384, 1)
    assert ENGINE.shared_kv_budget(single, m, 16384) == 16384


def test_automatic_slots_share_one_cache(tmp_path: Path) -> None:
    m = model(tmp_path, '{ name = "a", variants = { { context = 2048 } } }')
    (variant,) = m.variants
    assert ENGINE.capacity(variant, m) == Room(2048, 2048, AUTO_SLOTS)
    assert ENGINE.shared_kv_budget(variant, m, 2048) == 2048


def test_serves_embeddings_and_rerank_only_when_started_for_them(tmp_path: Path) -> None:
    m = model(
        tmp_path,
        """{ name = "a", variants = {
             { context = 512 },
             { context = 1024, args = { "--embeddings" } },
             { context = 2048, args = { "--reranking" } },
           } }""",
    )
    plain, embeddings, rerank = m.variants
    assert ENGINE.serves(m, plain, "chat", "/v1/chat/completions") is None
    assert "--embeddings" in (ENGINE.serves(m, plain, "embedding", "/v1/embeddings") or "")
    assert ENGINE.serves(m, embeddings, "embedding", "/v1/embeddings") is None
    assert "--reranking" in (ENGINE.serves(m, embeddings, "rerank", "/v1/rerank") or "")
    assert ENGINE.serves(m, rerank, "rerank", "/v1/rerank") is None
